"""Tests for the DECTRIS stream source plugin, over real ZeroMQ sockets on random 127.0.0.1 ports.

The simulator (`latticewatch_dectris.simulator`) plays the detector. Because the simulator and
the source share the codec module, the codecs are also checked against layouts typed out byte by
byte here and against a plain numpy implementation of the published bitshuffle format, and the
v1 source is fed a message written out literally from the SIMPLON documentation.
"""

from __future__ import annotations

import hashlib
import json
import socket
import struct
import threading
import time
from datetime import UTC, datetime, timedelta, timezone
from importlib.metadata import entry_points

import cbor2
import lz4.block
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from latticewatch.frame import Frame, Rejected
from latticewatch.sources.base import ENTRY_POINT_GROUP, Source, discover_sources
from latticewatch.sources.zmq_stream import pack_parts
from latticewatch_dectris import codecs, make_source, v1, v2
from latticewatch_dectris.messages import EncodedImage, MessageError, SeriesStart
from latticewatch_dectris.simulator import (
    DectrisSimulator,
    corrections,
    v1_end_parts,
    v1_header_parts,
    v1_image_parts,
    v2_end_message,
    v2_image_message,
    v2_start_message,
)
from latticewatch_dectris.simulator import main as simulator_main

SHAPE = (67, 131)  # 8777 px: several 8 KiB bitshuffle blocks, a partial block and a leftover element
DTYPES = {8: np.uint8, 16: np.uint16, 32: np.uint32}


# --------------------------------------------------------------------------------------------
# Helpers


class Consumer:
    """Runs ``source.frames`` in a thread, as the runner does, collecting what it yields."""

    def __init__(self, source, skip=None):
        self.source = source
        self.items: list[Frame | Rejected] = []
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(skip,), daemon=True)
        self.thread.start()

    def _run(self, skip):
        try:
            for item in self.source.frames(self.stop, skip):
                self.items.append(item)
        except BaseException as err:  # noqa: BLE001  # re-raised in close(), in the test's thread
            self.error = err

    def wait_for(self, condition, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert self.thread.is_alive(), f"source stopped early: {self.error!r}"
            assert time.monotonic() < deadline, f"timed out; got {[getattr(i, 'frame_id', i) for i in self.items]}, counters {self.source.counters}"
            time.sleep(0.005)

    def wait_items(self, n: int) -> list[Frame | Rejected]:
        self.wait_for(lambda: len(self.items) >= n)
        return self.items

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        assert not self.thread.is_alive(), "source did not honour the stop flag"
        if self.error is not None:
            raise self.error


@pytest.fixture
def stream():
    """``open(protocol, **options) -> (simulator, source, consumer)``; all closed afterwards."""
    opened = []

    def open_(protocol="v1", **options):
        sim = DectrisSimulator(protocol)
        source = make_source({"protocol": protocol, "endpoint": sim.endpoint, "poll_interval_s": 0.02, **options})
        consumer = Consumer(source)
        opened.append((sim, consumer))
        return sim, source, consumer

    yield open_
    for sim, consumer in opened:
        consumer.close()
        sim.close()


def frames_of(rng, n, dtype=np.uint16, shape=SHAPE):
    top = min(np.iinfo(dtype).max, 70000)
    return [rng.integers(0, top, size=shape, endpoint=True).astype(dtype) for _ in range(n)]


def split_parts(payload: bytes) -> list[bytes]:
    """Undo the quarantine layout of a multipart message: 8-byte big-endian length, then the part."""
    parts, pos = [], 0
    while pos < len(payload):
        (size,) = struct.unpack_from(">Q", payload, pos)
        parts.append(payload[pos + 8 : pos + 8 + size])
        pos += 8 + size
    return parts


def good_frames(items):
    return [item for item in items if isinstance(item, Frame)]


# Reference implementation of the bitshuffle + LZ4 (HDF5 framing) format in plain numpy,
# written from the format description, independent of the bitshuffle package.


def ref_bitshuffle_block(elements: np.ndarray) -> bytes:
    """Row b holds bit b of every element, element i at bit i % 8 of byte i // 8."""
    nbits = elements.dtype.itemsize * 8
    le = elements.astype(elements.dtype.newbyteorder("<"))
    bits = np.unpackbits(le.view(np.uint8).reshape(-1, elements.dtype.itemsize), axis=1, bitorder="little")
    return np.packbits(np.ascontiguousarray(bits.T).reshape(nbits, -1), axis=1, bitorder="little").tobytes()


def ref_bitunshuffle_block(data: bytes, dtype: np.dtype, count: int) -> np.ndarray:
    nbits = dtype.itemsize * 8
    rows = np.frombuffer(data, np.uint8).reshape(nbits, count // 8)
    bits = np.unpackbits(rows, axis=1, bitorder="little")  # (nbits, count)
    return np.packbits(np.ascontiguousarray(bits.T), axis=1, bitorder="little").view(dtype.newbyteorder("<")).ravel()


def ref_bslz4_encode(arr: np.ndarray, block: int) -> bytes:
    flat = arr.ravel()
    n, size = flat.size, arr.dtype.itemsize
    out = [struct.pack(">QI", flat.nbytes, block * size)]
    start = 0
    last = (n % block) - (n % block) % 8
    for count in [block] * (n // block) + ([last] if last else []):
        packed = lz4.block.compress(ref_bitshuffle_block(flat[start : start + count]), store_size=False)
        out += [struct.pack(">I", len(packed)), packed]
        start += count
    out.append(flat[start:].astype(arr.dtype.newbyteorder("<")).tobytes())
    return b"".join(out)


def ref_bslz4_decode(payload: bytes, dtype: np.dtype, n: int) -> np.ndarray:
    total, block_bytes = struct.unpack_from(">QI", payload)
    assert total == n * dtype.itemsize
    block, pos, out = block_bytes // dtype.itemsize, 12, []
    last = (n % block) - (n % block) % 8
    for count in [block] * (n // block) + ([last] if last else []):
        (size,) = struct.unpack_from(">I", payload, pos)
        raw = lz4.block.decompress(payload[pos + 4 : pos + 4 + size], uncompressed_size=count * dtype.itemsize)
        out.append(ref_bitunshuffle_block(raw, dtype, count))
        pos += 4 + size
    out.append(np.frombuffer(payload[pos:], dtype.newbyteorder("<")))
    assert sum(len(a) for a in out) == n
    return np.concatenate(out)


# --------------------------------------------------------------------------------------------
# Codecs: known byte layouts and the reference implementation


# Eight uint16 values whose bit rows are easy to write down: bit 0 is set in elements 0 and 2
# (0b101 = 0x05), bit 1 in elements 1 and 2 (0b110 = 0x06), bit 15 in element 3 (0b1000 = 0x08).
KNOWN_VALUES = [1, 2, 3, 0x8000, 0, 0, 0, 0]
KNOWN_SHUFFLED = bytes([0x05, 0x06] + [0] * 13 + [0x08])
# One LZ4 block of 16 literals: token 0xF0 (15 literals, no match) + 1 extra length byte.
KNOWN_LZ4 = bytes([0xF0, 0x01]) + KNOWN_SHUFFLED
KNOWN_BSLZ4 = (
    bytes.fromhex("0000000000000010")  # 16 bytes decompressed
    + bytes.fromhex("00002000")  # 8192-byte blocks (the filter's default)
    + bytes.fromhex("00000012")  # first block: 18 compressed bytes
    + KNOWN_LZ4
)


def test_bitshuffle_known_layout():
    values = np.array(KNOWN_VALUES, "<u2")
    assert ref_bitshuffle_block(values) == KNOWN_SHUFFLED
    assert codecs.decode("bslz4", KNOWN_BSLZ4, np.dtype("<u2"), 8).tolist() == KNOWN_VALUES
    assert ref_bslz4_decode(codecs.encode("bslz4", values), np.dtype("<u2"), 8).tolist() == KNOWN_VALUES


def test_bitshuffle_leftover_elements_follow_raw():
    # 10 elements in 8-element (16-byte) blocks: one compressed block, then 2 elements as they are.
    values = np.arange(1, 11, dtype="<u2")
    payload = codecs.encode("bslz4", values, block_bytes=16)
    total, block_bytes = struct.unpack_from(">QI", payload)
    (first,) = struct.unpack_from(">I", payload, 12)
    assert (total, block_bytes) == (20, 16)
    assert payload[16 + first :] == values[8:].tobytes()
    assert len(payload) == 16 + first + 4
    assert codecs.decode("bslz4", payload, np.dtype("<u2"), 10).tolist() == values.tolist()


def test_lz4_hdf5_known_layout_with_a_stored_block():
    # Block 1: 16 bytes stored raw (compressed size == block size); block 2: 4 bytes as LZ4 literals.
    raw = bytes(range(20))
    payload = (
        struct.pack(">QI", 20, 16)
        + struct.pack(">I", 16)
        + raw[:16]
        + struct.pack(">I", 5)
        + bytes([0x40])  # token: 4 literals, no match
        + raw[16:]
    )
    assert codecs.decode("lz4-hdf5", payload, np.dtype("u1"), 20).tobytes() == raw
    assert codecs.decode("lz4-hdf5", codecs.encode("lz4-hdf5", np.frombuffer(raw, "u1"), 16), np.dtype("u1"), 20).tobytes() == raw


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from([8, 16, 32]),
    n=st.integers(0, 3000),
    block_groups=st.integers(1, 40),
    seed=st.integers(0, 2**32 - 1),
)
def test_bslz4_matches_numpy_reference(bits, n, block_groups, seed):
    dtype = np.dtype(DTYPES[bits]).newbyteorder("<")
    values = np.random.default_rng(seed).integers(0, 2 ** min(bits, 20), size=n).astype(dtype)
    block = 8 * block_groups
    # ours (bitshuffle package) → reference decoder, and reference encoder → ours
    assert np.array_equal(ref_bslz4_decode(codecs.encode("bslz4", values, block * dtype.itemsize), dtype, n), values)
    assert np.array_equal(codecs.decode("bslz4", ref_bslz4_encode(values, block), dtype, n), values)


@pytest.mark.parametrize("codec", ["lz4", "bslz4", "lz4-hdf5"])
def test_damaged_payloads_raise_decode_error(codec, rng):
    values = rng.integers(0, 50, size=5000).astype("<u2")
    payload = codecs.encode(codec, values, 1024 if codec != "lz4" else None)
    damaged = [payload[:-1], payload + b"\0", payload[: len(payload) // 2], b"", payload[:11]]
    for _ in range(200):
        mutable = bytearray(payload)
        mutable[rng.integers(len(mutable))] ^= 1 << int(rng.integers(8))
        damaged.append(bytes(mutable))
    for bad in damaged:
        try:
            out = codecs.decode(codec, bad, values.dtype, values.size)
        except codecs.DecodeError:
            continue
        assert out.shape == values.shape  # a flipped literal bit may still decode: to the right size


# --------------------------------------------------------------------------------------------
# Stream v1 over sockets


@pytest.mark.parametrize("header_detail", ["none", "basic", "all"])
@pytest.mark.parametrize("encoding", ["<", "lz4<", "bs8-lz4<", "bs16-lz4<", "bs32-lz4<"])
def test_v1_round_trip_exact(stream, rng, encoding, header_detail):
    bits = int(encoding[2:4].rstrip("-")) if encoding.startswith("bs") else 16
    frames = frames_of(rng, 3, DTYPES[bits])
    sim, source, consumer = stream("v1", pixel_size_nm=0.031)
    sent = sim.send_series(frames, series=7, header_detail=header_detail, encoding=encoding)
    consumer.wait_for(lambda: source.counters["series_ended"] == 1)
    got = consumer.items
    assert [f.frame_id for f in got] == ["dectris:7:0", "dectris:7:1", "dectris:7:2"]
    for frame, pixels in zip(got, frames):
        assert frame.pixels.dtype == pixels.dtype and frame.pixels.shape == SHAPE
        assert np.array_equal(frame.pixels, pixels) and frame.pixels.flags.writeable
        assert frame.pixel_size_nm == 0.031
        assert frame.origin == sim.endpoint
        assert frame.meta["encoding"] == encoding and frame.meta["header_detail"] == header_detail
        json.dumps(frame.meta)  # metadata stays JSON
    assert source.counters == {"frames": 3, "malformed": 0, "gaps": 0, "out_of_order": 0, "series_started": 1, "series_ended": 1}
    if header_detail == "none":
        assert got[0].acquired_at is None and "detector" not in got[0].meta
    else:
        detector = got[0].meta["detector"]
        assert detector["x_pixel_size"] == 75e-6 and detector["nimages"] == 3
        started = datetime.fromisoformat(detector["data_collection_date"])
        assert got[2].acquired_at == started + timedelta(seconds=0.02)
    if header_detail == "all":
        start = source.series_start
        assert np.array_equal(start.flatfield, sent["flatfield"])
        assert np.array_equal(start.pixel_mask, sent["pixel_mask"])
        assert np.array_equal(start.countrate_table, sent["countrate_table"])
        assert got[0].meta["masked_pixels"] == np.count_nonzero(sent["pixel_mask"])


def test_v1_message_typed_from_the_documentation(stream):
    """A series written out literally, as the SIMPLON manual lists the parts, with raw pixels."""
    pixels = np.arange(12, dtype="<u4").reshape(3, 4)  # shape [x, y] = [4, 3]
    sim, source, consumer = stream("v1")
    sim.send(
        [
            b'{"htype":"dheader-1.0","series":5,"header_detail":"basic"}',
            (
                b'{"x_pixel_size":7.5e-05,"y_pixel_size":7.5e-05,"nimages":1,"ntrigger":1,'
                b'"data_collection_date":"2024-05-01T10:00:00.000+02:00","description":"Dectris EIGER2 Si 4M"}'
            ),
            b'{"header_appendix_is":"free text"}',
        ]
    )
    sim.send(
        [
            b'{"htype":"dimage-1.0","series":5,"frame":0,"hash":"0123456789abcdef"}',
            b'{"htype":"dimage_d-1.0","shape":[4,3],"type":"uint32","encoding":"<","size":48}',
            pixels.tobytes(),
            b'{"htype":"dconfig-1.0","start_time":1500000000,"stop_time":1510000000,"real_time":10000000}',
            b"image appendix",
        ]
    )
    sim.send([b'{"htype":"dseries_end-1.0","series":5}'])
    consumer.wait_for(lambda: source.counters["series_ended"] == 1)
    (frame,) = consumer.items
    assert frame.frame_id == "dectris:5:0" and np.array_equal(frame.pixels, pixels)
    assert frame.acquired_at == datetime(2024, 5, 1, 10, 0, 1, 500000, tzinfo=timezone(timedelta(hours=2)))
    assert frame.meta["hash"] == "0123456789abcdef" and frame.meta["real_time_s"] == 0.01
    assert frame.meta["appendix"] == "image appendix"
    assert frame.meta["header_appendix"] == '{"header_appendix_is":"free text"}'
    assert frame.meta["detector"]["description"] == "Dectris EIGER2 Si 4M"
    assert frame.pixel_size_nm is None


def test_simulator_v1_layouts_are_the_published_ones():
    pixels = np.zeros((3, 5), np.uint16)
    header = v1_header_parts(
        2, "all", {"nimages": 1}, np.ones((3, 5), np.float32), np.zeros((3, 5), np.uint32), np.ones((2, 8), np.float32), "appx"
    )
    heads = [json.loads(p) for p in header[:3] + header[4:5] + header[6:7]]
    assert heads[0] == {"htype": "dheader-1.0", "series": 2, "header_detail": "all"}
    assert heads[2] == {"htype": "dflatfield-1.0", "shape": [5, 3], "type": "float32"}
    assert heads[3] == {"htype": "dpixelmask-1.0", "shape": [5, 3], "type": "uint32"}
    assert heads[4] == {"htype": "dcountrate_table-1.0", "shape": [8, 2], "type": "float32"}
    assert len(header[3]) == 60 and len(header[5]) == 60 and header[8] == b"appx"
    image = v1_image_parts(2, 4, pixels, "bs16-lz4<", 100, 200)
    assert json.loads(image[0]) == {"htype": "dimage-1.0", "series": 2, "frame": 4, "hash": ""}
    assert json.loads(image[1]) == {"htype": "dimage_d-1.0", "shape": [5, 3], "type": "uint16", "encoding": "bs16-lz4<", "size": len(image[2])}
    assert json.loads(image[3]) == {"htype": "dconfig-1.0", "start_time": 100, "stop_time": 200, "real_time": 100}
    assert struct.unpack_from(">QI", image[2]) == (30, 8192)
    assert v1_end_parts(2) == [b'{"htype": "dseries_end-1.0", "series": 2}']


def test_v1_gaps_counted_and_series_end_handled(stream, rng):
    frames = frames_of(rng, 6, shape=(16, 24))
    sim, source, consumer = stream("v1")
    sim.send_series(frames, series=3, drop=[1, 2, 5])
    sim.send_series(frames[:2], series=4)  # a new series counts from 0 again: no gap
    consumer.wait_for(lambda: source.counters["series_ended"] == 2)
    got = consumer.items
    assert [f.frame_id for f in got] == ["dectris:3:0", "dectris:3:3", "dectris:3:4", "dectris:4:0", "dectris:4:1"]
    assert got[1].meta["missing_before"] == 2 and "missing_before" not in got[2].meta
    # frame 5, lost at the end of the series, is not a gap: an aborted series also ends early
    assert source.counters["gaps"] == 2 and source.counters["series_started"] == 2


def test_v1_joining_mid_series(stream, rng):
    frames = frames_of(rng, 2, shape=(16, 16))
    sim, source, consumer = stream("v1")
    sim.send_image(9, 40, frames[0])  # no start message seen: nothing known, no gap invented
    sim.send_image(9, 41, frames[1])
    got = consumer.wait_items(2)
    assert [f.frame_id for f in got] == ["dectris:9:40", "dectris:9:41"]
    assert got[0].meta["header_detail"] == "unknown" and got[0].acquired_at is None
    assert source.counters["gaps"] == 0 and source.counters["series_started"] == 0


def _v1_breakages(good):
    """(description, parts, hint in the problem, frame id known) for malformed v1 messages."""
    head, desc, blob, conf = good
    d = json.loads(desc)

    def with_desc(**changes):
        return [head, json.dumps({**d, **changes}).encode(), blob, conf]

    # The first names frame 1, so frame 1 counts as arrived and frame 2 is no gap.
    return [
        ("unknown encoding", with_desc(encoding="zstd<"), "unknown encoding", True),
        ("bad JSON", [b"{not json", desc, blob, conf], "not valid JSON", False),
        ("unknown htype", [b'{"htype": "dfoo-1.0", "series": 1}'], "unknown htype", False),
        ("series end with extra parts", [b'{"htype": "dseries_end-1.0", "series": 1}', b"x"], "expected 1", False),
        ("header without config", [b'{"htype": "dheader-1.0", "series": 1, "header_detail": "basic"}'], "configuration", False),
        ("header_detail all without arrays", [b'{"htype": "dheader-1.0", "series": 1, "header_detail": "all"}', b"{}"], "dflatfield", False),
        ("unknown type", with_desc(type="float16"), "unknown image type", True),
        ("size field mismatch", with_desc(size=len(blob) + 1), "size", True),
        ("bitshuffle width mismatch", with_desc(encoding="bs32-lz4<"), "does not fit", True),
        ("shape too large", with_desc(shape=[100000, 100000]), "max_pixels", True),
        ("shape mismatch", with_desc(shape=[16, 17], size=len(blob)), "decompressed bytes", True),
        ("truncated data", [head, json.dumps({**d, "size": len(blob) - 9}).encode(), blob[:-9], conf], "pixel data", True),
        ("missing dconfig", [head, desc, blob], "expected 4", True),
        ("negative frame", [head.replace(b'"frame": 1', b'"frame": -1'), desc, blob, conf], "frame", False),
        ("dconfig not JSON", [head, desc, blob, b"\xff\xfe"], "dconfig", True),
        ("a v2 message", [v2_end_message(1, "u")], 'protocol = "v2"', False),
    ]


def test_v1_malformed_messages_are_rejected_and_the_next_image_arrives(stream, rng):
    frames = frames_of(rng, 2, shape=(16, 16))
    sim, source, consumer = stream("v1")
    sim.start_series(1, (16, 16), nimages=99)
    good = v1_image_parts(1, 1, frames[1], "bs16-lz4<", 0, 1)
    breakages = _v1_breakages(good)
    sim.send_image(1, 0, frames[0])
    for number, (_, parts, _, _) in enumerate(breakages, start=1):
        if number > 1:  # the first breakage is frame 1's own slot; later good frames follow each bad one
            sim.send_image(1, number, frames[number % 2])
        sim.send(parts)
    consumer.wait_items(1 + len(breakages) + len(breakages) - 1)
    rejected = [item for item in consumer.items if isinstance(item, Rejected)]
    assert len(rejected) == len(breakages)
    for item, (what, parts, hint, id_known) in zip(rejected, breakages):
        assert hint in item.problem, (what, item.problem)
        assert item.payload == pack_parts(parts) and split_parts(item.payload) == [bytes(p) for p in parts]
        assert item.origin == sim.endpoint
        if id_known:
            assert item.frame_id == "dectris:1:1", what
        else:
            assert item.frame_id == f"dectris:malformed:{hashlib.sha256(item.payload).hexdigest()[:16]}", what
    good_ids = [f.frame_id for f in good_frames(consumer.items)]
    assert good_ids == [f"dectris:1:{n}" for n in [0, *range(2, len(breakages) + 1)]]
    assert source.counters["malformed"] == len(breakages)
    assert source.counters["gaps"] == 0  # frame 1 arrived, malformed: it is not missing


@pytest.mark.parametrize("protocol", ["v1", "v2"])
def test_skip_avoids_decoding_done_frames(rng, protocol):
    frames = frames_of(rng, 3, shape=(16, 16))
    with DectrisSimulator(protocol) as sim:
        source = make_source({"protocol": protocol, "endpoint": sim.endpoint, "poll_interval_s": 0.02})
        consumer = Consumer(source, skip=lambda frame_id: frame_id == "dectris:1:1")
        try:
            sim.send_series(frames, series=1)
            consumer.wait_for(lambda: source.counters["series_ended"] == 1)
        finally:
            consumer.close()
    assert [f.frame_id for f in consumer.items] == ["dectris:1:0", "dectris:1:2"]
    assert source.counters["gaps"] == 0


# --------------------------------------------------------------------------------------------
# Stream v2 over sockets


@pytest.mark.parametrize("header_detail", ["basic", "all"])
@pytest.mark.parametrize(
    ("compression", "bits"),
    [("none", 16), ("lz4", 16), ("lz4", 32), ("bslz4", 8), ("bslz4", 16), ("bslz4", 32)],
)
def test_v2_round_trip_exact(stream, rng, compression, bits, header_detail):
    frames = frames_of(rng, 3, DTYPES[bits])
    sim, source, consumer = stream("v2")
    sent = sim.send_series(frames, series=11, header_detail=header_detail, encoding=compression)
    consumer.wait_for(lambda: source.counters["series_ended"] == 1)
    got = consumer.items
    assert [f.frame_id for f in got] == ["dectris:11:0", "dectris:11:1", "dectris:11:2"]
    for frame, pixels in zip(got, frames):
        assert frame.pixels.dtype == pixels.dtype and np.array_equal(frame.pixels, pixels)
        assert frame.meta["compression"] == compression and frame.meta["channel"] == "threshold_1"
        json.dumps(frame.meta)
    assert source.counters == {"frames": 3, "malformed": 0, "gaps": 0, "out_of_order": 0, "series_started": 1, "series_ended": 1}
    arm_date = datetime.fromisoformat(got[0].meta["detector"]["arm_date"])
    assert got[1].acquired_at == arm_date + timedelta(seconds=0.01)
    assert got[0].meta["detector"]["pixel_size_x"] == 75e-6
    assert got[0].meta["header_detail"] == header_detail
    if header_detail == "all":
        start = source.series_start
        assert np.array_equal(start.flatfield, sent["flatfield"])
        assert np.array_equal(start.pixel_mask, sent["pixel_mask"])
        assert np.array_equal(start.countrate_table, sent["countrate_table"].ravel())


def test_simulator_v2_layout_is_the_published_one(rng):
    pixels = rng.integers(0, 100, (5, 7)).astype(np.uint16)
    date = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    message = v2_image_message(3, "abc", 2, pixels, "bslz4", date, 10, 20, user_data={"k": 1})
    assert message[:3] == b"\xd9\xd9\xf7"
    decoded = cbor2.loads(message)
    assert next(iter(decoded)) == "type" and decoded["type"] == "image"
    assert list(decoded["real_time"]) == [10, 1_000_000_000] and list(decoded["stop_time"]) == [20, 1_000_000_000]
    assert decoded["series_date"] == date and decoded["image_id"] == 2
    multidim = decoded["data"]["threshold_1"]
    assert multidim.tag == 40 and list(multidim.value[0]) == [5, 7]
    typed = multidim.value[1]
    assert typed.tag == 69  # uint16 little-endian
    compressed = typed.value
    assert compressed.tag == 56500 and list(compressed.value[:2]) == ["bslz4", 2]
    assert ref_bslz4_decode(compressed.value[2], np.dtype("<u2"), 35).tolist() == pixels.ravel().tolist()
    start = cbor2.loads(v2_start_message(3, "abc", (5, 7), 4, 0.01, date))
    assert start["type"] == "start" and start["image_size_x"] == 7 and start["image_size_y"] == 5
    assert "flatfield" not in start and "pixel_mask" not in start
    assert dict(cbor2.loads(v2_end_message(3, "abc"))) == {"type": "end", "series_id": 3, "series_unique_id": "abc"}


def test_v2_message_built_by_hand(stream):
    """Typed array tags by hand: big-endian uint32 (tag 66) raw, as RFC 8746 allows."""
    pixels = np.arange(6, dtype=">u4").reshape(2, 3)
    message = cbor2.dumps(
        cbor2.CBORTag(
            55799,
            {
                "type": "image",
                "series_id": 2,
                "series_unique_id": "x",
                "image_id": 0,
                "data": {"threshold_1": cbor2.CBORTag(40, [[2, 3], cbor2.CBORTag(66, pixels.tobytes())])},
            },
        )
    )
    sim, _, consumer = stream("v2")
    sim.send(message)
    (frame,) = consumer.wait_items(1)
    assert frame.pixels.dtype == np.dtype("=u4") and np.array_equal(frame.pixels, pixels)


def _v2_breakages(good_pixels):
    date = datetime(2024, 1, 1, tzinfo=UTC)

    def image(**changes):
        message = {
            "type": "image",
            "series_id": 1,
            "series_unique_id": "u",
            "image_id": 1,
            "data": {"threshold_1": cbor2.CBORTag(40, [[4, 4], cbor2.CBORTag(69, good_pixels.tobytes())])},
            **changes,
        }
        return cbor2.dumps(cbor2.CBORTag(55799, message))

    def data(value):
        return {"threshold_1": value}

    bslz4 = codecs.encode("bslz4", good_pixels)
    return [
        ("no self-describe tag", cbor2.dumps({"type": "end", "series_id": 1}), "d9d9f7", False),
        ("garbage after the tag", b"\xd9\xd9\xf7\xff\x00garbage", "undecodable CBOR", False),
        ("not a map", cbor2.dumps(cbor2.CBORTag(55799, [1, 2])), "not a map", False),
        ("unknown type", cbor2.dumps(cbor2.CBORTag(55799, {"type": "calibration"})), "unknown message type", False),
        ("start without series", cbor2.dumps(cbor2.CBORTag(55799, {"type": "start"})), "series_id", False),
        ("image without data", image(data={}), "data", True),
        ("column-major array", image(data=data(cbor2.CBORTag(1040, [[4, 4], cbor2.CBORTag(69, good_pixels.tobytes())]))), "tag 1040", True),
        ("bad dimensions", image(data=data(cbor2.CBORTag(40, [[4], cbor2.CBORTag(69, b"")]))), "dimensions", True),
        ("not a typed array", image(data=data(cbor2.CBORTag(40, [[4, 4], good_pixels.tobytes()]))), "typed array", True),
        ("reserved tag", image(data=data(cbor2.CBORTag(40, [[4, 4], cbor2.CBORTag(76, b"")]))), "reserved", True),
        ("wrong size", image(data=data(cbor2.CBORTag(40, [[4, 4], cbor2.CBORTag(69, b"\0" * 30)]))), "pixel data", True),
        (
            "unknown compression",
            image(data=data(cbor2.CBORTag(40, [[4, 4], cbor2.CBORTag(69, cbor2.CBORTag(56500, ["zstd", 0, b"x"]))]))),
            "unknown compression",
            True,
        ),
        (
            "element size mismatch",
            image(data=data(cbor2.CBORTag(40, [[4, 4], cbor2.CBORTag(69, cbor2.CBORTag(56500, ["bslz4", 4, bslz4]))]))),
            "element size",
            True,
        ),
        (
            "truncated bslz4",
            image(data=data(cbor2.CBORTag(40, [[4, 4], cbor2.CBORTag(69, cbor2.CBORTag(56500, ["bslz4", 2, bslz4[:-3]]))]))),
            "pixel data",
            True,
        ),
        ("unknown channel", image(data={"threshold_2": cbor2.CBORTag(40, [[4, 4], cbor2.CBORTag(69, good_pixels.tobytes())])}), "no channel", True),
        ("string image id", image(image_id="1"), "image_id", False),
        ("v1 multipart", v1_end_parts(1) + [b"x"], 'protocol = "v1"', False),
        ("too large", image(data=data(cbor2.CBORTag(40, [[1 << 20, 1 << 20], cbor2.CBORTag(69, b"")]))), "max_pixels", True),
        ("truncated message", v2_image_message(1, "u", 1, good_pixels, "none", date, 0, 1)[:-1], "undecodable", False),
    ]


def test_v2_malformed_messages_are_rejected_and_the_next_image_arrives(stream, rng):
    pixels = rng.integers(0, 1000, (4, 4)).astype(np.uint16)
    sim, source, consumer = stream("v2", channel="threshold_1")
    sim.start_series(1, (4, 4), nimages=99)
    breakages = _v2_breakages(pixels)
    for number, (_, message, _, _) in enumerate(breakages, start=2):
        sim.send(message)
        sim.send_image(1, number, pixels)
    consumer.wait_items(2 * len(breakages))
    rejected = [item for item in consumer.items if isinstance(item, Rejected)]
    for item, (what, message, hint, id_known) in zip(rejected, breakages):
        assert hint in item.problem, (what, item.problem)
        assert item.payload == (message if isinstance(message, bytes) else pack_parts(message)), what
        assert (item.frame_id == "dectris:1:1") == id_known, (what, item.frame_id)
    assert len(rejected) == len(breakages) == source.counters["malformed"]
    frames = good_frames(consumer.items)
    assert [f.frame_id for f in frames] == [f"dectris:1:{n}" for n in range(2, len(breakages) + 2)]
    assert all(np.array_equal(f.pixels, pixels) for f in frames)


def test_v2_appendices_in_metadata(stream, rng):
    pixels = rng.integers(0, 9, (8, 8)).astype(np.uint16)
    sim, _, consumer = stream("v2")
    sim.start_series(1, (8, 8), appendix="run 42")
    sim.send_image(1, 0, pixels, appendix="tilt 3")
    (frame,) = consumer.wait_items(1)
    assert frame.meta["header_appendix"] == "run 42" and frame.meta["appendix"] == "tilt 3"


def test_damaged_messages_raise_only_message_error(rng):
    """Bytes flipped, cut or appended anywhere in good messages: parsed, or a MessageError, nothing else."""
    pixels = rng.integers(0, 1000, (24, 40)).astype(np.uint16)
    extra = corrections((24, 40), rng)
    date = datetime(2024, 1, 1, tzinfo=UTC)
    v1_messages = [
        v1_header_parts(1, "all", {"nimages": 3, "data_collection_date": date.isoformat()}, appendix="a", **extra),
        *(v1_image_parts(1, 0, pixels, encoding, 0, 10, "b") for encoding in ("<", "lz4<", "bs16-lz4<")),
        v1_end_parts(1),
    ]
    v2_messages = [
        v2_start_message(1, "u", (24, 40), 3, 0.01, date, user_data={"k": [1, 2]}, **extra),
        *(v2_image_message(1, "u", 0, pixels, compression, date, 0, 10, user_data="c") for compression in ("none", "lz4", "bslz4")),
        v2_end_message(1, "u"),
    ]

    def damaged(data: bytes) -> bytes:
        cut = int(rng.integers(len(data) + 1))
        match int(rng.integers(3)):
            case 0:
                mutable = bytearray(data)
                for _ in range(int(rng.integers(1, 4))):
                    mutable[rng.integers(len(mutable))] = int(rng.integers(256))
                return bytes(mutable)
            case 1:
                return data[:cut]
            case _:
                return data[:cut] + rng.bytes(int(rng.integers(1, 9))) + data[cut:]

    def outcome(parse, message):
        try:
            parsed = parse(message)
            if isinstance(parsed, EncodedImage):
                parsed.decode()
                json.dumps(parsed.meta)
            elif isinstance(parsed, SeriesStart):
                json.dumps(parsed.detector), json.dumps(parsed.appendix)
        except MessageError:
            pass

    for _ in range(300):
        parts = [bytes(p) for p in v1_messages[rng.integers(len(v1_messages))]]
        index = int(rng.integers(len(parts)))
        parts[index] = damaged(parts[index]) if parts[index] else parts[index]
        outcome(lambda m: v1.parse(m, 1 << 26), parts)
        outcome(lambda m: v2.parse(m, 1 << 26), damaged(v2_messages[rng.integers(len(v2_messages))]))


# --------------------------------------------------------------------------------------------
# Plugin contract


def test_entry_point_is_discoverable():
    (entry,) = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == "dectris"]
    assert entry.value == "latticewatch_dectris:make_source"
    plugin = discover_sources()["dectris"]
    assert plugin.error is None
    source = plugin.factory({"protocol": "v2", "pixel_size_nm": 0.05})
    assert isinstance(source, Source) and source.replayable is False
    assert source.endpoint == "tcp://127.0.0.1:31001" and source.name == "dectris"


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"protocol": "v3"}, "protocol"),
        ({"endpoint": "http://detector:9999"}, "endpoint"),
        ({"pixel_size_nm": -1}, "pixel_size_nm"),
        ({"poll_interval_s": 5}, "poll_interval_s"),
        ({"pixelsize": 0.1}, "pixelsize"),
        ({"channel": "threshold_1"}, "options: Value error, channel applies"),
    ],
)
def test_bad_options_name_the_key(options, key):
    with pytest.raises(ValueError, match=f"dectris source: {key}"):
        make_source(options)


def test_name_prefixes_frame_ids(stream, rng):
    sim, _, consumer = stream("v1", name="arina")
    sim.send_series(frames_of(rng, 1, shape=(8, 8)), series=2)
    (frame,) = consumer.wait_items(1)
    assert frame.frame_id == "arina:2:0"


def test_stop_is_honoured_promptly_without_a_detector():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    source = make_source({"endpoint": f"tcp://127.0.0.1:{port}", "poll_interval_s": 0.05})
    consumer = Consumer(source)
    time.sleep(0.2)
    began = time.monotonic()
    consumer.close()
    assert time.monotonic() - began < 0.5


def test_stop_is_honoured_while_images_keep_coming(rng):
    frames = frames_of(rng, 1, shape=(32, 32))
    with DectrisSimulator("v1", send_timeout_s=0.5) as sim:
        source = make_source({"endpoint": sim.endpoint, "poll_interval_s": 0.05})
        consumer = Consumer(source)
        sim.start_series(1, (32, 32), nimages=10_000)
        for number in range(20):
            sim.send_image(1, number, frames[0])
        consumer.wait_items(5)
        began = time.monotonic()
        consumer.close()
        assert time.monotonic() - began < 0.5


def test_simulator_command_line_pushes_synthetic_frames():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"tcp://127.0.0.1:{port}"
    source = make_source({"endpoint": endpoint, "pixel_size_nm": 0.05, "poll_interval_s": 0.02})
    consumer = Consumer(source)  # connecting first is fine: ZeroMQ connects once the port is bound
    codes = []
    runner = threading.Thread(
        target=lambda: codes.append(simulator_main(["--bind", endpoint, "--frames", "2", "--rate", "0", "--shape", "96", "128", "--header-detail", "all"]))
    )
    runner.start()
    try:
        consumer.wait_for(lambda: source.counters["series_ended"] == 1, timeout_s=60)
    finally:
        runner.join(timeout=60)
        consumer.close()
    assert codes == [0]
    assert [f.frame_id for f in consumer.items] == ["dectris:1:0", "dectris:1:1"]
    assert consumer.items[0].pixels.shape == (96, 128) and consumer.items[0].pixels.dtype == np.uint16
    assert consumer.items[0].meta["header_detail"] == "all"
