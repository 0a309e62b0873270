"""DECTRIS stream v1 (`latticewatch_dectris.v1`) over real ZeroMQ sockets on random 127.0.0.1 ports.

The simulator (`latticewatch_dectris.simulator`) plays the detector; the source is also fed a message
written out literally from the SIMPLON documentation, and messages broken in every way we know of.
"""

from __future__ import annotations

import hashlib
import json
import struct
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from dectris_stream import DTYPES, SHAPE, Consumer, frames_of, good_frames, split_parts
from latticewatch.frame import Rejected
from latticewatch.sources.zmq_stream import pack_parts
from latticewatch_dectris import make_source
from latticewatch_dectris.builders import v1_end_parts, v1_header_parts, v1_image_parts, v2_end_message
from latticewatch_dectris.simulator import DectrisSimulator


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
    assert source.counters == {"frames": 3, "malformed": 0, "gaps": 0, "out_of_order": 0, "series_started": 1,
                               "series_ended": 1}
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
    header = v1_header_parts(2, "all", {"nimages": 1}, np.ones((3, 5), np.float32), np.zeros((3, 5), np.uint32),
                             np.ones((2, 8), np.float32), "appx")
    heads = [json.loads(p) for p in header[:3] + header[4:5] + header[6:7]]
    assert heads[0] == {"htype": "dheader-1.0", "series": 2, "header_detail": "all"}
    assert heads[2] == {"htype": "dflatfield-1.0", "shape": [5, 3], "type": "float32"}
    assert heads[3] == {"htype": "dpixelmask-1.0", "shape": [5, 3], "type": "uint32"}
    assert heads[4] == {"htype": "dcountrate_table-1.0", "shape": [8, 2], "type": "float32"}
    assert len(header[3]) == 60 and len(header[5]) == 60 and header[8] == b"appx"
    image = v1_image_parts(2, 4, pixels, "bs16-lz4<", 100, 200)
    assert json.loads(image[0]) == {"htype": "dimage-1.0", "series": 2, "frame": 4, "hash": ""}
    assert json.loads(image[1]) == {"htype": "dimage_d-1.0", "shape": [5, 3], "type": "uint16", "encoding": "bs16-lz4<",
                                    "size": len(image[2])}
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
        ("header without config", [b'{"htype": "dheader-1.0", "series": 1, "header_detail": "basic"}'], "configuration",
         False),
        ("header_detail all without arrays", [b'{"htype": "dheader-1.0", "series": 1, "header_detail": "all"}', b"{}"],
         "dflatfield", False),
        ("unknown type", with_desc(type="float16"), "unknown image type", True),
        ("size field mismatch", with_desc(size=len(blob) + 1), "size", True),
        ("bitshuffle width mismatch", with_desc(encoding="bs32-lz4<"), "does not fit", True),
        ("shape too large", with_desc(shape=[100000, 100000]), "max_pixels", True),
        ("shape mismatch", with_desc(shape=[16, 17], size=len(blob)), "decompressed bytes", True),
        ("truncated data", [head, json.dumps({**d, "size": len(blob) - 9}).encode(), blob[:-9], conf], "pixel data",
         True),
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
