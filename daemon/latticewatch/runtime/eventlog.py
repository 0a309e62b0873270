"""The durable event log ``<state dir>/events.jsonl``, kept consistent with the ledger, and the sinks it feeds.

The log is append-only JSON lines. A frame's events are rendered once (when it is analysed),
stored in the ledger, then appended to the log and fsynced; the ledger then records the log's
new length. After a crash the log is cut back to the last recorded length and unpublished
frames are appended again, so no event appears twice.

Once an append is durable, the log hands its typed events to every sink (ZeroMQ publisher,
metrics, dashboard), in log order. A sink that raises is logged and counted; it never stops the
log or the pipeline.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from datetime import timezone
from pathlib import Path

from latticewatch.io.jsonio import parse_timestamp
from latticewatch.runtime.ledger import Ledger
from latticewatch.sinks.events import DEFECT_LABEL, Event, Sink, parse, render

log = logging.getLogger(__name__)


class EventLog:
    """The append-only ``events.jsonl``, kept consistent with the ledger, feeding the sinks.

    Parameters
    ----------
    path
        The log file (created when missing).
    ledger
        Where frames' rendered events are stored and the log's committed length is recorded.
    sinks
        Consumers of the events once durable; called under the log's lock, so they see events
        in log order. They must not block.
    on_sink_error
        Called (with the sink) after a sink raised, for the run's counters.

    Examples
    --------
    >>> import tempfile
    >>> from latticewatch.sinks.events import error_event
    >>> root = Path(tempfile.mkdtemp())
    >>> ledger = Ledger(root / "ledger.sqlite")
    >>> events = EventLog(root / "events.jsonl", ledger)
    >>> _ = ledger.see("m:0", source="m", origin="")
    >>> bad = [error_event("m:0", "", "bad")]
    >>> ledger.quarantined("m:0", "bad", render(bad))
    >>> events.publish("m:0", bad)
    >>> sum(1 for _ in open(root / "events.jsonl"))
    1
    """

    def __init__(self, path: str | Path, ledger: Ledger, *, sinks: Sequence[Sink] = (),
                 on_sink_error: Callable[[Sink], None] | None = None) -> None:
        self.path = Path(path)
        self.ledger = ledger
        self.sinks = tuple(sinks)
        self.on_sink_error = on_sink_error
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch()
        # Appends and the ledger's record of the log's length must happen in the same order, or
        # a later, shorter length could be committed after a longer one and cut events on restart.
        self._lock = threading.Lock()

    def recover(self) -> int:
        """Cut the log back to its committed length and publish what was stored but not logged.

        Returns the number of frames published here.
        """
        end = self.ledger.events_end()
        size = self.path.stat().st_size
        if size > end:
            log.warning("event log has %d bytes written after the last committed frame (a crash); cutting them",
                        size - end)
            with open(self.path, "r+b") as fh:
                fh.truncate(end)
                os.fsync(fh.fileno())
        elif size < end:
            # the log was truncated or replaced by hand: never cut the ledger's history, just note it
            log.warning("event log is %d bytes shorter than the ledger recorded", end - size)
        pending = self.ledger.unpublished()
        for frame_id, text in pending:
            try:
                events = parse(text)
            except ValueError as err:  # stored by another version: the log still gets it as it was stored
                log.error("%s: stored events are not events of this version (%s); logged, not sent to the sinks",
                          frame_id, err)
                events = []
            with self._lock:
                self.ledger.published(frame_id, self._append(text))
                self._tell(events)
        return len(pending)

    def publish(self, frame_id: str, events: Sequence[Event]) -> None:
        """Append one frame's events (as stored in the ledger), fsync, record the new length, tell the sinks."""
        with self._lock:
            self.ledger.published(frame_id, self._append(render(events)))
            self._tell(events)

    def notify(self, events: Sequence[Event]) -> None:
        """Append events that are not a frame's analysis (archive trouble, warnings); no frame changes state.

        A crash before the ledger records the new length cuts them on restart: they are notices
        about the running process, not results.
        """
        with self._lock:
            self.ledger.events_appended(self._append(render(events)))
            self._tell(events)

    def _tell(self, events: Sequence[Event]) -> None:
        if not events:
            return
        for sink in self.sinks:
            try:
                sink.consume(events)
            except Exception:  # a live consumer never stops the durable log
                log.exception("sink %s failed on %s", getattr(sink, "name", sink), events[0].event_id)
                if self.on_sink_error is not None:
                    self.on_sink_error(sink)

    def _append(self, text: str) -> int:
        with open(self.path, "ab") as fh:
            fh.write(text.encode())
            fh.flush()
            os.fsync(fh.fileno())
            return fh.tell()


def read_log(path: str | Path, *, since: str | None = None, types: Sequence[str] = ()) -> Iterator[str]:
    """Lines of an event log after ``since``, optionally only some event types (``latticewatch events``).

    ``since`` is an event id (the events after it) or an ISO 8601 time (events rendered at or after
    it; a time without a zone is UTC). ``types`` are event types (``frame``, ``particle``, ``error``,
    ``warning``) or ``defect`` (particles labelled ``stacking_fault``); empty means all. Lines are
    printed exactly as logged, so they are filtered as plain JSON, not as events of this version.

    Examples
    --------
    >>> import tempfile
    >>> from latticewatch.sinks.events import error_event
    >>> path = Path(tempfile.mkdtemp()) / "events.jsonl"
    >>> _ = path.write_text(render([error_event("a", "", "x"), error_event("b", "", "y")]))
    >>> [json.loads(line)["frame_id"] for line in read_log(path, since="a/error")]
    ['b']
    """
    after_id = None
    not_before = None
    if since is not None:
        try:
            t = parse_timestamp(since)
            not_before = t if t.tzinfo else t.replace(tzinfo=timezone.utc)
        except ValueError:
            after_id = since
    wanted = set(types)
    started = after_id is None
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            event = json.loads(line)
            if not started:
                started = event.get("event_id") == after_id
                continue
            if not_before is not None and parse_timestamp(event["at"]) < not_before:
                continue
            kind = event.get("type")
            defect = kind == "particle" and event.get("label") == DEFECT_LABEL
            if wanted and not (kind in wanted or ("defect" in wanted and defect)):
                continue
            yield line if line.endswith("\n") else line + "\n"
    if not started:
        raise KeyError(f"no event with id {after_id!r} in {path} (give an event id or an ISO 8601 time)")
