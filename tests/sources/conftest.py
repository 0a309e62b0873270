"""Helpers for source tests: run a source in a thread and collect what it yields."""

import socket
import threading
import time

import pytest


class Collector:
    """Iterates ``source.frames(stop, skip)`` in a thread; ``items`` fills as frames arrive."""

    def __init__(self, source, skip=None):
        self.source = source
        self.items = []
        self.stop = threading.Event()
        self.error = None
        self.thread = threading.Thread(target=self._run, args=(skip,), daemon=True)

    def _run(self, skip):
        try:
            for item in self.source.frames(self.stop, skip):
                self.items.append(item)
        except BaseException as err:  # surfaced by the test through `close`
            self.error = err

    def __enter__(self):
        self.thread.start()
        return self

    def wait_for(self, n, timeout=10.0):
        deadline = time.monotonic() + timeout
        while len(self.items) < n and time.monotonic() < deadline and self.error is None:
            time.sleep(0.02)
        assert self.error is None, self.error
        assert len(self.items) >= n, f"got {len(self.items)} of {n}: {[i.frame_id for i in self.items]}"
        return self.items

    def close(self):
        self.stop.set()
        self.thread.join(5)
        assert not self.thread.is_alive(), "source did not stop within 5 s"
        assert self.error is None, self.error

    def __exit__(self, *exc):
        self.close()


@pytest.fixture
def collect():
    return Collector


@pytest.fixture
def tcp_address():
    """A tcp:// endpoint on a free random 127.0.0.1 port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"
