"""ZeroMQ stream source over real 127.0.0.1 sockets: every malformed message rejected alone, frame numbers
accounted for (duplicates, late frames, gaps), positions read back from a real ledger, CURVE, SUB and PULL."""

import json
import threading
import time

import numpy as np
import pytest
import zmq
import zmq.auth

from latticewatch.frame import Frame, Rejected
from latticewatch.runtime.ledger import Ledger
from latticewatch.sinks.events import error_event
from latticewatch.sinks.publisher import EventPublisher
from latticewatch.sources.zmq_stream import MAX_HEADER_BYTES, ZmqStreamSource, encode_frame, encode_series_end
from latticewatch.testing.replay import ZmqPublisher


def good(n, series="s"):
    return encode_frame(np.full((32, 32), n, np.uint16), series=series, number=n, pixel_size_nm=0.05)


def header(**changes):
    h = json.loads(good(0)[0])
    h.update(changes)
    return json.dumps(h).encode()


def raw_header(text):
    """A header with ``"pixel_size_nm": 0.05`` replaced by raw JSON text (NaN and friends json.dumps won't write)."""
    return header().replace(b'"pixel_size_nm": 0.05', b'"pixel_size_nm": ' + text)


PIXELS = good(0)[1]

# name → (message, a word its rejection names)
MALFORMED = {
    "bad json": ([b"{nope", b""], "not JSON"),
    "not an object": ([b"[1, 2]", b""], "not a JSON object"),
    "not utf-8": ([b'{"protocol": "\xff\xfe"}', PIXELS], "UTF-8"),
    "lone surrogate series": ([header(series="sur\udcff"), PIXELS], "surrogate"),
    "nested 100000 deep": ([b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", PIXELS], "bytes"),
    "nested 20000 deep": ([b'{"a": ' + b"[" * 20_000 + b"]" * 20_000 + b"}", PIXELS], "nests"),
    "brackets in strings are not nesting": ([header(meta={"x": "[[[[" * 1000}), b""], "bytes"),
    "header too large": ([header(meta={"x": "y" * MAX_HEADER_BYTES}), PIXELS], "bytes"),
    "unknown protocol": ([header(protocol="other/9"), PIXELS], "protocol"),
    "unknown type": ([header(type="frames"), PIXELS], "type"),
    "empty series": ([header(series=""), PIXELS], "series"),
    "control character in series": ([header(series="a\nb"), PIXELS], "series"),
    "frame true": ([header(frame=True), PIXELS], "'frame'"),
    "frame negative": ([header(frame=-1), PIXELS], "'frame'"),
    "frame huge": ([header(frame=2**60), PIXELS], "'frame'"),
    "frame a string": ([header(frame="3"), PIXELS], "'frame'"),
    "missing frame number": ([header(frame=None), PIXELS], "'frame'"),
    "oversized buffer": ([header(), PIXELS + b"\0" * 100], "bytes"),
    "undersized buffer": ([header(), PIXELS[:100]], "bytes"),
    "empty buffer": ([header(), b""], "bytes"),
    "unknown dtype": ([header(dtype="complex64"), PIXELS], "complex64"),
    "dtype object": ([header(dtype="object"), PIXELS], "dtype"),
    "wrong dtype for the bytes": ([header(dtype="float64"), PIXELS], "bytes"),
    "unknown byteorder": ([header(byteorder="@"), PIXELS], "byteorder"),
    "shape too large": ([header(shape=[100000, 100000]), b""], "max_pixels"),
    "shape too small": ([header(shape=[1, 1]), b"\0\0"], "minimum"),
    "shape 3-d": ([header(shape=[2, 16, 16]), PIXELS], "shape"),
    "shape of booleans": ([header(shape=[True, 16]), PIXELS], "shape"),
    "pixel size NaN": ([raw_header(b"NaN"), PIXELS], "NaN"),
    "pixel size Infinity": ([raw_header(b"Infinity"), PIXELS], "Infinity"),
    "pixel size negative": ([header(pixel_size_nm=-2.5), PIXELS], "pixel"),
    "pixel size zero": ([header(pixel_size_nm=0), PIXELS], "pixel"),
    "pixel size 1e-9": ([header(pixel_size_nm=1e-9), PIXELS], "pixel"),
    "pixel size huge": ([header(pixel_size_nm=1e30), PIXELS], "pixel"),
    "pixel size a string": ([header(pixel_size_nm="0.05"), PIXELS], "pixel"),
    "acquired_at garbage": ([header(acquired_at="yesterday"), PIXELS], "ISO 8601"),
    "meta not an object": ([header(meta=[1]), PIXELS], "meta"),
    "one part frame": ([header()], "parts"),
    "three parts": ([*good(0), b"extra"], "parts"),
    "series_end with pixels": ([encode_series_end("s", 1)[0], PIXELS], "parts"),
}


def test_each_malformed_message_is_one_rejection_and_the_next_good_frame_arrives(tcp_address, collect):
    source = ZmqStreamSource(tcp_address, name="cam", bind=True, max_pixels=4096**2)
    with collect(source) as c, ZmqPublisher(tcp_address, series="s", connect=True) as pub:
        for name, (parts, _) in MALFORMED.items():
            own = parts[0].replace(b'"series": "s"', b'"series": "bad-' + name.replace(" ", "-").encode() + b'"')
            pub.send_raw([own, *parts[1:]])  # its own series: one message's number never shadows another's
            pub.send_raw(good(0, series=name.replace(" ", "-")))  # each followed by a good frame of its own series
        c.wait_for(2 * len(MALFORMED))
    for i, (name, (parts, word)) in enumerate(MALFORMED.items()):
        rejected, after = c.items[2 * i], c.items[2 * i + 1]
        assert isinstance(rejected, Rejected), (name, rejected)
        assert word in rejected.problem, (name, rejected.problem)
        assert rejected.payload and len(rejected.payload) >= sum(len(p) for p in parts), name
        rejected.frame_id.encode()  # always valid Unicode: the ledger and the event log take it
        assert isinstance(after, Frame) and after.frame_id == f"cam:{name.replace(' ', '-')}#0", name
    assert source.counters["malformed"] == len(MALFORMED)
    assert source.counters["gaps"] == 0


def test_a_message_with_a_known_series_and_number_is_named_by_them(tcp_address, collect):
    source = ZmqStreamSource(tcp_address, name="cam", bind=True)
    with collect(source) as c, ZmqPublisher(tcp_address, series="s", connect=True) as pub:
        pub.send_raw([header(frame=0, pixel_size_nm=-2.5), PIXELS])
        c.wait_for(1)
    item = c.items[0]
    assert item.frame_id.startswith("cam:s#0~malformed-")
    assert "series 's' frame 0" in item.problem and "-2.5" in item.problem


def test_duplicates_and_late_frames_are_rejected_never_analysed_twice(tcp_address, collect):
    source = ZmqStreamSource(tcp_address, name="cam", bind=True)
    with collect(source) as c, ZmqPublisher(tcp_address, series="s", connect=True) as pub:
        for n in (0, 0, 1, 3, 2, 4):
            pub.send_raw(good(n))
        c.wait_for(7)
    ids = [i.frame_id for i in c.items]
    assert ids[0] == "cam:s#0" and ids[1].startswith("cam:s#0~duplicate-")
    assert ids[2:4] == ["cam:s#1", "cam:s#2~missing"]
    assert ids[4] == "cam:s#3" and ids[5].startswith("cam:s#2~out-of-order-") and ids[6] == "cam:s#4"
    assert "duplicate" in c.items[1].problem and c.items[1].payload == b"".join(
        len(p).to_bytes(8, "big") + p for p in good(0))
    assert {k: source.counters[k] for k in ("frames", "duplicates", "out_of_order", "gaps")} == {
        "frames": 4, "duplicates": 1, "out_of_order": 1, "gaps": 1}


def test_gaps_and_a_short_series_are_reported_as_missing_ranges(tcp_address, collect):
    source = ZmqStreamSource(tcp_address, name="cam", bind=True)
    with collect(source) as c, ZmqPublisher(tcp_address, series="s", connect=True) as pub:
        for n in (0, 1, 4, 5):
            pub.send_raw(good(n))
        pub.send_raw(encode_series_end("s", 8))
        c.wait_for(6)
    assert [i.frame_id for i in c.items] == ["cam:s#0", "cam:s#1", "cam:s#2-3~missing", "cam:s#4", "cam:s#5",
                                             "cam:s#6-7~missing"]
    missing = c.items[2]
    assert isinstance(missing, Rejected) and missing.payload is None
    assert "2 frame(s) never arrived before frame 4: 2-3" in missing.problem
    assert source.counters["gaps"] == 4 and source.counters["series_ended"] == 2  # the publisher's own, on close


def test_positions_come_back_from_the_ledger_so_a_restart_counts_only_what_was_lost(tmp_path, tcp_address, collect):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    for fid in ("cam:s#0", "cam:s#1", "cam:s#2", "cam:t#0-4~missing"):  # what a killed run left
        ledger.see(fid, source="cam", origin="")
    source = ZmqStreamSource(tcp_address, name="cam", bind=True, ledger_path=ledger.path)
    with collect(source) as c, ZmqPublisher(tcp_address, series="s", connect=True) as pub:
        for parts in (good(2), good(5), good(5, series="t")):  # 2 was spooled before the kill; 3 and 4 were lost
            pub.send_raw(parts)
        c.wait_for(4)
    ledger.close()
    ids = [i.frame_id for i in c.items]
    assert ids[0].startswith("cam:s#2~duplicate-")  # never a second job for a frame the ledger holds
    assert ids[1:] == ["cam:s#3-4~missing", "cam:s#5", "cam:t#5"]
    assert source.counters["gaps"] == 2


def test_sender_gives_up_on_a_frame_no_receiver_takes(tcp_address):
    pub = ZmqPublisher(tcp_address, series="s", send_timeout_s=0.3)
    start = time.monotonic()
    assert pub.send(Frame("x", np.zeros((32, 32), np.uint16), 0.05)) is False
    assert 0.25 < time.monotonic() - start < 3 and pub.dropped == 1 and pub.count == 1  # the number is used up
    pub.close()


@pytest.fixture
def keys(tmp_path):
    for name in ("daemon", "camera", "intruder"):
        zmq.auth.create_certificates(tmp_path, name)
    (tmp_path / "allowed").mkdir()
    (tmp_path / "allowed" / "camera.key").write_bytes((tmp_path / "camera.key").read_bytes())
    return tmp_path


def test_curve_stream_takes_only_an_authorised_sender(tcp_address, collect, keys):
    source = ZmqStreamSource(tcp_address, name="cam", bind=True, curve_secret_key=keys / "daemon.key_secret",
                             curve_clients=keys / "allowed")
    with collect(source) as c:
        plain = ZmqPublisher(tcp_address, series="plain", connect=True, send_timeout_s=1.0)
        intruder = ZmqPublisher(tcp_address, series="intruder", connect=True, send_timeout_s=1.0,
                                curve_secret_key=keys / "intruder.key_secret", curve_server_key=keys / "daemon.key")
        frame = Frame("x", np.zeros((32, 32), np.uint16), 0.05)
        assert plain.send(frame) is False and intruder.send(frame) is False  # the handshake never completes
        camera = ZmqPublisher(tcp_address, series="camera", connect=True, send_timeout_s=5.0,
                              curve_secret_key=keys / "camera.key_secret", curve_server_key=keys / "daemon.key")
        assert camera.send(frame) is True
        c.wait_for(1)
        time.sleep(0.3)
        for pub in (plain, intruder, camera):
            pub.sock.close(linger=0)
    assert [i.frame_id for i in c.items] == ["cam:camera#0"]


def test_curve_events_reach_only_an_authorised_subscriber(keys):
    pub = EventPublisher("tcp://127.0.0.1:0", status_interval_s=0, curve_secret_key=keys / "daemon.key_secret",
                         curve_clients=keys / "allowed")
    context = zmq.Context.instance()
    subscribers = {}
    for who in ("plain", "camera", "intruder"):
        sub = context.socket(zmq.SUB)
        if who != "plain":
            public, secret = zmq.auth.load_certificate(keys / f"{who}.key_secret")
            sub.curve_publickey, sub.curve_secretkey = public, secret
            sub.curve_serverkey = zmq.auth.load_certificate(keys / "daemon.key")[0]
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(pub.address)
        subscribers[who] = sub
    received = {who: [] for who in subscribers}
    deadline = time.monotonic() + 5
    while not received["camera"] and time.monotonic() < deadline:
        pub.consume([error_event("cam:s#0", "", "header is not JSON")])
        for who, sub in subscribers.items():
            while sub.poll(50):
                received[who].append(sub.recv_multipart())
    time.sleep(0.3)
    for who, sub in subscribers.items():
        while sub.poll(50):
            received[who].append(sub.recv_multipart())
        sub.close(linger=0)
    pub.close()
    assert received["camera"] and received["camera"][0][0] == b"latticewatch.error"
    assert received["plain"] == [] and received["intruder"] == []


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


def test_a_part_larger_than_any_frame_resets_the_sender_and_the_stream_goes_on(tcp_address, collect):
    source = ZmqStreamSource(tcp_address, name="cam", bind=True, max_pixels=64 * 64)
    with collect(source) as c:
        big = ZmqPublisher(tcp_address, series="big", connect=True)
        big.send_raw([header(series="big"), b"\0" * (64 * 64 * 8 * 4)])  # refused by ZeroMQ before allocation
        time.sleep(0.3)
        with ZmqPublisher(tcp_address, series="s", connect=True) as pub:
            pub.send_raw(good(0))
            c.wait_for(1)
        big.sock.close(linger=0)
    assert [i.frame_id for i in c.items] == ["cam:s#0"]
    assert threading.active_count() < 50
