"""A real daemon process, SIGKILLed mid-stream and restarted: every section analysed exactly once.

SerialEM is emulated by `SerialEMStack` (pixels, header, mdoc — in that order) in this process,
while `latticewatch run` watches the folder in a subprocess. And ``latticewatch demo``, which
replays synthetic frames into its own daemon, ends with a summary scored against their truth.
"""

import json
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from latticewatch.sinks.archive import ArchiveReader
from latticewatch.testing.replay import SerialEMStack, synthetic_frames
from waiting import wait_until

N_SECTIONS = 24


def start(config, log_path):
    return subprocess.Popen([sys.executable, "-m", "latticewatch", "-v", "run", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=open(log_path, "ab"))


def frame_events(events_path):
    if not events_path.exists():
        return []
    return [json.loads(line) for line in events_path.read_text().splitlines() if line.strip()]


def test_sigkill_mid_stream_then_restart_loses_nothing_and_repeats_nothing(tmp_path, profile_dir, synthetic_images):
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    config = tmp_path / "lw.toml"
    config.write_text(
        f'profile = "{profile_dir}"\ndata_dir = "data"\n[runtime]\nthreads = 1\nqueue_size = 2\n'
        f'[sources.scope]\nkind = "folder"\npath = "incoming"\nsettle_s = 0.3\n'
    )
    events_path = tmp_path / "data" / "state" / "events.jsonl"
    log_path = tmp_path / "daemon.log"
    (incoming / "broken.mrc").write_bytes(b"MRC? no." * 200)  # malformed input among good data

    stack = SerialEMStack(incoming / "grid1.mrc", pixel_size_nm=0.05)
    written = threading.Event()

    def serialem():
        for k in range(N_SECTIONS):
            stack.append(synthetic_images[k % len(synthetic_images)])
            time.sleep(0.12)
        written.set()

    def analysed():
        return {e["frame_id"] for e in frame_events(events_path) if e["type"] == "frame"}

    def unarchived():
        with sqlite3.connect(tmp_path / "data" / "state" / "ledger.sqlite") as db:
            return db.execute("SELECT frame_id FROM frames WHERE state = 'published'").fetchall()

    daemon = start(config, log_path)
    try:
        threading.Thread(target=serialem, daemon=True).start()
        wait_until(lambda: len(analysed()) >= 5, 60, "the first frames")
        daemon.send_signal(signal.SIGKILL)  # mid-stream: SerialEM keeps writing
        daemon.wait(10)
        killed_at = len(analysed())
        assert killed_at < N_SECTIONS
        time.sleep(0.5)
        daemon = start(config, log_path)
        wait_until(lambda: len(analysed()) >= killed_at + 4, 60, "frames after the restart")
        daemon.send_signal(signal.SIGKILL)  # and once more, later
        daemon.wait(10)
        written.wait(30)
        daemon = start(config, log_path)
        wait_until(lambda: len(analysed()) == N_SECTIONS, 90, "all sections")
        wait_until(lambda: not unarchived(), 60, "the archive to catch up")
        time.sleep(1.0)  # anything extra would show up now
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(20) == 0, log_path.read_text()[-3000:]
    finally:
        if daemon.poll() is None:
            daemon.kill()

    evts = frame_events(events_path)
    ids = [e["event_id"] for e in evts]
    assert len(ids) == len(set(ids)), "an event was emitted twice"
    frames = [e["frame_id"] for e in evts if e["type"] == "frame"]
    assert sorted(frames) == sorted(f"scope:grid1.mrc#{k}" for k in range(N_SECTIONS))
    errors = [e for e in evts if e["type"] == "error"]
    assert [e["frame_id"] for e in errors] == ["scope:broken.mrc"] and "MRC" in errors[0]["problem"]
    db = sqlite3.connect(tmp_path / "data" / "state" / "ledger.sqlite")
    rows = db.execute("SELECT frame_id, state, analyses FROM frames").fetchall()
    assert {state for _, state, _ in rows} == {"archived", "quarantined"}
    assert all(n == 1 for fid, state, n in rows if state == "archived")
    # every section is in the archive (the sessions of the three starts), frames killed in flight included
    archived = {e.frame_id for e in ArchiveReader(tmp_path / "data" / "archive").entries()}
    assert archived == {f"scope:grid1.mrc#{k}" for k in range(N_SECTIONS)}
    assert (incoming / "broken.mrc").exists()  # bad files stay where they are


def demo(tmp_path, *options):
    out = subprocess.run(
        [sys.executable, "-m", "latticewatch", "demo", "--frames", "3", "--size", "256", "--rate", "0",
         "--dir", str(tmp_path), "--exit-when-done", "--metrics-port", "0",
         "--dashboard-port", "0", "--events-address", "tcp://127.0.0.1:0", *options],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out


def test_demo_runs_stops_by_itself_and_sums_up_against_the_truth(tmp_path, profile_dir):
    out = demo(tmp_path, "--profile", str(profile_dir))
    assert "3 frame(s) analysed" in out.stdout
    assert str(tmp_path / "data" / "state" / "events.jsonl") in out.stdout
    table = out.stdout.partition("3 frame(s) analysed")[2]
    assert re.search(r"^  particles +\d+ +\d+$", table, re.M), table
    assert re.search(r"^  defect fraction +(\d\.\d\d|–) +(\d\.\d\d|–)$", table, re.M), table
    assert re.search(r"^  Dice vs truth +[01]\.\d\d .*pooled over 3 frames", table, re.M), table
    assert re.search(r"^  flagged +\d+ out of domain, 0 quarantined", table, re.M), table
    assert '"analysed"' not in out.stdout  # the raw statistics only with --json


def test_demo_json_gives_the_stats_and_the_dice_of_the_archived_masks(tmp_path):
    # the shipped profile: the random test net finds no particle, and a Dice of 0 would prove little
    result = json.loads(demo(tmp_path, "--json").stdout)  # stdout is the JSON alone
    assert result["analysed"] == 3 and result["quarantined"] == 0 and result["archive"]["archived"] == 3
    summary = result["summary"]
    truths = {f"demo:demo.mrc#{k}": truth for k, (_, truth) in enumerate(synthetic_frames(3, shape=(256, 256)))}
    assert summary["frames_analysed"] == 3 and summary["dice_frames"] == 3
    # the daemon's masks as it archived them, against the truth generated again from the same seed
    overlap = pixels = 0
    for archived in ArchiveReader(tmp_path / "data" / "archive"):
        found, true = archived.mask() > 0, truths.pop(archived.frame_id).mask > 0
        overlap += np.count_nonzero(found & true)
        pixels += np.count_nonzero(found) + np.count_nonzero(true)
    assert not truths and overlap > 0
    assert summary["dice"] == pytest.approx(2 * overlap / pixels)
    if summary["out_of_domain"] == 0:
        truth_particles = sum(len(t.particles) for _, t in synthetic_frames(3, shape=(256, 256)))
        assert summary["truth"]["particles"] == truth_particles
