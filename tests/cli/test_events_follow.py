"""``latticewatch events --follow`` in its own process: it prints what another process appends, across rotations
(plain and compressed), with --since and --topic applied, and Ctrl-C ends it with exit code 0."""

import json
import os
import queue
import signal
import subprocess
import sys
import threading

from latticewatch.config import EventLogConfig
from latticewatch.runtime.eventlog import EventLog, rotated_files
from latticewatch.runtime.ledger import Ledger
from latticewatch.sinks.events import error_event, pixel_size_warning, render


def publish(log, ledger, frame_id):
    events = [error_event(frame_id, "o", "bad header")]
    ledger.see(frame_id, source="s", origin="o")
    ledger.analysed(frame_id, render(events))
    log.publish(frame_id, events)


def lines_of(process):
    """The process's stdout lines in a queue (readline with a timeout), and the thread filling it."""
    lines = queue.Queue()

    def read():
        for line in process.stdout:
            lines.put(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return lines, reader


def test_follow_prints_events_appended_by_another_process_across_rotations_until_ctrl_c(tmp_path):
    state = tmp_path / "state"
    ledger = Ledger(state / "ledger.sqlite")
    # three frames' errors per file: every few appends the file under the follower is renamed, later gzipped
    log = EventLog(state / "events.jsonl", ledger, rotation=EventLogConfig(max_bytes=380, keep=0))
    for i in range(4):
        publish(log, ledger, f"f{i:03d}")
    log.notify([pixel_size_warning("f003", "o", "no pixel size", source="s")])
    follower = subprocess.Popen(
        [sys.executable, "-m", "latticewatch", "events", "--follow", "--state", str(state),
         "--since", "f001/error", "--topic", "error"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        lines, reader = lines_of(follower)
        printed = [json.loads(lines.get(timeout=60))["event_id"] for _ in range(2)]
        assert printed == ["f002/error", "f003/error"]  # the log so far, after the id, errors only
        for i in range(4, 20):
            publish(log, ledger, f"f{i:03d}")
            if i % 5 == 0:
                log.tidy()  # compress what the follower may be about to read
        printed += [json.loads(lines.get(timeout=30))["event_id"] for _ in range(4, 20)]
        assert printed == [f"f{i:03d}/error" for i in range(2, 20)]
        assert len(rotated_files(state / "events.jsonl")) >= 5
        follower.send_signal(signal.SIGINT)
        assert follower.wait(timeout=30) == 0
        reader.join(timeout=10)
        assert lines.empty() and "Traceback" not in follower.stderr.read()
    finally:
        follower.kill()
        ledger.close()
