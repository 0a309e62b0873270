"""The daemon's progress on the terminal: a line per frame (``-v``) or a status line every few seconds.

`ProgressReporter` is a `~latticewatch.sinks.events.Sink`: it counts the frame and error events
the pipeline publishes and, given the pipeline and the runner (`attach`), reads how many frames
wait in the queues. Its lines go to the ``latticewatch.runtime.progress`` logger at INFO, so they
land wherever the daemon's log goes (stderr, the journal under systemd); ``latticewatch run``
enables that logger at its default verbosity. Nothing is printed while nothing happens.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from latticewatch.sinks.events import ErrorEvent, Event, FrameEvent

log = logging.getLogger(__name__)

#: Seconds between status lines while frames arrive or wait.
STATUS_INTERVAL_S = 10.0


def frame_line(event: FrameEvent) -> str:
    """One analysed frame in a line: id, particles, defect fraction, processing time.

    Examples
    --------
    >>> from latticewatch.sinks.events import FrameEvent
    >>> event = FrameEvent.model_construct(frame_id="scope:grid1.mrc#3", particles=14, defect_fraction=0.214,
    ...                                    seconds=0.412, out_of_domain=[])
    >>> frame_line(event)
    'scope:grid1.mrc#3: 14 particles, defect fraction 0.21, 412 ms'
    """
    defect = "–" if event.defect_fraction is None else f"{event.defect_fraction:.2f}"
    line = f"{event.frame_id}: {event.particles} particles, defect fraction {defect}, {event.seconds * 1000:.0f} ms"
    return f"{line}, out of the model's domain" if event.out_of_domain else line


class ProgressReporter:
    """Logs each frame (``per_frame``) and, every ``interval_s`` (0: never) while there is something to say, a
    status line (`STATUS_INTERVAL_S` by default).

    Examples
    --------
    >>> reporter = ProgressReporter(per_frame=True)
    >>> stats = run_daemon(config, stop, sinks=[reporter])  # doctest: +SKIP
    >>> reporter.close()
    """

    name = "progress"

    def __init__(self, *, per_frame: bool = False, interval_s: float | None = None) -> None:
        self.per_frame = per_frame
        self.interval_s = STATUS_INTERVAL_S if interval_s is None else interval_s
        self.frames = 0
        self.errors = 0
        self._lock = threading.Lock()
        self._pipeline: Any = None
        self._runner: Any = None
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="latticewatch-progress", daemon=True)
        if self.interval_s > 0:
            self._thread.start()

    def attach(self, pipeline: Any, runner: Any) -> None:
        """Read the backlog from ``runner.queue_depths()`` and the archive of ``pipeline`` from now on."""
        self._pipeline, self._runner = pipeline, runner

    def consume(self, events: Sequence[Event]) -> None:
        """Count the frames and errors; at ``per_frame``, log each frame (never blocks: a log line)."""
        for event in events:
            if isinstance(event, FrameEvent):
                with self._lock:
                    self.frames += 1
                if self.per_frame:
                    log.info("%s", frame_line(event))
            elif isinstance(event, ErrorEvent):
                with self._lock:
                    self.errors += 1

    def backlog(self) -> tuple[int, int]:
        """Frames waiting in the pipeline's queues, and in the archive writer's queue (0, 0 before `attach`).

        Queue depths only: the reporter never touches the ledger, so it cannot outlive anything it reads.
        """
        queued = sum(getattr(self._runner, "queue_depths", dict)().values())
        archive = getattr(self._pipeline, "archive", None)
        return queued, archive.queued() if archive is not None else 0

    def status_line(self, fps: float) -> str:
        """``<n> frames analysed, <fps> fps, backlog <n>[, archive queue <n>], <n> errors``."""
        queued, archive = self.backlog()
        waiting = f"backlog {queued}" + (f", archive queue {archive}" if archive else "")
        return f"{self.frames} frames analysed, {fps:.2f} fps, {waiting}, {self.errors} errors"

    def _loop(self) -> None:
        last, then = (0, 0), time.monotonic()
        while not self._closed.wait(self.interval_s):
            now = time.monotonic()
            with self._lock:
                counts = (self.frames, self.errors)
            # idle (nothing new, nothing waiting): stay quiet rather than repeat the same line
            if counts != last or any(self.backlog()):
                log.info("%s", self.status_line((counts[0] - last[0]) / (now - then)))
            last, then = counts, now

    def close(self) -> None:
        """Stop the status lines."""
        self._closed.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
