"""`latticewatch bench --startup`: cold starts timed in fresh interpreters (the goal is the benchmark's to check)."""

import json

from latticewatch.cli import main


def test_startup_bench_times_process_and_the_daemon_in_fresh_interpreters(capsys):
    assert main(["bench", "--startup", "--repeats", "1", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert results["failures"] == []
    assert results["goals_s"] == {"process": 2.0, "daemon_ready": 3.0}
    interpreter, process, daemon = (results[k] for k in ("interpreter", "process", "daemon_ready"))
    assert len(process["runs_s"]) == len(daemon["runs_s"]) == 1
    # loading the profile and analysing a frame cannot be faster than starting Python
    assert process["median_s"] > interpreter["median_s"] > 0 and daemon["median_s"] > interpreter["median_s"]


def test_a_failing_process_run_is_reported_not_timed(tmp_path, capsys):
    bad = tmp_path / "bad.mrc"
    bad.write_bytes(b"not an MRC file")
    assert main(["bench", "--startup", "--repeats", "1", "--no-daemon", "--startup-file", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "failed: process: exit code 1" in out and "bad.mrc" in out and "daemon_ready" not in out
