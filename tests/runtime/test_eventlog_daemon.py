"""A real daemon with a small ``[events.log] max_bytes``: the log rotates while SerialEM writes, a SIGKILL and a restart
in the middle, and ``latticewatch events`` still gives every frame's event exactly once, in order, across the files."""

import json
import signal
import subprocess
import sys
import time

from latticewatch.runtime.eventlog import read_log, rotated_files
from latticewatch.testing.replay import SerialEMStack
from waiting import wait_until

N_SECTIONS = 12


def test_the_daemon_rotates_its_log_and_a_kill_repeats_and_loses_no_event(tmp_path, profile_dir, synthetic_images):
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    config = tmp_path / "lw.toml"
    config.write_text(
        f'profile = "{profile_dir}"\ndata_dir = "data"\n[runtime]\nthreads = 1\nqueue_size = 2\n'
        '[archive]\nenabled = false\n[metrics]\nenabled = false\n[dashboard]\nenabled = false\n'
        '[events]\nenabled = false\n[events.log]\nmax_bytes = 3000\nkeep = 0\n'
        '[sources.scope]\nkind = "folder"\npath = "incoming"\nsettle_s = 0.2\n'
    )
    events_path = tmp_path / "data" / "state" / "events.jsonl"

    def start():
        return subprocess.Popen([sys.executable, "-m", "latticewatch", "run", "--config", str(config)],
                                stdout=subprocess.DEVNULL, stderr=open(tmp_path / "daemon.log", "ab"))

    def frames():
        if not events_path.exists():
            return []
        return [e["frame_id"] for e in map(json.loads, read_log(events_path, types=["frame"]))]

    stack = SerialEMStack(incoming / "grid1.mrc", pixel_size_nm=0.05)
    daemon = start()
    try:
        for k in range(N_SECTIONS // 2):
            stack.append(synthetic_images[k % len(synthetic_images)])
        wait_until(lambda: len(frames()) >= 3, 120, "three frames analysed")
        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
        daemon = start()
        for k in range(N_SECTIONS // 2, N_SECTIONS):
            stack.append(synthetic_images[k % len(synthetic_images)])
            time.sleep(0.1)
        wait_until(lambda: len(frames()) >= N_SECTIONS, 180, "every section analysed")
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0
    finally:
        daemon.kill()
    ids = [json.loads(line)["event_id"] for line in read_log(events_path)]
    assert len(ids) == len(set(ids))
    assert sorted(frames()) == sorted(f"scope:grid1.mrc#{k}" for k in range(N_SECTIONS))
    assert len(rotated_files(events_path)) >= 3
    listed = subprocess.run([sys.executable, "-m", "latticewatch", "events", "--state", str(events_path.parent),
                             "--topic", "frame"], capture_output=True, text=True, check=True).stdout
    assert [json.loads(line)["frame_id"] for line in listed.splitlines()] == frames()
