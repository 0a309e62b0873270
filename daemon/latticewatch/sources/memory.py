"""An in-memory source: frames handed over by the program itself (tests, notebooks, the bench).

It is an ordinary `Source`, not a mock: the runner treats it exactly like a stream (it is not
replayable, so its frames are spooled on arrival).
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Iterable, Iterator

import numpy as np

from latticewatch.frame import Frame, Rejected
from latticewatch.sources.base import SkipFn, StopFlag

log = logging.getLogger(__name__)

_END = object()


class MemorySource:
    """Frames put into a queue by the caller; ``close()`` ends the stream once it is drained.

    Parameters
    ----------
    items
        Initial items: 2-D arrays (given ids ``<name>:<n>``, counting arrays only), `Frame` or
        `Rejected` objects.
    name
        Source name and frame-id prefix.
    pixel_size_nm
        Pixel size given to frames made from bare arrays.
    closed
        End the stream after ``items`` (default when items are given up front).

    Examples
    --------
    >>> import threading
    >>> source = MemorySource([np.zeros((32, 32), np.uint16), np.ones((32, 32), np.uint16)], name="m")
    >>> [f.frame_id for f in source.frames(threading.Event(), skip=lambda fid: fid == "m:0")]
    ['m:1']
    """

    replayable = False

    def __init__(
        self,
        items: Iterable[np.ndarray | Frame | Rejected] = (),
        *,
        name: str = "memory",
        pixel_size_nm: float | None = None,
        closed: bool | None = None,
    ) -> None:
        self.name = name
        self.pixel_size_nm = pixel_size_nm
        self.counters: dict[str, int] = {"received": 0}
        self._queue: queue.Queue = queue.Queue()
        self._count = 0
        items = list(items)
        for item in items:
            self.put(item)
        if closed if closed is not None else bool(items):
            self.close()

    def put(self, item: np.ndarray | Frame | Rejected) -> None:
        """Hand over one more frame (thread-safe)."""
        if isinstance(item, np.ndarray):
            item = Frame(f"{self.name}:{self._count}", item, self.pixel_size_nm, origin=f"memory:{self.name}")
            self._count += 1
        self._queue.put(item)

    def close(self) -> None:
        """End the stream after the items already put."""
        self._queue.put(_END)

    def frames(self, stop: StopFlag, skip: SkipFn | None = None) -> Iterator[Frame | Rejected]:
        """Yield the queued items in order until closed and drained, or until ``stop`` is set."""
        while not stop.is_set():
            try:
                item = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            if item is _END:
                return
            self.counters["received"] += 1
            if skip is not None and skip(item.frame_id):
                continue
            yield item
