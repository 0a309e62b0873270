"""The base set every source must pass, run against the folder, ZeroMQ, memory and DECTRIS sources.

Each harness delivers real input the way that source receives it: a SerialEM stack + mdoc
written section by section, a PUSH socket on a random 127.0.0.1 port, the memory queue, or the
DECTRIS plugin's simulated detector (stream v1).
"""

import time

import numpy as np
import pytest

from latticewatch.frame import Frame, Rejected
from latticewatch.sources.base import Source
from latticewatch.sources.folder import FolderSource
from latticewatch.sources.memory import MemorySource
from latticewatch.sources.zmq_stream import ZmqStreamSource
from latticewatch.testing.replay import SerialEMStack, ZmqPublisher

PIXEL_NM = 0.05


class FolderHarness:
    def __init__(self, tmp_path, address):
        self.root = tmp_path / "incoming"
        self.root.mkdir()
        self.stack = SerialEMStack(self.root / "grid1.mrc", pixel_size_nm=PIXEL_NM)

    def source(self):
        return FolderSource(self.root, name="cam", settle_s=0.2, poll_interval_s=0.1)

    def deliver(self, image):
        self.stack.append(image)

    def deliver_malformed(self):
        (self.root / "broken.mrc").write_bytes(b"this is not an MRC file\n" * 64)

    def frame_id(self, n):
        return f"cam:grid1.mrc#{n}"

    def close(self):
        pass


class ZmqHarness:
    def __init__(self, tmp_path, address):
        self.address = address
        self.publisher = None

    def source(self):
        return ZmqStreamSource(self.address, name="cam", socket="pull", bind=True)

    def _pub(self):
        if self.publisher is None:
            self.publisher = ZmqPublisher(self.address, series="s1", connect=True)
        return self.publisher

    def deliver(self, image):
        self._pub().send(Frame("x", image, PIXEL_NM))

    def deliver_malformed(self):
        self._pub().send_raw([b"{not json", b"\0" * 10])

    def frame_id(self, n):
        return f"cam:s1#{n}"

    def close(self):
        if self.publisher is not None:
            self.publisher.close()


class MemoryHarness:
    def __init__(self, tmp_path, address):
        self.memory = MemorySource(name="cam", pixel_size_nm=PIXEL_NM)

    def source(self):
        return self.memory

    def deliver(self, image):
        self.memory.put(image)

    def deliver_malformed(self):
        self.memory.put(Rejected("cam:bad", "memory:cam", "malformed on purpose"))

    def frame_id(self, n):
        return f"cam:{n}"

    def close(self):
        self.memory.close()


class DectrisHarness:
    """The DECTRIS plugin, built through its public factory, fed by its simulated detector."""

    def __init__(self, tmp_path, address):
        from latticewatch_dectris.simulator import DectrisSimulator

        self.sim, self.sent = DectrisSimulator("v1"), 0

    def source(self):
        from latticewatch_dectris import make_source

        return make_source({"name": "cam", "endpoint": self.sim.endpoint, "pixel_size_nm": PIXEL_NM})

    def deliver(self, image):
        if self.sent == 0:
            self.sim.start_series(1, image.shape, image.dtype, nimages=100)
        self.sim.send_image(1, self.sent, image)
        self.sent += 1

    def deliver_malformed(self):
        self.sim.send([b"{not json"])

    def frame_id(self, n):
        return f"cam:1:{n}"

    def close(self):
        self.sim.close()


@pytest.fixture(params=[FolderHarness, ZmqHarness, MemoryHarness, DectrisHarness],
                ids=["folder", "zmq", "memory", "dectris"])
def harness(request, tmp_path, tcp_address):
    h = request.param(tmp_path, tcp_address)
    yield h
    h.close()


def images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 4000, (64, 64), dtype=np.uint16) for _ in range(n)]


def test_is_a_source(harness):
    source = harness.source()
    assert isinstance(source, Source)
    assert isinstance(source.counters, dict) and isinstance(source.replayable, bool)


def test_every_frame_once_in_order_with_pixels_and_size(harness, collect):
    sent = images(3)
    with collect(harness.source()) as c:
        for image in sent:
            harness.deliver(image)
        got = c.wait_for(3)
        time.sleep(0.5)  # nothing more may come
    assert [f.frame_id for f in c.items] == [harness.frame_id(n) for n in range(3)]
    for frame, image in zip(got, sent):
        assert isinstance(frame, Frame)
        np.testing.assert_array_equal(frame.pixels, image)
        assert frame.pixel_size_nm == pytest.approx(PIXEL_NM)


def test_malformed_input_is_rejected_and_the_next_frame_still_comes(harness, collect):
    sent = images(2, seed=1)
    with collect(harness.source()) as c:
        harness.deliver(sent[0])
        c.wait_for(1)
        harness.deliver_malformed()
        harness.deliver(sent[1])
        c.wait_for(3)
    rejected = [i for i in c.items if isinstance(i, Rejected)]
    frames = [i for i in c.items if isinstance(i, Frame)]
    assert len(rejected) == 1 and rejected[0].problem
    assert [f.frame_id for f in frames] == [harness.frame_id(0), harness.frame_id(1)]
    np.testing.assert_array_equal(frames[1].pixels, sent[1])


def test_skip_keeps_done_frames_out(harness, collect):
    done = {harness.frame_id(0)}
    with collect(harness.source(), skip=done.__contains__) as c:
        for image in images(2, seed=2):
            harness.deliver(image)
        c.wait_for(1)
        time.sleep(0.5)
    assert [f.frame_id for f in c.items] == [harness.frame_id(1)]


def test_stop_is_honoured_promptly(harness, collect):
    c = collect(harness.source())
    with c:
        time.sleep(0.3)
        start = time.monotonic()
        c.stop.set()
        c.thread.join(2)
        assert time.monotonic() - start < 1.0
