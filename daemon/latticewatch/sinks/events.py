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

    def __init__(self, path: str | Path, ledger: Ledger) -> None:
        self.path = Path(path)
        self.ledger = ledger
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

    def notify(self, text: str) -> None:
        """Append events that are not a frame's analysis (archive trouble, warnings); no frame changes state.

        A crash before the ledger records the new length cuts them on restart: they are notices
        about the running process, not results.
        """
        with self._lock:
            self.ledger.events_appended(self._append(text))

    def _append(self, text: str) -> int:
        with open(self.path, "ab") as fh:
            fh.write(text.encode())
            fh.flush()
            os.fsync(fh.fileno())
            return fh.tell()
