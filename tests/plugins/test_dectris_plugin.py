"""The DECTRIS source as a latticewatch plugin: its entry point, options, frame ids, stop flag and simulator."""

from __future__ import annotations

import socket
import threading
import time
from importlib.metadata import entry_points

import numpy as np
import pytest

from dectris_stream import Consumer, frames_of
from latticewatch.sources.base import ENTRY_POINT_GROUP, Source, discover_sources
from latticewatch_dectris import make_source
from latticewatch_dectris.simulator import DectrisSimulator
from latticewatch_dectris.simulator import main as simulator_main


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
    argv = ["--bind", endpoint, "--frames", "2", "--rate", "0", "--shape", "96", "128", "--header-detail", "all"]
    runner = threading.Thread(target=lambda: codes.append(simulator_main(argv)))
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
