"""The daemon's offload to a Dask cluster: a real LocalCluster of worker processes, started by the test.

The cluster runs in a process of its own (scheduler and workers), so a test can kill all of it at
once, as a GPU server that goes away would.
"""

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections import defaultdict

import numpy as np
import pytest

from latticewatch.config import parse_config
from latticewatch.errors import ConfigError
from latticewatch.frame import Frame
from latticewatch.runtime.analyser import Analyser
from latticewatch.runtime.daemon import Daemon, Generation, build_pipeline
from latticewatch.runtime.offload import Offloader
from latticewatch.runtime.pipeline import Pipeline
from latticewatch.runtime.runners import PipelinedRunner
from latticewatch.runtime.store import StateDir
from latticewatch.sinks.events import FrameEvent
from latticewatch.sources.memory import MemorySource
from latticewatch.testing.replay import demo_frames
from waiting import wait_until

pytestmark = pytest.mark.slow

CLUSTER = """
import sys
from distributed import LocalCluster
cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=True, scheduler_port=0, dashboard_address=None)
print(cluster.scheduler_address, flush=True)
sys.stdin.read()  # until the test closes stdin (or kills the process group)
"""


class Cluster:
    """A LocalCluster in a process group of its own: its scheduler address, and a way to kill all of it."""

    def __init__(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", CLUSTER], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, start_new_session=True)
        self.address = self.process.stdout.readline().strip()
        assert self.address.startswith("tcp://"), "the LocalCluster did not start"

    def kill(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture(scope="module")
def cluster():
    c = Cluster()
    yield c
    c.close()


def connected(offloader: Offloader) -> Offloader:
    offloader.start()
    wait_until(lambda: offloader.connected, 60, "the offloader to connect (and the workers to load the profile)")
    return offloader


def events(state: StateDir) -> list[dict]:
    return [json.loads(line) for line in state.events_path.read_text().splitlines()]


def sources(images, names=("a", "b")) -> list[MemorySource]:
    return [MemorySource(images, name=name, pixel_size_nm=0.05, closed=True) for name in names]


def run(pipeline: Pipeline, srcs, *, queue_size: int = 16) -> None:
    try:
        PipelinedRunner(pipeline, queue_size=queue_size).run(srcs, threading.Event())
    finally:
        pipeline.close()


def test_frames_that_wait_past_the_limit_go_to_the_cluster_in_order_and_once(cluster, analyser, profile_dir,
                                                                            synthetic_images, tmp_path):
    # the daemon's own wiring: [runtime] scheduler in the config, the pipeline built from it. A budget of 2 µs:
    # every frame waits longer than the default limit (half of it) before its prepare phase, however fast this runs
    config = parse_config({"profile": str(profile_dir), "data_dir": str(tmp_path), "archive": {"enabled": False},
                           "runtime": {"scheduler": cluster.address, "budget_ms": 0.002}}, plugin_kinds=set())
    pipeline = build_pipeline(config, analyser=analyser)
    connected(pipeline.offload)
    state = pipeline.state
    run(pipeline, sources(synthetic_images[:4]))

    evts = events(state)
    frames = [e for e in evts if e["type"] == "frame"]
    remote = [e["frame_id"] for e in frames if "remote" in e["runner"]["phases_s"]]
    assert pipeline.stats.analysed == 8 and pipeline.stats.offloaded == len(remote) > 0
    for e in frames:  # where a frame was analysed shows in its phases: on the cluster, or all three here
        assert set(e["runner"]["phases_s"]) - {"publish"} in ({"remote"}, {"prepare", "segment", "finish"})
    by_source = defaultdict(list)
    for e in frames:
        by_source[e["frame_id"].partition(":")[0]].append(e["frame_id"])
    assert by_source == {s: [f"{s}:{n}" for n in range(4)] for s in "ab"}  # each source's arrival order
    ids = [e["event_id"] for e in evts]
    assert len(ids) == len(set(ids))
    check = Pipeline(analyser, state)  # the ledger is here, on the instrument PC, and says once each
    assert all(check.ledger.analyses(f"{s}:{n}") == 1 for s in "ab" for n in range(4))
    check.close()
    assert list(state.spool_dir.iterdir()) == []


def test_the_cluster_gives_the_analysis_this_machine_gives(cluster):
    shipped = Analyser("nanoparticles", threads=1)  # the trained profile: real particles to compare
    _, frames = demo_frames("shipped")
    offloader = connected(Offloader(cluster.address, "nanoparticles", budget_ms=1000, model_ids=shipped.model_ids))
    try:
        for (frame, _truth), _ in zip(frames, range(2)):
            remote = offloader.collect(frame, offloader.send(frame))
            here = shipped.analyse(frame)
            assert remote is not None and remote.frame_id == frame.frame_id
            np.testing.assert_array_equal(remote.mask, here.mask)
            assert remote.regions == here.regions and len(here.regions) > 0
            assert (remote.model_ids, remote.out_of_domain) == (here.model_ids, here.out_of_domain)
    finally:
        offloader.close()
    assert offloader.counters["analysed_remotely"] == 2


def test_analyses_made_with_other_model_files_are_refused(cluster, analyser, profile_dir, synthetic_images, caplog):
    elsewhere = {**analyser.model_ids, "segmentation": "unet.onnx:0123456789ab"}  # the PC has another U-Net
    offloader = connected(Offloader(cluster.address, profile_dir, budget_ms=1000, model_ids=elsewhere))
    frame = Frame("a:0", synthetic_images[0], 0.05, origin="memory:a")
    try:
        with caplog.at_level(logging.ERROR, logger="latticewatch.runtime.offload"):
            assert offloader.collect(frame, offloader.send(frame)) is None
        assert not offloader.wants(waited_s=60.0)  # nothing more goes to that cluster
    finally:
        offloader.close()
    assert "its analyses are refused" in caplog.text and "0123456789ab" in caplog.text


def test_a_cluster_lost_mid_run_costs_no_frame(analyser, profile_dir, synthetic_images, tmp_path):
    lost = Cluster()
    state = StateDir(tmp_path)

    class KillOnFirstRemote:  # the GPU server goes away as soon as it has delivered one analysis
        name = "kill"

        def consume(self, evts):
            if any(isinstance(e, FrameEvent) and "remote" in e.runner.phases_s for e in evts) \
                    and lost.process.poll() is None:
                lost.kill()

    offloader = connected(Offloader(lost.address, profile_dir, budget_ms=0.002, model_ids=analyser.model_ids))
    try:
        pipeline = Pipeline(analyser, state, budget_ms=0.002, sinks=[KillOnFirstRemote()], offload=offloader)
        run(pipeline, sources(synthetic_images[:6], names=("a",)))
    finally:
        lost.close()
    assert lost.process.returncode == -signal.SIGKILL  # it was killed mid-run, not closed at the end
    frames = [e for e in events(state) if e["type"] == "frame"]
    assert [e["frame_id"] for e in frames] == [f"a:{n}" for n in range(6)]  # none lost, still in order
    remote = [e for e in frames if "remote" in e["runner"]["phases_s"]]
    lost_on_the_way = [e for e in frames if "remote_lost" in e["runner"]["phases_s"]]
    assert 0 < len(remote) == pipeline.stats.offloaded < 6 and len(lost_on_the_way) > 0  # in flight at the kill
    for e in lost_on_the_way:  # analysed here after all, in their turn
        assert {"prepare", "segment", "finish"} <= set(e["runner"]["phases_s"])
    ids = [e["event_id"] for e in events(state)]
    assert len(ids) == len(set(ids))
    check = Pipeline(analyser, state)
    assert all(check.ledger.analyses(f"a:{n}") == 1 for n in range(6))
    check.close()


def test_an_unreachable_scheduler_is_a_warning_and_frames_are_analysed_here(analyser, profile_dir, synthetic_images,
                                                                           tmp_path, caplog):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    config = parse_config({"profile": str(profile_dir), "data_dir": str(tmp_path), "archive": {"enabled": False},
                           "runtime": {"scheduler": address, "budget_ms": 0.002}}, plugin_kinds=set())
    with caplog.at_level(logging.WARNING, logger="latticewatch.runtime.offload"):
        # the daemon's start: it does not wait for the cluster, and says where frames go
        generation = Generation(config, [], analyser=analyser, sources=sources(synthetic_images[:3], names=("a",)))
        daemon = Daemon(config, threading.Event())
        daemon.current = generation
        assert "offloaded 0 (no cluster now)" in daemon._status_line()
        run(generation.pipeline, generation.sources)
        wait_until(lambda: "cannot be used" in caplog.text, 30, "the warning that the scheduler cannot be reached")
    assert address in caplog.text and "every frame is analysed here" in caplog.text
    assert (generation.pipeline.stats.analysed, generation.pipeline.stats.offloaded) == (3, 0)


def test_the_config_names_the_key_and_the_fix():
    for address in ("tcp://gpu-server:8786", "tls://10.0.0.7:8786", "inproc://10.0.0.7/4711/1"):
        assert parse_config({"runtime": {"scheduler": address}}, plugin_kinds=set()).runtime.scheduler == address
    for wrong in ("gpu-server:8786", "tcp://gpu-server", "http://gpu-server:8786"):
        with pytest.raises(ConfigError, match=r"^runtime\.scheduler: must be a Dask scheduler address such as "
                                              r"tcp://gpu-server:8786 .* or left out to analyse every frame here"):
            parse_config({"runtime": {"scheduler": wrong}}, plugin_kinds=set())
    with pytest.raises(ConfigError, match="offload_after_ms sends frames to a Dask cluster: set scheduler too"):
        parse_config({"runtime": {"offload_after_ms": 100}}, plugin_kinds=set())
