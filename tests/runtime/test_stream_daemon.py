"""A real daemon process on a ZeroMQ stream, SIGKILLed twice while a camera keeps sending: every frame number
ends up analysed once or reported missing once, and the missing ones are exactly the frames lost."""

import json
import signal
import socket
import sqlite3
import subprocess
import sys
import time

import zmq

from latticewatch.frame import Frame
from latticewatch.testing.replay import ZmqPublisher
from waiting import wait_until

N_FRAMES = 60


def start(config, log_path):
    return subprocess.Popen([sys.executable, "-m", "latticewatch", "-v", "run", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=open(log_path, "ab"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ledger_ids(state):
    path = state / "ledger.sqlite"
    if not path.exists():
        return []
    with sqlite3.connect(path) as db:
        return [row[0] for row in db.execute("SELECT frame_id FROM frames")]


def test_kills_lose_only_frames_that_are_then_counted_exactly(tmp_path, profile_dir, synthetic_images):
    port = free_port()
    config = tmp_path / "lw.toml"
    config.write_text(
        f'profile = "{profile_dir}"\ndata_dir = "data"\n[runtime]\nthreads = 1\nqueue_size = 2\n'
        '[archive]\nenabled = false\n[events]\nenabled = false\n[metrics]\nenabled = false\n'
        '[dashboard]\nenabled = false\n'
        f'[sources.cam]\nkind = "zmq"\naddress = "tcp://127.0.0.1:{port}"\nhigh_water_mark = 2\n'
    )
    state = tmp_path / "data" / "state"
    log_path = tmp_path / "daemon.log"
    camera = ZmqPublisher(f"tcp://127.0.0.1:{port}", series="run1", send_timeout_s=0.3)
    daemon = start(config, log_path)
    sent = 0
    try:
        for n in range(N_FRAMES):
            image = synthetic_images[n % len(synthetic_images)]
            sent += camera.send(Frame(f"x{n}", image, 0.05))
            time.sleep(0.05)
            if n in (15, 35):  # kill mid-stream; the camera goes on and drops what nobody takes
                daemon.send_signal(signal.SIGKILL)
                daemon.wait(10)
            if n in (22, 42):
                daemon = start(config, log_path)
                wait_until(lambda: camera.sock.poll(100, zmq.POLLOUT), 60, "the restarted daemon to connect")
        camera.close()  # series_end: frames lost at the end are reported too
        accounted = {}

        def everything_accounted():
            accounted.clear()
            for fid in ledger_ids(state):
                number = fid.removeprefix("cam:run1#")
                if number.isdigit():
                    accounted.setdefault(int(number), []).append("frame")
                elif number.endswith("~missing"):
                    first, _, last = number.removesuffix("~missing").partition("-")
                    for k in range(int(first), int(last or first) + 1):
                        accounted.setdefault(k, []).append("missing")
            return len(accounted) == N_FRAMES

        wait_until(everything_accounted, 120, "every frame number analysed or reported missing")
        wait_until(lambda: "seen" not in _states(state), 120, "every received frame analysed")
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0, log_path.read_text()[-3000:]
    finally:
        if daemon.poll() is None:
            daemon.kill()
    assert all(len(v) == 1 for v in accounted.values()), {k: v for k, v in accounted.items() if len(v) > 1}
    frames = sorted(k for k, v in accounted.items() if v == ["frame"])
    missing = sorted(k for k, v in accounted.items() if v == ["missing"])
    assert camera.dropped > 0 and missing, "the kills should have cost frames"
    assert len(missing) >= camera.dropped  # dropped by the camera, plus any inside the sockets at a kill
    assert len(frames) + len(missing) == N_FRAMES and len(frames) <= sent
    events = [json.loads(line) for line in (state / "events.jsonl").read_text().splitlines() if line.strip()]
    ids = [e["event_id"] for e in events]
    assert len(ids) == len(set(ids))
    analysed = sorted(int(e["frame_id"].rpartition("#")[2]) for e in events if e["type"] == "frame")
    assert analysed == frames  # each frame analysed exactly once
    reported = [e for e in events if e["type"] == "error" and e["frame_id"].endswith("~missing")]
    assert sum(int(e["problem"].split(": ")[1].split()[0]) for e in reported) == len(missing)


def _states(state):
    with sqlite3.connect(state / "ledger.sqlite") as db:
        return {row[0] for row in db.execute("SELECT DISTINCT state FROM frames")}
