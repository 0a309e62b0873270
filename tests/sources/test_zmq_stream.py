"""ZeroMQ stream source: malformed messages rejected one by one, gaps counted, SUB and PULL."""

import json
import time

import numpy as np

from latticewatch.frame import Frame, Rejected
from latticewatch.sources.zmq_stream import ZmqStreamSource, encode_frame, encode_series_end
from latticewatch.testing.replay import ZmqPublisher


def good(n, series="s"):
    return encode_frame(np.full((32, 32), n, np.uint16), series=series, number=n, pixel_size_nm=0.05)


def header(**changes):
    h = json.loads(good(0)[0])
    h.update(changes)
    return json.dumps(h).encode()


MALFORMED = {
    "bad json": [b"{nope", b""],
    "not an object": [b"[1, 2]", b""],
    "unknown protocol": [header(protocol="other/9"), good(0)[1]],
    "size mismatch": [header(), b"\0" * 100],
    "unknown dtype": [header(dtype="complex64"), good(0)[1]],
    "shape too large": [header(shape=[100000, 100000]), b""],
    "missing frame number": [header(frame=None), good(0)[1]],
    "three parts": [*good(0), b"extra"],
}


def test_each_malformed_message_is_rejected_and_the_stream_goes_on(tcp_address, collect):
    source = ZmqStreamSource(tcp_address, name="cam", bind=True, max_pixels=4096**2)
    with collect(source) as c, ZmqPublisher(tcp_address, series="s", connect=True) as pub:
        for parts in MALFORMED.values():
            pub.send_raw(parts)
        pub.send_raw(good(0))
        c.wait_for(len(MALFORMED) + 1)
    rejected = [i for i in c.items if isinstance(i, Rejected)]
    assert len(rejected) == len(MALFORMED)
    assert all(r.payload and r.frame_id.startswith("cam:malformed:") for r in rejected)
    assert "byte" in rejected[3].problem and "complex64" in rejected[4].problem and "max_pixels" in rejected[5].problem
    assert isinstance(c.items[-1], Frame) and c.items[-1].frame_id == "cam:s#0"
    assert source.counters["malformed"] == len(MALFORMED)


def test_gaps_and_a_short_series_are_counted(tcp_address, collect):
    source = ZmqStreamSource(tcp_address, name="cam", bind=True)
    with collect(source) as c, ZmqPublisher(tcp_address, series="s", connect=True) as pub:
        for n in (0, 1, 4, 5):
            pub.send_raw(good(n))
        pub.send_raw(encode_series_end("s", 8))
        c.wait_for(4)
        time.sleep(0.3)
        assert source.counters["gaps"] == 2 + 2  # 2 and 3 missing, 6 and 7 never came
        assert source.counters["series_ended"] == 1
    assert [f.frame_id for f in c.items] == ["cam:s#0", "cam:s#1", "cam:s#4", "cam:s#5"]


def test_sub_socket_receives_a_cameras_pub(tcp_address, collect):
    source = ZmqStreamSource(tcp_address, name="cam", socket="sub")
    pub = ZmqPublisher(tcp_address, series="live", socket="pub")  # binds, waits for subscribers to join
    with collect(source) as c:
        time.sleep(0.5)
        pub.send(Frame("x", np.arange(32 * 32, dtype=">u2").reshape(32, 32), 0.1))
        c.wait_for(1)
    pub.close()
    frame = c.items[0]
    assert frame.frame_id == "cam:live#0" and frame.pixels.dtype == np.dtype("uint16")
    np.testing.assert_array_equal(frame.pixels, np.arange(32 * 32).reshape(32, 32))
    assert frame.meta["stream"] == {"series": "live", "frame": 0}
