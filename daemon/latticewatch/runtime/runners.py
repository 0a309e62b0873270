"""Runners: wire sources → analyser phases → ledger, event log and sinks.

One interface (``run(sources, stop) -> RunStats``), two implementations sharing the per-frame
work in `Pipeline`:

* `InlineRunner`: one thread, deterministic; sources are drained one after another. Tests and
  scripts use it.
* `PipelinedRunner`: the daemon's. A thread per source, then three stage threads joined by
  bounded queues: prepare (validate, median, normalise, resample) → segment (the U-Net) →
  finish (isolate, features, classify, ledger, event log, sinks).

Timing is middleware: the runner measures each phase around the analyser's calls (never inside
stage code), plus the time each frame spent waiting, and charges them to the frame. A frame
whose phases took longer than ``budget_ms`` in total is an *overrun* (counted, and marked in its
frame event).

When behind, the pipelined runner degrades in this order — it never drops a frame:

1. **Batch larger.** The segment thread takes every prepared frame waiting (up to
   ``max_batch``) and runs same-shape frames through the network in one call.
2. **Analyse later.** Stream frames (non-replayable sources; already spooled to disk on arrival)
   that find the prepare queue full are *deferred*: their pixels leave memory, and they are
   analysed, oldest first, whenever the prepare queue runs empty — live frames go first. Folder
   frames are not deferred: the source simply waits, the files stay on disk.
3. **Never drop.** Deferred frames survive a restart (ledger ``seen`` + spool) and are analysed
   then.

A bad frame sinks alone: an analyser error quarantines that frame with its reason and an error
event. Only the ledger, event log or state directory failing stops the runner (it re-raises).

The sinks (ZeroMQ publisher, metrics, dashboard) are fed by the event log
(`latticewatch.runtime.eventlog.EventLog`): they get each frame's typed events once they are durable.

The archive (optional) is fed after publication and runs on its own thread
(`latticewatch.runtime.archiving`); the archive being slow or unavailable never stops a phase.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from latticewatch.frame import Analysis, Frame, Rejected
from latticewatch.errors import FrameError
from latticewatch.runtime.analyser import Analyser, Prepared
from latticewatch.runtime.ledger import Ledger
from latticewatch.runtime.store import StateDir
from latticewatch.runtime.archiving import ArchiveSink
from latticewatch.runtime.eventlog import EventLog
from latticewatch.sinks.archive import ArchiveWriter
from latticewatch.sinks.events import (
    FrameEvent, ParticleEvent, RunnerInfo, Sink, error_event, frame_events, pixel_size_warning, render,
)
from latticewatch.sources.base import Source, StopFlag

log = logging.getLogger("latticewatch.runtime.runners")


@dataclass
class RunStats:
    """What a run did; counters only increase. Thread-safe through `add`."""

    analysed: int = 0
    quarantined: int = 0
    skipped: int = 0  # arrived again but already done (restart catch-up, duplicate message)
    overruns: int = 0  # frames whose phases took longer than budget_ms
    deferred: int = 0  # stream frames moved out of memory because the pipeline was behind
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


class Runner(Protocol):
    def run(self, sources: Sequence[Source], stop: StopFlag) -> RunStats: ...


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

    Examples
    --------
    >>> pipeline = Pipeline(Analyser("nanoparticles"), StateDir("/tmp/lw-state"))  # doctest: +SKIP
    >>> InlineRunner(pipeline).run([MemorySource([image])], threading.Event()).analysed  # doctest: +SKIP
    1
    """

    def __init__(self, analyser: Analyser, state: StateDir, *, sinks: Sequence[Sink] = (),
                 budget_ms: float | None = None, archive: ArchiveWriter | None = None, archive_queue: int = 4,
                 calibrate: Callable[[Frame], Frame] | None = None) -> None:
        self.analyser = analyser
        self.state = state
        self.stats = RunStats()
        self.ledger = Ledger(state.ledger_path)
        self.events = EventLog(state.events_path, self.ledger, sinks=sinks,
                               on_sink_error=lambda _sink: self.stats.add(sink_errors=1))
        self.budget_ms = budget_ms
        self.calibrate = calibrate
        self._without_pixel_size: set[str] = set()  # sources already reported
        self._said_lock = threading.Lock()
        self.archive = None if archive is None else ArchiveSink(
            archive, self.ledger, self.events, state, queue_size=archive_queue, calibrate=self._calibrated)

    def close(self) -> None:
        """Archive what is queued for it (the rest stays in the backlog), then close the ledger."""
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
        self.events.notify([pixel_size_warning(frame.frame_id, frame.origin, problem, source=source)])
        return frame

    def admit(self, source: Source, item: Frame | Rejected) -> Job | None:
        """Record an arrival in the ledger; a job when the frame still needs analysing."""
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
        self._quarantine(rejected.frame_id, source, rejected.origin, rejected.problem)

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
            self.archive.offer(job.frame, None)

    def _timed(self, job: Job, phase: str, call: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        try:
            return call()
        finally:
            spent = time.perf_counter() - start
            job.phases[phase] = job.phases.get(phase, 0.0) + spent
            self.stats.charge(phase, spent)

    def prepare(self, job: Job) -> bool:
        """First phase; False (and the frame quarantined) when the analyser refuses it."""
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
        start = time.perf_counter()
        probabilities = self.analyser.segment_batch([job.prepared for job in jobs])
        share = (time.perf_counter() - start) / len(jobs)
        for job, probability in zip(jobs, probabilities):
            job.probability = probability
            job.phases["segment"] = share
        self.stats.charge("segment", share * len(jobs))
        if len(jobs) > 1:
            self.stats.add(batches=1, batched_frames=len(jobs))
            with self.stats._lock:
                self.stats.largest_batch = max(self.stats.largest_batch, len(jobs))

    def finish(self, job: Job) -> None:
        """Last phase and the frame's events, then the ledger and the event log (which feeds the sinks)."""
        try:
            analysis = self._timed(job, "finish", lambda: self.analyser.finish(job.prepared, job.probability))
            # an analysis outside the published event schema is this frame's failure too
            events = frame_events(job.frame, analysis, self._runner_info(job))
        except Exception as err:
            log.exception("%s: post-processing failed", job.frame.frame_id)
            self.fail(job, f"{job.frame.frame_id}: post-processing failed: {type(err).__name__}: {err}")
            return
        self._record(job, analysis, events)

    def _runner_info(self, job: Job) -> RunnerInfo:
        service_s = sum(job.phases.values())
        return RunnerInfo(phases_s={k: round(v, 6) for k, v in job.phases.items()},
                          latency_s=round(time.monotonic() - job.arrived, 6), budget_ms=self.budget_ms,
                          overrun=self.budget_ms is not None and service_s * 1000 > self.budget_ms)

    def _record(self, job: Job, analysis: Analysis, events: list[FrameEvent | ParticleEvent]) -> None:
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
        with self.stats._lock:
            self.stats.sources = {s.name: dict(s.counters) for s in sources}
            if self.archive is not None:
                self.stats.archive = dict(self.archive.counters)


class InlineRunner:
    """Everything in the calling thread, one frame at a time; sources drained one after another.

    Examples
    --------
    >>> stats = InlineRunner(pipeline).run([MemorySource([image])], threading.Event())  # doctest: +SKIP
    """

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    def run(self, sources: Sequence[Source], stop: StopFlag) -> RunStats:
        p = self.pipeline
        for key in p.recover(sources):
            job = p.resume(key)
            if job is not None:
                p.stats.add(resumed=1)
                p.process(job)
        for source in sources:
            for item in source.frames(stop, p.skip):
                job = p.admit(source, item)
                if job is not None:
                    p.process(job)
                if stop.is_set():
                    break
        p.snapshot_sources(sources)
        return p.stats


_DONE = object()


class _AnyOf:
    """A stop flag that is set when any of its flags is."""

    def __init__(self, *flags: StopFlag) -> None:
        self.flags = flags

    def is_set(self) -> bool:
        return any(f.is_set() for f in self.flags)


class PipelinedRunner:
    """Threads and bounded queues between prepare, segment and finish (see the module docs).

    On ``stop`` the sources end, frames already queued are finished, and deferred frames stay
    spooled for the next run. When every source ends by itself, deferred frames are analysed
    before `run` returns.

    Parameters
    ----------
    pipeline
        The shared per-frame work.
    queue_size
        Capacity of each queue between phases.
    max_batch
        Most frames segmented in one network call when behind.

    Examples
    --------
    >>> stats = PipelinedRunner(pipeline).run([FolderSource("incoming")], stop)  # doctest: +SKIP
    """

    def __init__(self, pipeline: Pipeline, *, queue_size: int = 4, max_batch: int = 4) -> None:
        self.pipeline = pipeline
        self.queue_size = queue_size
        self.max_batch = max_batch
        self._to_prepare: queue.Queue = queue.Queue(queue_size)
        self._to_segment: queue.Queue = queue.Queue(queue_size)
        self._to_finish: queue.Queue = queue.Queue(queue_size)
        self._deferred: collections.deque[str] = collections.deque()
        self._sources_done = threading.Event()
        self._fatal = threading.Event()
        self._failure: BaseException | None = None
        self._halt: StopFlag = self._fatal

    def run(self, sources: Sequence[Source], stop: StopFlag) -> RunStats:
        p = self.pipeline
        resumed = p.recover(sources)
        self._deferred.extend(resumed)
        p.stats.add(resumed=len(resumed))
        self._halt = _AnyOf(stop, self._fatal)
        pumps = [self._thread(f"source-{s.name}", self._pump, s) for s in sources]
        stages = [self._thread(name, loop) for name, loop in
                  (("prepare", self._prepare_loop), ("segment", self._segment_loop), ("finish", self._finish_loop))]
        for t in (*pumps, *stages):
            t.start()
        for t in pumps:
            t.join()
        self._sources_done.set()
        for t in stages:
            while t.is_alive() and not self._fatal.is_set():
                t.join(0.2)
        p.snapshot_sources(sources)
        if self._failure is not None:
            raise self._failure
        return p.stats

    def queue_depths(self) -> dict[str, int]:
        """Frames waiting before each phase, and deferred (for status events and metrics)."""
        return {"prepare": self._to_prepare.qsize(), "segment": self._to_segment.qsize(),
                "finish": self._to_finish.qsize(), "deferred": len(self._deferred)}

    def _thread(self, name: str, target: Callable, *args) -> threading.Thread:
        def guarded() -> None:
            try:
                target(*args)
            except BaseException as err:  # ledger/event log/state dir failures: stop loudly
                log.critical("%s thread failed: %s", name, err, exc_info=True)
                self._failure = self._failure or err
                self._fatal.set()

        return threading.Thread(target=guarded, name=f"latticewatch-{name}", daemon=True)

    def _put(self, q: queue.Queue, item: object) -> bool:
        """Blocking put that gives up when another thread failed (so nothing hangs on a dead consumer)."""
        while not self._fatal.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _pump(self, source: Source) -> None:
        p = self.pipeline
        for item in source.frames(self._halt, p.skip):
            job = p.admit(source, item)
            if job is None:
                continue
            if job.spool is None:
                # a folder waits when the pipeline is full: its files stay on disk
                while not self._halt.is_set():
                    try:
                        self._to_prepare.put(job, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                continue
            try:
                self._to_prepare.put_nowait(job)
            except queue.Full:
                self._deferred.append(job.spool)  # degrade step 2: the pixels are on disk; memory is freed
                p.stats.add(deferred=1)

    def _prepare_loop(self) -> None:
        p = self.pipeline
        while not self._fatal.is_set():
            try:
                job = self._to_prepare.get(timeout=0.05)
            except queue.Empty:
                if self._deferred and not self._halt.is_set():
                    job = p.resume(self._deferred.popleft())  # analyse later: only when live frames leave room
                    if job is None:
                        continue
                elif self._sources_done.is_set():
                    break
                else:
                    continue
            if p.prepare(job) and not self._put(self._to_segment, job):
                return
        self._put(self._to_segment, _DONE)

    def _segment_loop(self) -> None:
        while not self._fatal.is_set():
            job = self._to_segment.get()
            if job is _DONE:
                break
            batch = [job]
            done = False
            while len(batch) < self.max_batch:  # degrade step 1: whatever is waiting goes together
                try:
                    more = self._to_segment.get_nowait()
                except queue.Empty:
                    break
                if more is _DONE:
                    done = True
                    break
                batch.append(more)
            self.pipeline.segment(batch)
            for j in batch:
                if not self._put(self._to_finish, j):
                    return
            if done:
                break
        self._put(self._to_finish, _DONE)

    def _finish_loop(self) -> None:
        while not self._fatal.is_set():
            job = self._to_finish.get()
            if job is _DONE:
                break
            self.pipeline.finish(job)
