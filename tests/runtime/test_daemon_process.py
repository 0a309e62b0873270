"""A real daemon process, SIGKILLed mid-stream and restarted: every section analysed exactly once.

SerialEM is emulated by `SerialEMStack` (pixels, header, mdoc — in that order) in this process,
while `latticewatch run` watches the folder in a subprocess. (``latticewatch demo``: test_demo.py.)
"""

import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time

from latticewatch.sinks.archive import ArchiveReader
from latticewatch.testing.replay import SerialEMStack
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

