"""DECTRIS stream v2 (`latticewatch_dectris.v2`, CBOR) over real ZeroMQ sockets on random 127.0.0.1 ports.

The simulator (`latticewatch_dectris.simulator`) plays the detector; the source is also fed a message
built by hand from the published layout, and messages broken in every way we know of.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import cbor2
import numpy as np
import pytest

from dectris_stream import DTYPES, frames_of, good_frames, ref_bslz4_decode
from latticewatch.frame import Rejected
from latticewatch.sources.zmq_stream import pack_parts
from latticewatch_dectris import codecs, v1, v2
from latticewatch_dectris.builders import (
    corrections,
    v1_end_parts,
    v1_header_parts,
    v1_image_parts,
    v2_end_message,
    v2_image_message,
    v2_start_message,
)
from latticewatch_dectris.messages import EncodedImage, MessageError, SeriesStart


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
    assert source.counters == {"frames": 3, "malformed": 0, "gaps": 0, "out_of_order": 0, "series_started": 1,
                               "series_ended": 1}
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
    good = cbor2.CBORTag(40, [[4, 4], cbor2.CBORTag(69, good_pixels.tobytes())])

    def image(**changes):
        message = {
            "type": "image",
            "series_id": 1,
            "series_unique_id": "u",
            "image_id": 1,
            "data": {"threshold_1": good},
            **changes,
        }
        return cbor2.dumps(cbor2.CBORTag(55799, message))

    def data(value):
        return {"threshold_1": value}

    def array(dims, typed, tag=40):
        """``data`` holding a multi-dimensional array (tag 40 or ``tag``) of a typed array (tag 69) of ``typed``."""
        return data(cbor2.CBORTag(tag, [dims, cbor2.CBORTag(69, typed)]))

    bslz4 = codecs.encode("bslz4", good_pixels)
    return [
        ("no self-describe tag", cbor2.dumps({"type": "end", "series_id": 1}), "d9d9f7", False),
        ("garbage after the tag", b"\xd9\xd9\xf7\xff\x00garbage", "undecodable CBOR", False),
        ("not a map", cbor2.dumps(cbor2.CBORTag(55799, [1, 2])), "not a map", False),
        ("unknown type", cbor2.dumps(cbor2.CBORTag(55799, {"type": "calibration"})), "unknown message type", False),
        ("start without series", cbor2.dumps(cbor2.CBORTag(55799, {"type": "start"})), "series_id", False),
        ("image without data", image(data={}), "data", True),
        ("column-major array", image(data=array([4, 4], good_pixels.tobytes(), tag=1040)), "tag 1040", True),
        ("bad dimensions", image(data=array([4], b"")), "dimensions", True),
        ("not a typed array", image(data=data(cbor2.CBORTag(40, [[4, 4], good_pixels.tobytes()]))), "typed array",
         True),
        ("reserved tag", image(data=data(cbor2.CBORTag(40, [[4, 4], cbor2.CBORTag(76, b"")]))), "reserved", True),
        ("wrong size", image(data=array([4, 4], b"\0" * 30)), "pixel data", True),
        (
            "unknown compression",
            image(data=array([4, 4], cbor2.CBORTag(56500, ["zstd", 0, b"x"]))),
            "unknown compression",
            True,
        ),
        (
            "element size mismatch",
            image(data=array([4, 4], cbor2.CBORTag(56500, ["bslz4", 4, bslz4]))),
            "element size",
            True,
        ),
        (
            "truncated bslz4",
            image(data=array([4, 4], cbor2.CBORTag(56500, ["bslz4", 2, bslz4[:-3]]))),
            "pixel data",
            True,
        ),
        ("unknown channel", image(data={"threshold_2": good}), "no channel", True),
        ("string image id", image(image_id="1"), "image_id", False),
        ("v1 multipart", v1_end_parts(1) + [b"x"], 'protocol = "v1"', False),
        ("too large", image(data=array([1 << 20, 1 << 20], b"")), "max_pixels", True),
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
        *(v2_image_message(1, "u", 0, pixels, compression, date, 0, 10, user_data="c")
          for compression in ("none", "lz4", "bslz4")),
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
