"""The per-frame work both runners share (`Pipeline`), the frame on its way (`Job`) and the run's counters (`RunStats`).

`Pipeline` admits a frame (ledger ``seen``, spool for stream frames), runs the analyser's three
phases with the runner's clock around each (prepare → segment → finish), records the result in
the ledger and the event log (which feeds the sinks), quarantines a frame the analyser refuses,
and offers every published frame to the archive. The runners of `latticewatch.runtime.runners`
decide only which thread calls which phase.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from latticewatch.config import EventLogConfig
from latticewatch.errors import FrameError
from latticewatch.frame import Analysis, Frame, Rejected
from latticewatch.runtime.analyser import Analyser, Prepared
from latticewatch.runtime.archiving import ArchiveSink
from latticewatch.runtime.eventlog import EventLog
from latticewatch.runtime.ledger import Ledger
from latticewatch.runtime.offload import Offloader, Remote
from latticewatch.runtime.store import StateDir
from latticewatch.sinks.archive import ArchiveWriter
from latticewatch.sinks.events import (
    FrameEvent,
    ParticleEvent,
    RunnerInfo,
    Sink,
    WarningEvent,
    error_event,
    frame_events,
    now,
    pixel_size_warning,
    render,
)
from latticewatch.sources.base import Source, printable

log = logging.getLogger(__name__)


@dataclass
class RunStats:
    """What a run did; counters only increase. Thread-safe through its methods."""

    analysed: int = 0
    quarantined: int = 0
    skipped: int = 0  # arrived again but already done (restart catch-up, duplicate message)
    overruns: int = 0  # frames whose phases took longer than budget_ms
    deferred: int = 0  # stream frames moved out of memory because the pipeline was behind
    offloaded: int = 0  # frames analysed on the Dask cluster (`latticewatch.runtime.offload`)
    resumed: int = 0  # spooled frames picked up from a previous run
    batches: int = 0
    batched_frames: int = 0
    largest_batch: int = 0
    sink_errors: int = 0
    archive: dict[str, int] = field(default_factory=dict)  # the archive sink's counters and its backlog
    phase_seconds: dict[str, float] = field(default_factory=dict)  # summed over frames
    sources: dict[str, dict[str, int]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def charge(self, phase: str, seconds: float) -> None:
        with self._lock:
            self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + seconds

    def batched(self, size: int) -> None:
        """Count one network call over ``size`` frames (a single frame is no batch)."""
        if size < 2:
            return
        with self._lock:
            self.batches += 1
            self.batched_frames += size
            self.largest_batch = max(self.largest_batch, size)

    def snapshot(self, sources: dict[str, dict[str, int]], archive: dict[str, int] | None = None) -> None:
        """Take the sources' counters (and the archive sink's, when there is one) as they are now."""
        with self._lock:
            self.sources = sources
            if archive is not None:
                self.archive = archive

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            return {k: v for k, v in vars(self).items() if not k.startswith("_")}


@dataclass
class Job:
    """One frame on its way through the pipeline, with the runner's clock on it."""

    frame: Frame
    source: str
    spool: str | None
    arrived: float = field(default_factory=time.monotonic)
    phases: dict[str, float] = field(default_factory=dict)  # runner-measured seconds per phase
    prepared: Prepared | None = None
    probability: np.ndarray | None = None
    remote: Remote | None = None  # its analysis under way on the cluster


#: What `Pipeline.conclude` gives: the frame's analysis and events, or why its post-processing failed.
Concluded = tuple[Analysis, list[FrameEvent | ParticleEvent | WarningEvent]] | str


def _printable(item: Frame | Rejected) -> Frame | Rejected:
    """The item with an id, origin (and problem) that encode as UTF-8, whatever the source yielded.

    Sources escape outside text themselves (`printable`); this keeps a plugin that does not from
    putting a string the ledger, the event log and the archive cannot store into any of them.
    """
    fields = {"frame_id": item.frame_id, "origin": item.origin}
    if isinstance(item, Rejected):
        fields["problem"] = item.problem
    safe = {name: printable(value) for name, value in fields.items()}
    return item if safe == fields else dataclasses.replace(item, **safe)


class Pipeline:
    """The per-frame work both runners share: admit, the three phases, record, quarantine.

    Parameters
    ----------
    analyser
        The loaded profile.
    state
        The state directory (ledger, event log, spool, quarantine).
    sinks
        Consumers of the events (publisher, metrics, dashboard), fed by the event log once durable.
    budget_ms
        Per-frame processing budget; ``None`` counts no overruns.
    archive
        Writer of the archive session; every published frame (and every quarantined frame with
        pixels) goes to it through an `ArchiveSink`. Stream frames then stay spooled until archived.
    archive_queue
        Frames waiting for the archive writer.
    calibrate
        Gives frames without a pixel size one (`latticewatch.calibration.apply_calibration`).
    event_log
        Rotation and retention of the event log (None: one growing file).
    offload
        A Dask cluster for the frames that wait too long (`latticewatch.runtime.offload`); closed with the pipeline.

    Examples
    --------
    >>> pipeline = Pipeline(Analyser("nanoparticles"), StateDir("/tmp/lw-state"))  # doctest: +SKIP
    >>> InlineRunner(pipeline).run([MemorySource([image])], threading.Event()).analysed  # doctest: +SKIP
    1
    """

    def __init__(self, analyser: Analyser, state: StateDir, *, sinks: Sequence[Sink] = (),
                 budget_ms: float | None = None, archive: ArchiveWriter | None = None, archive_queue: int = 4,
                 calibrate: Callable[[Frame], Frame] | None = None, event_log: EventLogConfig | None = None,
                 offload: Offloader | None = None) -> None:
        self.analyser = analyser
        self.state = state
        self.stats = RunStats()
        self.ledger = Ledger(state.ledger_path)
        self.events = EventLog(state.events_path, self.ledger, sinks=sinks,
                               on_sink_error=lambda _sink: self.stats.add(sink_errors=1), rotation=event_log)
        self.budget_ms = budget_ms
        self.calibrate = calibrate
        self.offload = offload
        self._without_pixel_size: set[str] = set()  # sources already reported
        self._said_lock = threading.Lock()
        self.archive = None if archive is None else ArchiveSink(
            archive, self.ledger, self.events, state, queue_size=archive_queue, calibrate=self._calibrated)

    def close(self) -> None:
        """Archive what is queued for it (the rest stays in the backlog), then close the ledger (and the offload)."""
        if self.offload is not None:
            self.offload.close()
        if self.archive is not None:
            self.archive.close()
            self.stats.archive = {**self.archive.counters, "backlog": self.archive.backlog()}
        self.ledger.close()

    def recover(self, sources: Sequence[Source] = ()) -> list[str]:
        """Finish what a previous run left: publish stored events, start archiving the backlog.

        Returns the keys of the frames spooled by it, to analyse.
        """
        if self.archive is not None:
            self.archive.start({s.name: s for s in sources})
        republished = self.events.recover()
        if republished:
            log.info("published the stored events of %d frame(s) from the previous run", republished)
        spooled = [key for _fid, key in self.ledger.spooled()]
        if spooled:
            log.info("%d spooled frame(s) from the previous run will be analysed", len(spooled))
        return spooled

    def resume(self, key: str) -> Job | None:
        """A spooled frame as a job (from a previous run, or deferred in this one)."""
        try:
            frame = self.state.load_spooled(key)
        except (OSError, ValueError) as err:
            log.error("spooled frame %s cannot be loaded: %s", key, err)
            return None
        return Job(frame, frame.frame_id.partition(":")[0], key)

    def _calibrated(self, frame: Frame, source: str | None = None) -> Frame:
        """The frame with a pixel size from the calibration when its data has none; say so once per source."""
        if self.calibrate is not None:
            frame = self.calibrate(frame)
        if frame.pixel_size_nm is not None or source is None:
            return frame
        with self._said_lock:
            if source in self._without_pixel_size:
                return frame
            self._without_pixel_size.add(source)
        how = ("the calibration has no entry for its magnification, or none is recorded" if self.calibrate is not None
               else "no calibration is configured")
        problem = (f"source {source}: frames arrive without a pixel size (not in the data; {how}); "
                   "they are not resampled and sizes are reported in pixels")
        log.warning("%s (said once per source)", problem)
        warning = pixel_size_warning(frame.frame_id, frame.origin, problem, source=source)
        if self.ledger.new_notices([warning.event_id]):  # a restarted run may meet the same frame first
            self.events.notify([warning])
        return frame

    def admit(self, source: Source, item: Frame | Rejected) -> Job | None:
        """Record an arrival in the ledger; a job when the frame still needs analysing."""
        item = _printable(item)
        if isinstance(item, Rejected):
            self.reject(source.name, item)
            return None
        item = self._calibrated(item, source.name)
        spool = None if source.replayable else self.state.spool(item)
        if not self.ledger.see(item.frame_id, source=source.name, origin=item.origin, spool=spool):
            if spool is not None:
                self.state.unspool(spool)
            self.stats.add(skipped=1)
            return None
        return Job(item, source.name, spool)

    def reject(self, source: str, rejected: Rejected) -> None:
        if self.ledger.is_done(rejected.frame_id):
            self.stats.add(skipped=1)
            return
        self.state.quarantine(rejected.frame_id, rejected.origin, rejected.problem, payload=rejected.payload)
        has_pixels = rejected.pixels is not None
        self._quarantine(rejected.frame_id, source, rejected.origin, rejected.problem, has_pixels=has_pixels)
        if has_pixels and self.archive is not None:  # decoded but refused (NaN pixels): archived whole
            self.archive.offer(Frame(rejected.frame_id, rejected.pixels, origin=rejected.origin), None)

    def _quarantine(self, frame_id: str, source: str, origin: str, problem: str, *, has_pixels: bool = False) -> None:
        events = [error_event(frame_id, origin, problem)]
        archivable = has_pixels and self.archive is not None
        self.ledger.quarantined(frame_id, problem, render(events), source=source, origin=origin, archivable=archivable)
        self.events.publish(frame_id, events)
        self.stats.add(quarantined=1)

    def fail(self, job: Job, problem: str) -> None:
        """The analyser refused the frame: quarantine it (its pixels, for a spooled frame) and archive it whole."""
        log.error("%s", problem)
        self.state.quarantine(job.frame.frame_id, job.frame.origin, problem, spool_key=job.spool)
        self._quarantine(job.frame.frame_id, job.source, job.frame.origin, problem, has_pixels=True)
        if self.archive is not None:
            frame, size = job.frame, job.frame.pixel_size_nm
            if size is not None and not (math.isfinite(size) and size > 0):  # refused as garbage: not archived as one
                frame = dataclasses.replace(frame, pixel_size_nm=None,
                                            meta={**frame.meta, "pixel_size_refused": str(size)})
            self.archive.offer(frame, None)

    def _timed(self, job: Job, phase: str, call: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        try:
            return call()
        finally:
            spent = time.perf_counter() - start
            job.phases[phase] = job.phases.get(phase, 0.0) + spent
            self.stats.charge(phase, spent)

    def prepare(self, job: Job) -> bool:
        """First phase, or the frame sent to the cluster; False (the frame quarantined) when the analyser refuses it.

        The one point where a frame is offloaded: it has waited longer than the offloader allows (see
        `latticewatch.runtime.offload`), and was not sent already (a frame the cluster failed stays here).
        """
        if self.offload is not None and "remote_lost" not in job.phases \
                and self.offload.wants(time.monotonic() - job.arrived):
            job.remote = self.offload.send(job.frame)
            if job.remote is not None:
                return True  # analysed there; `finish` collects it in its turn
        try:
            job.prepared = self._timed(job, "prepare", lambda: self.analyser.prepare(job.frame))
        except FrameError as err:
            self.fail(job, str(err))
            return False
        except Exception as err:  # a bug in a stage must cost one frame, not the daemon
            log.exception("%s: preparation failed", job.frame.frame_id)
            self.fail(job, f"{job.frame.frame_id}: preparation failed: {type(err).__name__}: {err}")
            return False
        return True

    def segment(self, jobs: Sequence[Job]) -> None:
        jobs = [job for job in jobs if job.remote is None]  # an offloaded frame is segmented on the cluster
        if not jobs:
            return
        start = time.perf_counter()
        probabilities = self.analyser.segment_batch([job.prepared for job in jobs])
        share = (time.perf_counter() - start) / len(jobs)
        for job, probability in zip(jobs, probabilities):
            job.probability = probability
            job.phases["segment"] = share
        self.stats.charge("segment", share * len(jobs))
        self.stats.batched(len(jobs))

    def finish(self, job: Job, concluded: Concluded | None = None) -> None:
        """Last phase and the frame's events, then the ledger and the event log (which feeds the sinks).

        ``concluded``: `conclude`'s result, when the runner had the frame concluded already (on its pool).
        """
        if concluded is None:
            analysis = None if job.remote is None else self._collect(job)
            if analysis is None and job.prepared is None:  # the cluster failed it: analysed here, still in its turn
                if not self.prepare(job):
                    return
                self.segment([job])
            concluded = self.conclude(job, analysis)
        if isinstance(concluded, str):
            self.fail(job, concluded)
            return
        self._record(job, *concluded)

    def conclude(self, job: Job, analysis: Analysis | None = None) -> Concluded:
        """The CPU-bound part of `finish`: the analyser's last phase (unless ``analysis`` came from the
        cluster) and the frame's events, or why that failed.

        It writes nothing (ledger, event log, sinks, quarantine), so a runner may conclude several
        frames at once and record each with `finish` in its turn.
        """
        try:
            if analysis is None:
                analysis = self._timed(job, "finish", lambda: self.analyser.finish(job.prepared, job.probability))
            # an analysis outside the published event schema is this frame's failure too
            return analysis, frame_events(job.frame, analysis, self._runner_info(job))
        except Exception as err:
            log.exception("%s: post-processing failed", job.frame.frame_id)
            return f"{job.frame.frame_id}: post-processing failed: {type(err).__name__}: {err}"

    def _collect(self, job: Job) -> Analysis | None:
        """The cluster's analysis of an offloaded frame (None: it failed; the reason is logged)."""
        remote, job.remote = job.remote, None
        analysis = self.offload.collect(job.frame, remote)
        phase = "remote" if analysis is not None else "remote_lost"  # time spent for nothing is shown too
        job.phases[phase] = time.monotonic() - remote.sent_at
        self.stats.charge(phase, job.phases[phase])
        self.stats.add(offloaded=int(analysis is not None))
        return analysis

    def _runner_info(self, job: Job) -> RunnerInfo:
        service_s = sum(job.phases.values())
        return RunnerInfo(phases_s={k: round(v, 6) for k, v in job.phases.items()},
                          latency_s=round(time.monotonic() - job.arrived, 6), budget_ms=self.budget_ms,
                          overrun=self.budget_ms is not None and service_s * 1000 > self.budget_ms)

    def _record(self, job: Job, analysis: Analysis, events: list[FrameEvent | ParticleEvent | WarningEvent]) -> None:
        if analysis.out_of_domain:  # its warning event is among `events`; the log line is for whoever runs the daemon
            log.warning("%s: model out of domain: %s", job.frame.frame_id, "; ".join(analysis.out_of_domain))
        # stamped here, in log order: frames concluded side by side finish in any order, and `events --since
        # TIME` relies on times that rise through the log
        at = now()
        events = [event.model_copy(update={"at": at}) for event in events]
        self.ledger.analysed(job.frame.frame_id, render(events), archivable=self.archive is not None)
        self._timed(job, "publish", lambda: self.events.publish(job.frame.frame_id, events))
        if self.archive is not None:
            self.archive.offer(job.frame, analysis)  # it unspools a stream frame once archived
        elif job.spool is not None:
            self.state.unspool(job.spool)
        self.stats.add(analysed=1, overruns=int(events[0].runner.overrun))

    def process(self, job: Job) -> None:
        """All phases of one frame, in this thread."""
        if self.prepare(job):
            self.segment([job])
            self.finish(job)

    def skip(self, frame_id: str) -> bool:
        """What sources are asked before reading a frame: is it done already?"""
        done = self.ledger.is_done(frame_id)
        if done:
            self.stats.add(skipped=1)
        return done

    def snapshot_sources(self, sources: Sequence[Source]) -> None:
        """Copy the sources' counters (and the archive sink's) into the run's stats."""
        self.stats.snapshot({s.name: dict(s.counters) for s in sources},
                            None if self.archive is None else dict(self.archive.counters))
