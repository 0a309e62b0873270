"""Scale-out on a real `LocalCluster` (2 worker processes): profile loaded once per worker, tasks that never raise
for bad input, a worker SIGKILLed mid-run, and every frame recorded exactly once.

One cluster serves the module: starting one costs seconds on a busy 2-core machine.
"""

import json
import os
import signal
import threading
import time

import dask
import mrcfile
import numpy as np
import pytest

from latticewatch.frame import Frame
from latticewatch.runtime.cluster import (
    AnalyserPlugin,
    AnalyserSpec,
    FrameRef,
    analyse_pixels,
    analyse_ref,
    open_client,
    profile_loads,
)
from latticewatch.runtime.eventlog import read_log
from latticewatch.runtime.ledger import Ledger
from latticewatch.runtime.scaleout import ScaleOut

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client():
    with open_client(local_workers=2, dashboard=False) as client:
        yield client


@pytest.fixture(scope="module")
def spec(profile_dir):
    return AnalyserSpec(str(profile_dir), backend="onnxruntime")


def _write_frames(folder, n, rng, side=128):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        with mrcfile.new(folder / f"f{i:02d}.mrc", overwrite=True) as m:
            m.set_data(rng.integers(0, 4000, (side, side)).astype(np.uint16))
            m.voxel_size = 0.5  # Å
    return sorted(folder.glob("*.mrc"))


def test_each_worker_loads_the_profile_once(client, spec, tmp_path, rng):
    files = _write_frames(tmp_path / "in", 6, rng)
    client.register_plugin(AnalyserPlugin(spec))
    results = client.gather([client.submit(analyse_ref, FrameRef(str(p)), spec, str(tmp_path / "out"), pure=False)
                             for p in files])
    assert [d.frame_id for r in results for d in r.done] == [str(p) for p in files]
    assert all((tmp_path / "out" / f"{p.stem}.json").is_file() for p in files)  # reports written by the workers
    assert client.run(profile_loads) == dict.fromkeys(client.scheduler_info()["workers"], 1)


def test_a_bad_file_is_a_failure_not_an_exception(client, spec, tmp_path, rng):
    (good,) = _write_frames(tmp_path / "in", 1, rng)
    bad = tmp_path / "in" / "bad.mrc"
    bad.write_bytes(good.read_bytes()[:3000])
    result = client.submit(analyse_ref, FrameRef(str(bad)), spec, str(tmp_path / "out"), pure=False).result()
    assert result.done == ()
    (failure,) = result.failures
    assert failure.file == str(bad) and failure.frame_id is None and "truncated" in failure.error


def test_pixels_travel_for_the_offload(client, spec, analyser, synthetic_images):
    frame = Frame("cam:s#0", synthetic_images[0], 0.05, origin="pull tcp://127.0.0.1:1")
    remote = client.submit(analyse_pixels, frame, spec, pure=False).result()
    local = analyser.analyse(frame)
    assert remote.frame_id == frame.frame_id
    assert np.array_equal(remote.mask, local.mask)
    assert [r.bbox for r in remote.regions] == [r.bbox for r in local.regions]


def _while_killing_a_busy_worker(client, work):
    """``work()`` while a thread SIGKILLs the first worker seen running a task; returns what ``work`` returned."""
    pids = client.run(os.getpid)
    killed = []

    def kill_a_busy_worker():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            busy = [w for w, keys in client.processing().items() if keys and w in pids]
            if busy:
                os.kill(pids[busy[0]], signal.SIGKILL)
                killed.append(busy[0])
            time.sleep(0.05)

    killer = threading.Thread(target=kill_a_busy_worker)
    killer.start()
    try:
        return work()
    finally:
        killer.join()
        assert killed, "no worker was busy to kill"


def test_a_worker_killed_mid_run_loses_and_repeats_nothing(client, spec, tmp_path, rng):
    files = _write_frames(tmp_path / "in", 12, rng, side=256)
    out = tmp_path / "out"
    result = _while_killing_a_busy_worker(client, lambda: ScaleOut(client, out, spec).run([tmp_path / "in"]))
    assert result.failures == []
    assert sorted(r["frame_id"] for r in result.rows) == [str(p) for p in files]
    ledger = Ledger(out / ".latticewatch" / "ledger.sqlite")
    try:
        assert [ledger.analyses(str(p)) for p in files] == [1] * len(files)
    finally:
        ledger.close()
    frame_events = [json.loads(line)["event_id"] for line in read_log(out / ".latticewatch" / "events.jsonl",
                                                                       types=["frame"])]
    assert sorted(frame_events) == sorted(f"{p}/frame" for p in files)
    # the nanny replaced the killed worker, and the plugin loaded the profile in the new process too
    deadline = time.monotonic() + 60
    while len(client.scheduler_info()["workers"]) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert set(client.run(profile_loads).values()) == {1}


def test_a_task_given_up_is_not_recorded_and_runs_again(spec, tmp_path, rng):
    files = _write_frames(tmp_path / "in", 8, rng, side=256)
    out = tmp_path / "out"
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):  # the first death gives the task up
        with open_client(local_workers=2, dashboard=False) as client:
            first = _while_killing_a_busy_worker(client, lambda: ScaleOut(client, out, spec).run([tmp_path / "in"]))
            assert first.failures and all("given up" in f.error for f in first.failures)
            ledger = Ledger(out / ".latticewatch" / "ledger.sqlite")
            try:
                assert ledger.counts()["quarantined"] == 0  # nothing is known about them: not recorded as failed
            finally:
                ledger.close()
            second = ScaleOut(client, out, spec).run([tmp_path / "in"])
    assert second.failures == []
    assert second.skipped == len(first.rows) and len(second.rows) == len(first.failures)
    ledger = Ledger(out / ".latticewatch" / "ledger.sqlite")
    try:
        assert [ledger.analyses(str(p)) for p in files] == [1] * len(files)
    finally:
        ledger.close()
