"""`latticewatch batch` end to end on a real 2-worker `LocalCluster`: the same reports as `process`, bad files among
good ones, archives (whole frames re-analysed, reduced ones refused), and a client SIGKILLed then run again."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import distributed
import mrcfile
import numpy as np
import psutil
import pytest
import tifffile

from latticewatch.cli import main
from latticewatch.io.readers import read_frames
from latticewatch.runtime.analyser import Analyser
from latticewatch.runtime.eventlog import read_log
from latticewatch.runtime.ledger import Ledger
from latticewatch.sinks.archive import ArchiveWriter, UncertaintyRule
from latticewatch.testing.synthetic.frames import generate_frame

pytestmark = pytest.mark.slow

#: What may differ between two analyses of the same frame: how long they took.
TIMING_KEYS = ("seconds", "timings_s")


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(11)
    return [generate_frame(rng, shape=(512, 512), pixel_size_nm=0.025, n_particles=3, dose_range=(100.0, 150.0)).image
            for _ in range(3)]


@pytest.fixture
def inputs(tmp_path, images):
    folder = tmp_path / "in"
    folder.mkdir()
    stack = folder / "stack.mrc"
    with mrcfile.new(stack) as m:
        m.set_data(np.stack(images[:2]).astype(np.uint16))
        m.voxel_size = 0.25  # Å
    tif = folder / "single.tif"
    tifffile.imwrite(tif, images[2], compression="zlib", resolution=(4e8, 4e8), resolutionunit="CENTIMETER")
    truncated = folder / "truncated.mrc"
    truncated.write_bytes(stack.read_bytes()[:2000])
    text = folder / "notes.tif"
    text.write_text("not an image")
    holed = folder / "holed.mrc"  # a bad section between good ones: one failure, the others analysed
    sections = np.stack([images[0], images[1], images[2]]).astype(np.float32)
    sections[1, 10, 10] = np.nan
    with mrcfile.new(holed) as m, pytest.warns(RuntimeWarning, match="NaN"):  # mrcfile says so; it is meant
        m.set_data(sections)
        m.voxel_size = 0.25
    return {"stack": stack, "tif": tif, "truncated": truncated, "text": text, "holed": holed}


def _run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, json.loads(captured.out), captured.err


def _report(path):
    report = json.loads(path.read_text())
    return {k: v for k, v in report.items() if k not in TIMING_KEYS}


def test_batch_writes_what_process_writes(tmp_path, inputs, capsys):
    files = [str(inputs[k]) for k in ("truncated", "stack", "text", "holed", "tif")]
    code_p, process, _ = _run(capsys, "process", *files, "--out", str(tmp_path / "p"), "--json")
    code_b, batch, err = _run(capsys, "batch", *files, "--out", str(tmp_path / "b"), "--local-workers", "2", "--json")
    assert code_p == code_b == 1
    assert [r["frame_id"] for r in batch["frames"]] == [r["frame_id"] for r in process["frames"]]
    assert sorted(map(tuple, (f.values() for f in batch["failures"]))) == \
        sorted(map(tuple, (f.values() for f in process["failures"])))
    assert "truncated.mrc" in err and "notes.tif" in err
    assert f"{inputs['holed']}#1" in {f["frame_id"] for f in batch["failures"]}
    for name in ("stack_s0000", "stack_s0001", "holed_s0000", "holed_s0002", "single"):
        assert _report(tmp_path / "b" / f"{name}.json") == _report(tmp_path / "p" / f"{name}.json")
        for part in (f"{name}_particles.csv", f"{name}_overlay.png"):
            assert (tmp_path / "b" / part).read_bytes() == (tmp_path / "p" / part).read_bytes()
    with open(tmp_path / "b" / "particles.csv", newline="") as fh:
        combined = list(csv.DictReader(fh))
    assert len(combined) == sum(r["particles"] for r in batch["frames"]) > 0


def test_archived_frames_whole_are_reanalysed_reduced_ones_refused(tmp_path, inputs, capsys):
    whole, reduced = tmp_path / "whole", tmp_path / "reduced"
    _run(capsys, "process", str(inputs["tif"]), "--out", str(tmp_path / "p"), "--archive", str(whole), "--lossless",
         "--json")
    analyser = Analyser("nanoparticles", threads=1)
    with ArchiveWriter(reduced, "s1", uncertainty=UncertaintyRule(min_mean_confidence=None)) as writer:
        for frame in read_frames(str(inputs["stack"])):  # reduced whatever the segmentation's confidence
            writer.write(frame, analyser.analyse(frame))
    code, batch, err = _run(capsys, "batch", "--archive", str(whole), "--archive", str(reduced), "--out",
                            str(tmp_path / "b"), "--local-workers", "2", "--json")
    assert code == 1
    assert [r["frame_id"] for r in batch["frames"]] == [str(inputs["tif"])]
    assert sorted(f["frame_id"] for f in batch["failures"]) == [f"{inputs['stack']}#0", f"{inputs['stack']}#1"]
    assert all("stored reduced" in f["error"] for f in batch["failures"]) and "stored reduced" in err
    again, before = _report(tmp_path / "b" / "single.json"), _report(tmp_path / "p" / "single.json")
    assert again["regions"] == before["regions"]  # the exact pixels give the exact analysis
    assert again["meta"].pop("archive").startswith(str(whole))
    assert again == before


def _ledger_counts(path):
    if not path.exists():
        return {}
    ledger = Ledger(path)
    try:
        return ledger.counts()
    finally:
        ledger.close()


def test_a_killed_client_run_again_analyses_only_what_is_missing(tmp_path, images, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(24):
        with mrcfile.new(folder / f"f{i:02d}.mrc") as m:
            m.set_data(np.roll(images[i % 3], 7 * i, axis=1).astype(np.uint16))
            m.voxel_size = 0.25
    out = tmp_path / "out"
    ledger_path = out / ".latticewatch" / "ledger.sqlite"
    client = subprocess.Popen([sys.executable, "-m", "latticewatch", "batch", str(folder), "--out", str(out),
                               "--local-workers", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    family = psutil.Process(client.pid)
    deadline = time.monotonic() + 240
    while _ledger_counts(ledger_path).get("published", 0) < 3 and time.monotonic() < deadline:
        assert client.poll() is None, "the batch ended before it could be killed"
        time.sleep(0.05)
    workers = family.children(recursive=True)
    client.send_signal(signal.SIGKILL)
    client.wait()
    _, alive = psutil.wait_procs(workers, timeout=10)
    for orphan in alive:  # the cluster this test started, if it outlived its client
        os.kill(orphan.pid, signal.SIGKILL)
    done_before = _ledger_counts(ledger_path)["published"]
    assert 3 <= done_before < 24

    # finished on another cluster: one already running, as on Slurm, reached through --scheduler
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        code, again, _ = _run(capsys, "batch", str(folder), "--out", str(out), "--scheduler", cluster.scheduler_address,
                              "--json")
    assert code == 0
    assert again["skipped"] == done_before
    assert len(again["frames"]) == 24 - done_before  # only the missing frames were analysed
    ledger = Ledger(ledger_path)
    try:
        assert [ledger.analyses(str(p)) for p in sorted(folder.iterdir())] == [1] * 24
    finally:
        ledger.close()
    frame_events = [json.loads(line)["event_id"] for line in read_log(out / ".latticewatch" / "events.jsonl",
                                                                       types=["frame"])]
    assert sorted(frame_events) == sorted(f"{p}/frame" for p in folder.iterdir())
    with open(out / "particles.csv", newline="") as fh:
        keys = [(row["frame_id"], row["region_id"]) for row in csv.DictReader(fh)]
    assert len(keys) == len(set(keys)) > 0
    assert {k[0] for k in keys} <= {str(p) for p in folder.iterdir()}
