"""The archive in the daemon: every published frame archived once, on its own thread, never blocking.

The pipeline offers each published frame (with its analysis) and each quarantined frame that
still has pixels (without one: archived whole) to `ArchiveSink`. A bounded queue feeds one
writer thread, so a slow disk shows up as archive backlog, not as stalled segmentation. The
ledger is the backlog's memory: a frame is marked archived only after the writer's receipt
(the rename is durable), so a frame that found the queue full, arrived while the disk was full,
or was queued when the process stopped stays "published, not archived" and is archived later —
from its spool (streams), the quarantine, or by reading it again from its source (folders).
Such frames are archived whole and lossless: their analysis was published but not kept.

After a kill, before the backlog: the writer removes the temporaries killed writers left in the
root's other (unlocked) sessions, and a backlog frame one of those sessions already holds (renamed
into place just before the kill, unknown to the ledger) is marked archived, not written again.

When the archive becomes unavailable (disk full, permission denied, read-only or failing
storage) the sink publishes ONE error event, counts the outage, and keeps consuming: analysis
and publishing go on, sources are never touched. The writer backs off; the sink retries when the
backoff ends, and on success archives the backlog by itself.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from latticewatch.frame import Analysis, Frame
from latticewatch.io.readers import ReadError
from latticewatch.models.manifest import ArchiveRules
from latticewatch.runtime.eventlog import EventLog
from latticewatch.runtime.ledger import Ledger
from latticewatch.runtime.store import StateDir, entry_key
from latticewatch.sinks.archive import ArchiveUnavailable, ArchiveWriter, UncertaintyRule
from latticewatch.sinks.events import archive_error_event
from latticewatch.sources.base import Source, printable

log = logging.getLogger(__name__)

#: Longest the writer thread sleeps while idle: how soon the backlog is looked at again.
IDLE_S = 0.2


def open_session_writer(root: str | Path, prefix: str, rules: ArchiveRules, *, policy: str, margin_nm: float,
                        reduce: bool, **settings: Any) -> ArchiveWriter:
    """An `ArchiveWriter` for a new session ``<prefix>-<UTC time>`` under ``root``, with a profile's rules.

    The profile decides which class is low-value and when a segmentation is too uncertain to
    reduce (its manifest's ``archive`` section); ``settings`` go to the writer unchanged.

    Examples
    --------
    >>> import tempfile
    >>> rules = ArchiveRules()
    >>> writer = open_session_writer(tempfile.mkdtemp(), "run", rules, policy="drop", margin_nm=0.5, reduce=True)
    >>> writer.session.startswith("run-"), writer.low_value_class
    (True, 0)
    """
    session = f"{prefix}-" + datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return ArchiveWriter(root, session, policy, margin_nm, reduce=reduce, low_value_class=rules.low_value_class,
                         uncertainty=UncertaintyRule(min_mean_confidence=rules.min_mean_confidence), **settings)


@dataclass(frozen=True)
class _Offer:
    frame: Frame
    analysis: Analysis | None


_STOP = object()


class ArchiveSink:
    """Archives what the pipeline published, on its own thread; the ledger keeps the backlog.

    Parameters
    ----------
    writer
        The session's writer.
    ledger, events, state
        The daemon's ledger, event log and state directory (spool, quarantine).
    queue_size
        Frames waiting for the writer; when full, an offered frame stays in the backlog.
    calibrate
        Applied to frames read again from their source (their pixel size, as the pipeline saw it).

    Attributes
    ----------
    counters
        ``archived`` (receipts), ``from_backlog`` (of which read again), ``queue_full`` (offers
        left to the backlog), ``outages`` (times the archive became unavailable; one error event
        each), ``failed`` (frames the writer refused for other reasons), ``lost`` (backlog frames
        whose pixels were gone), ``already_archived`` (backlog frames found in a session an earlier,
        killed run wrote just before the ledger heard of it: marked archived, not written again).

    Examples
    --------
    >>> sink = ArchiveSink(writer, pipeline.ledger, pipeline.events, pipeline.state)  # doctest: +SKIP
    >>> sink.start({"incoming": folder_source}); sink.offer(frame, analysis); sink.close()  # doctest: +SKIP
    """

    name = "archive"

    def __init__(self, writer: ArchiveWriter, ledger: Ledger, events: EventLog, state: StateDir, *, queue_size: int = 4,
                 calibrate: Callable[[Frame], Frame] = lambda frame: frame) -> None:
        self.writer = writer
        self.ledger = ledger
        self.events = events
        self.state = state
        self.calibrate = calibrate
        self.batch = queue_size
        self.counters = dict.fromkeys(("archived", "from_backlog", "queue_full", "outages", "failed", "lost",
                                       "already_archived"), 0)
        self._queue: queue.Queue = queue.Queue(queue_size)
        self._sources: Mapping[str, Source] = {}
        self._thread: threading.Thread | None = None
        self._backlog_due = True  # what an earlier run left is archived first
        self._paused = False
        self._retry_at = 0.0
        self._passed: set[str] = set()  # backlog frames not to try again in this run

    # -- the pipeline's side ------------------------------------------------------------------

    def start(self, sources: Mapping[str, Source]) -> None:
        """Start the writer thread; ``sources`` read backlog frames again by id (``reread``)."""
        self._sources = sources
        self._thread = threading.Thread(target=self._loop, name="latticewatch-archive", daemon=True)
        self._thread.start()

    def offer(self, frame: Frame, analysis: Analysis | None) -> None:
        """Queue a published frame without waiting; a full queue leaves it to the backlog."""
        try:
            self._queue.put_nowait(_Offer(frame, analysis))
        except queue.Full:
            self.counters["queue_full"] += 1
            self._backlog_due = True

    def backlog(self) -> int:
        """Frames published but not yet archived (this run's and earlier runs')."""
        return len(self.ledger.unarchived())

    def queued(self) -> int:
        """Frames offered and waiting for the writer thread (the queue's depth, for metrics)."""
        return self._queue.qsize()

    def close(self) -> None:
        """Archive what is queued, stop the thread, consolidate the session; the backlog waits for the next run."""
        if self._thread is not None:
            if self._thread.is_alive():  # a dead writer thread would never take the stop
                self._queue.put(_STOP)
            self._thread.join()
            self._thread = None
        self.writer.close()

    # -- the writer thread --------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException:  # the ledger or event log failed: the runner's own use of them stops the daemon
            log.critical("archive thread failed; archiving stopped (the ledger keeps the backlog)", exc_info=True)

    def _adopt_earlier(self) -> None:
        """Before the backlog: tidy killed sessions; a backlog frame one of them holds is archived already."""
        held = self.writer.tidy_stale_sessions([frame_id for frame_id, _source in self.ledger.unarchived()])
        for frame_id in held:
            self.ledger.archived(frame_id)
            self.state.unspool(entry_key(frame_id))
        if held:
            log.info("archive: %d frame(s) of the backlog were archived before the last stop; not archived again",
                     len(held))
        self.counters["already_archived"] += len(held)

    def _serve(self) -> None:
        self._adopt_earlier()
        while True:
            try:
                item = self._queue.get(timeout=IDLE_S)
            except queue.Empty:
                item = None
            if item is _STOP:
                return
            if item is None:
                if self._backlog_due and time.monotonic() >= self._retry_at:
                    self._drain_backlog()
            elif not self.ledger.is_archived(item.frame.frame_id):
                # a frame published but not yet offered is in the backlog too, and may have been archived from it
                self._archive(item.frame, item.analysis)

    def _drain_backlog(self) -> None:
        rows = self.ledger.unarchived(limit=len(self._passed) + self.batch)
        todo = [row for row in rows if row[0] not in self._passed]
        if not todo:
            self._backlog_due = False
            return
        for frame_id, source in todo:
            if not self._queue.empty():
                return  # live frames first: they carry their analysis and reduce
            frame = self._reload(frame_id, source)
            if frame is not None and not self._archive(frame, None, backlog=True):
                return  # unavailable: wait for the writer's backoff

    def _reload(self, frame_id: str, source: str) -> Frame | None:
        """A backlog frame's pixels from the spool, the quarantine or its source; None if not now or never."""
        try:
            frame = self.state.load_kept(frame_id)
            if frame is None:
                found = self._sources.get(source)
                if found is None:
                    # its source is not configured in this run; it may be again in a later one
                    log.warning("archive: %s waits for source %r, which is not configured", frame_id, source)
                    self._passed.add(frame_id)
                    return None
                reread = getattr(found, "reread", None)  # live streams cannot: their frames were spooled
                frame = reread(frame_id) if reread is not None else None
                frame = self.calibrate(frame) if frame is not None else None
            problem = "its pixels are no longer there"
        except ReadError as err:  # pixels it refused to analyse (NaN …) are still archived whole
            pixels = err.pixels
            frame = None if pixels is None else Frame(frame_id, pixels, origin=printable(err.path))
            problem = str(err)
        except FileNotFoundError as err:
            frame, problem = None, str(err)
        except OSError as err:  # transient (NFS, a writer's lock on SMB): try again in the next run
            log.warning("archive: cannot read %s again now: %s", frame_id, err)
            self._passed.add(frame_id)
            return None
        if frame is None:
            log.warning("archive: %s cannot be archived: %s (its analysis and events are kept)", frame_id, problem)
            self.ledger.unarchivable(frame_id)
            self.counters["lost"] += 1
        return frame

    def _archive(self, frame: Frame, analysis: Analysis | None, *, backlog: bool = False) -> bool:
        provenance = {"written_by": "latticewatch run"}
        if backlog:
            provenance["note"] = "archived from the backlog: whole and lossless; the analysis is in the frame's events"
        try:
            self.writer.write(frame, analysis, provenance)
        except ArchiveUnavailable as err:
            self._backlog_due = True
            self._retry_at = time.monotonic() + err.retry_in_s
            if not self._paused:
                self._paused = True
                self.counters["outages"] += 1
                self._report_outage(frame, err)
            return False
        except Exception:  # a frame the writer cannot encode, a locked session: this frame only
            log.exception("archive: %s could not be archived", frame.frame_id)
            self.counters["failed"] += 1
            self._passed.add(frame.frame_id)
            return True
        self.ledger.archived(frame.frame_id)
        self.state.unspool(entry_key(frame.frame_id))  # a stream frame's pixels were kept for this
        self.counters["archived"] += 1
        self.counters["from_backlog"] += int(backlog)
        if self._paused:
            self._paused = False
            log.warning("archive: resumed; archiving the frames published meanwhile")
        return True

    def _report_outage(self, frame: Frame, err: ArchiveUnavailable) -> None:
        """The one error event of an outage, on the frame that found the archive unavailable."""
        problem = (f"not archived ({err.reason}): {err}; archiving is paused, analysis and publishing "
                   "continue, and it retries by itself and archives the frames it missed")
        event = archive_error_event(frame.frame_id, frame.origin, problem, reason=err.reason, retry_in_s=err.retry_in_s)
        if self.ledger.new_notices([event.event_id]):  # the same frame may find the archive down after a restart
            self.events.notify([event])
