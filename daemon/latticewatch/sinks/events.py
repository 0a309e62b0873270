"""Events: what the daemon tells the world about each frame, and the durable log they go to.

Each analysed frame gives one ``frame`` event and one ``particle`` event per region; input that
cannot be analysed gives one ``error`` event. Event ids are deterministic, so a consumer can
de-duplicate across restarts:

* ``<frame_id>/frame``
* ``<frame_id>/region/<region index>``
* ``<frame_id>/error``

The event log ``<state dir>/events.jsonl`` is append-only JSON lines. A frame's events are
rendered once (when it is analysed), stored in the ledger, then appended to the log and fsynced;
the ledger then records the log's new length. After a crash the log is cut back to the last
recorded length and unpublished frames are appended again, so no event appears twice.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from latticewatch.frame import Analysis, Frame
from latticewatch.runtime.ledger import Ledger
from latticewatch.sinks.reports import _json_default, frame_report

log = logging.getLogger("latticewatch.sinks.events")


class Sink(Protocol):
    """Consumes finished analyses (ZMQ publisher, metrics, dashboard, archive …).

    ``consume`` must not block for long: a slow consumer drops or queues on its own side. An
    exception is logged and counted by the runner; it never stops the pipeline.
    """

    name: str

    def consume(self, frame: Frame, analysis: Analysis) -> None: ...


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def frame_events(frame: Frame, analysis: Analysis) -> list[dict[str, Any]]:
    """The ``frame`` event and one ``particle`` event per region.

    Examples
    --------
    >>> events = frame_events(frame, analysis)  # doctest: +SKIP
    >>> [e["event_id"] for e in events][:2]  # doctest: +SKIP
    ['incoming:stack.mrc#0/frame', 'incoming:stack.mrc#0/region/0']
    """
    report = frame_report(frame, analysis)
    regions = report.pop("regions")
    at = _now()
    head = {"event_id": f"{frame.frame_id}/frame", "type": "frame", "at": at, **report}
    particles = [
        {"event_id": f"{frame.frame_id}/region/{r['region_id']}", "type": "particle", "at": at, "frame_id": frame.frame_id, **r}
        for r in regions
    ]
    return [head, *particles]


def error_event(frame_id: str, origin: str, problem: str, *, event_type: str = "error", id_suffix: str = "error",
                **details: Any) -> dict[str, Any]:
    """The ``error`` event of input that cannot be analysed, or another notice about a frame.

    ``id_suffix`` keeps notices about the same frame distinct (``archive-error`` when the archive
    became unavailable while writing it; ``pixel-size`` for the ``warning`` that a source's frames
    have no pixel size).

    Examples
    --------
    >>> error_event("cam:malformed:ab12", "pull tcp://127.0.0.1:5555", "header is not JSON")["event_id"]
    'cam:malformed:ab12/error'
    >>> error_event("cam:s#3", "", "disk full", id_suffix="archive-error")["event_id"]
    'cam:s#3/archive-error'
    """
    return {"event_id": f"{frame_id}/{id_suffix}", "type": event_type, "at": _now(), "frame_id": frame_id, "origin": origin,
            "problem": problem, **details}


def render(events: list[dict[str, Any]]) -> str:
    """Events as JSON lines (the exact text stored in the ledger and appended to the log)."""
    return "".join(json.dumps(e, default=_json_default, separators=(",", ":")) + "\n" for e in events)


class EventLog:
    """The append-only ``events.jsonl``, kept consistent with the ledger.

    Examples
    --------
    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> ledger = Ledger(root / "ledger.sqlite")
    >>> events = EventLog(root / "events.jsonl", ledger)
    >>> _ = ledger.see("m:0", source="m", origin="")
    >>> ledger.quarantined("m:0", "bad", render([error_event("m:0", "", "bad")]))
    >>> events.publish("m:0", ledger.unpublished()[0][1])
    >>> sum(1 for _ in open(root / "events.jsonl"))
    1
    """

    def __init__(self, path: str | Path, ledger: Ledger, *, listeners: Sequence[Callable[[str], None]] = ()) -> None:
        self.path = Path(path)
        self.ledger = ledger
        # Live consumers (ZMQ publisher, metrics) get exactly the text appended, once it is durable;
        # they are called under the lock, so they see events in log order. They must not block.
        self.listeners = list(listeners)
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
            log.warning("event log has %d bytes written after the last committed frame (a crash); cutting them", size - end)
            with open(self.path, "r+b") as fh:
                fh.truncate(end)
                os.fsync(fh.fileno())
        elif size < end:
            # the log was truncated or replaced by hand: never cut the ledger's history, just note it
            log.warning("event log is %d bytes shorter than the ledger recorded", end - size)
        pending = self.ledger.unpublished()
        for frame_id, text in pending:
            self.publish(frame_id, text)
        return len(pending)

    def publish(self, frame_id: str, text: str) -> None:
        """Append one frame's events, fsync, and record the new length in the ledger."""
        with self._lock:
            self.ledger.published(frame_id, self._append(text))
            self._tell(text)

    def notify(self, text: str) -> None:
        """Append events that are not a frame's analysis (archive trouble, warnings); no frame changes state.

        A crash before the ledger records the new length cuts them on restart: they are notices
        about the running process, not results.
        """
        with self._lock:
            self.ledger.events_appended(self._append(text))
            self._tell(text)

    def _tell(self, text: str) -> None:
        for listener in self.listeners:
            try:
                listener(text)
            except Exception:  # a live consumer never stops the durable log
                log.exception("event listener %r failed", listener)

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
    ``warning``) or ``defect`` (particles labelled ``stacking_fault``); empty means all.

    Examples
    --------
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "events.jsonl"
    >>> _ = path.write_text(render([error_event("a", "", "x"), error_event("b", "", "y")]))
    >>> [json.loads(line)["frame_id"] for line in read_log(path, since="a/error")]
    ['b']
    """
    after_id = None
    not_before = None
    if since is not None:
        try:
            t = datetime.fromisoformat(since)
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
            if not_before is not None and datetime.fromisoformat(event["at"]) < not_before:
                continue
            if wanted and not (event.get("type") in wanted or ("defect" in wanted and is_defect(event))):
                continue
            yield line if line.endswith("\n") else line + "\n"
    if not started:
        raise KeyError(f"no event with id {after_id!r} in {path} (give an event id or an ISO 8601 time)")


def is_defect(event: dict[str, Any]) -> bool:
    """A particle event of a stacking-fault particle (published again on the ``defect`` topic)."""
    return event.get("type") == "particle" and event.get("label") == "stacking_fault"
