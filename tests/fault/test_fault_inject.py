"""`scripts/fault-inject`, small: SIGKILLs during a replay for both sources, and bad consumers beside the pipeline.

The full run (N=1000, K=20) is the README's figure; here N=60, K=3 per source, the last kill once every frame is
out (a stream whose end went down with the daemon once left the run waiting for frames nobody would name). The rate
comparison is not timing-flaky: the same fixed number of frames with and without the bad consumers, passing at half
the rate.
"""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "fault-inject"


def test_fault_inject_small(tmp_path):
    out = tmp_path / "fi.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--frames", "60", "--kills", "3", "--rate-frames", "100",
                           "--timeout", "300", "--workdir", str(tmp_path), "--out", str(out)],
                          capture_output=True, text=True, timeout=1200)
    report = json.loads(out.read_text())
    assert [r["source"] for r in report["kills"]] == ["folder", "zmq"]
    for run in report["kills"]:
        assert run["kills"] == 3, run
        assert not run["analysed_twice"] and run["duplicate_event_ids"] == 0, run
        assert run["final_exit_code"] == 0, run
        if run["source"] == "folder":
            assert run["lost"] == 0 and run["analysed"] == 60, run
        else:  # what ZeroMQ held when the daemon was killed may be lost, but never silently
            assert run["loss_counted_exactly"] and run["analysed"] + run["reported_missing"] == 60, run
            # the last kill comes once the whole series is out: what it lost is named by the series' end
            assert run["kill_points"][-1]["at"] == 60, run["kill_points"]
    consumers = report["consumers"]
    assert consumers["with_bad_consumers"]["daemon_alive"]
    assert consumers["rate_ratio"] >= 0.5, consumers
    assert done.returncode == 0 and report["ok"], done.stderr[-3000:]


def test_fault_inject_help():
    done = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "--kills" in done.stdout and "--frames" in done.stdout
