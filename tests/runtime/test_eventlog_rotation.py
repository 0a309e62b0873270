"""Rotation and retention of the event log on real files: order, compression, --since across files, what a kill
in the middle of a rotation leaves, and a writer process SIGKILLed at random moments (every event id exactly once)."""

import gzip
import json
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from latticewatch.config import EventLogConfig
from latticewatch.runtime.eventlog import EventLog, read_log, removed_until, rotated_files
from latticewatch.sinks.events import error_event, render


def publish(log, ledger, frame_id):
    events = [error_event(frame_id, "o", "bad header")]
    ledger.see(frame_id, source="s", origin="o")
    ledger.analysed(frame_id, render(events))
    log.publish(frame_id, events)


def ids(path, **kwargs):
    return [json.loads(line)["event_id"] for line in read_log(path, **kwargs)]


LINE = len(render([error_event("f000", "o", "bad header")]))  # bytes per frame here


def test_rotates_at_the_size_limit_compresses_and_reads_across_files_in_order(tmp_path, ledger):
    path = tmp_path / "events.jsonl"
    log = EventLog(path, ledger, rotation=EventLogConfig(max_bytes=3 * LINE, keep=0))
    for i in range(10):
        publish(log, ledger, f"f{i:03d}")
    log.tidy()
    files = rotated_files(path)
    assert [f.name for f in files] == ["events.jsonl.000001.gz", "events.jsonl.000002.gz", "events.jsonl.000003.gz"]
    assert all(len(gzip.decompress(f.read_bytes())) == 3 * LINE for f in files)
    assert not list(tmp_path.glob("events.jsonl.00000?"))  # the plain files went once compressed
    assert path.stat().st_size == LINE == ledger.events_end()  # the live file holds the 10th frame only
    expected = [f"f{i:03d}/error" for i in range(10)]
    assert ids(path) == expected
    assert ids(path, since="f001/error") == expected[2:]  # from inside the first rotated file on
    # a restart neither cuts nor repeats anything in the rotated files
    EventLog(path, ledger, rotation=EventLogConfig(max_bytes=3 * LINE, keep=0)).recover()
    assert ids(path) == expected


def test_rotates_by_age_too(tmp_path, ledger):
    path = tmp_path / "events.jsonl"
    log = EventLog(path, ledger, rotation=EventLogConfig(max_age_s=0.2, compress="none"))
    publish(log, ledger, "a")
    publish(log, ledger, "b")
    time.sleep(0.25)
    publish(log, ledger, "c")  # the file's first event is now older than max_age_s
    assert [f.name for f in rotated_files(path)] == ["events.jsonl.000001"]
    assert path.read_text() == "" and ids(path) == ["a/error", "b/error", "c/error"]


def test_retention_keeps_n_files_and_d_days_and_readers_say_what_is_gone(tmp_path, ledger, caplog):
    path = tmp_path / "events.jsonl"
    log = EventLog(path, ledger, rotation=EventLogConfig(max_bytes=LINE, keep=3, compress="none"))
    for i in range(6):
        publish(log, ledger, f"f{i:03d}")
    log.tidy()
    assert [f.name for f in rotated_files(path)] == [f"events.jsonl.00000{n}" for n in (4, 5, 6)]
    assert ids(path) == ["f003/error", "f004/error", "f005/error"]
    gone = removed_until(path)
    assert gone is not None
    with pytest.raises(KeyError, match="removed by retention"):
        ids(path, since="f000/error")
    with caplog.at_level(logging.WARNING, logger="latticewatch.runtime.eventlog"):
        assert ids(path, since="2000-01-01T00:00:00Z") == ["f003/error", "f004/error", "f005/error"]
    assert "removed by retention" in caplog.text

    week_old = time.time() - 7 * 86400
    os.utime(rotated_files(path)[0], (week_old, week_old))
    by_age = EventLog(path, ledger, rotation=EventLogConfig(max_bytes=LINE, keep=0, keep_days=2, compress="none"))
    by_age.tidy()
    assert [f.name for f in rotated_files(path)] == ["events.jsonl.000005", "events.jsonl.000006"]
    publish(by_age, ledger, "f006")  # numbers are never reused once retention removed files
    assert rotated_files(path)[-1].name == "events.jsonl.000007"


def test_a_kill_between_the_rename_and_the_ledger_reset_loses_and_repeats_nothing(tmp_path, ledger):
    path = tmp_path / "events.jsonl"
    log = EventLog(path, ledger)  # no rotation: this test performs the first half of one by hand
    publish(log, ledger, "f000")
    publish(log, ledger, "f001")
    os.rename(path, tmp_path / "events.jsonl.000001")  # ... and then the process was killed
    assert ledger.events_end() == (tmp_path / "events.jsonl.000001").stat().st_size > 0
    rotation = EventLogConfig(max_bytes=10 * LINE)
    restarted = EventLog(path, ledger, rotation=rotation)
    assert restarted.recover() == 0 and ledger.events_end() == 0
    # the restarted run appends a frame's events and is killed before the ledger commits them: the next start
    # must cut them (a stale recorded length would keep them, and the stored events would be appended again)
    stored = [error_event("f002", "o", "bad header")]
    ledger.see("f002", source="s", origin="o")
    ledger.analysed("f002", render(stored))
    with open(path, "ab") as fh:
        fh.write(render(stored).encode())
    assert EventLog(path, ledger, rotation=rotation).recover() == 1
    assert ids(path) == ["f000/error", "f001/error", "f002/error"]


def test_a_kill_during_compression_leaves_files_the_next_run_tidies(tmp_path, ledger):
    path = tmp_path / "events.jsonl"
    log = EventLog(path, ledger, rotation=EventLogConfig(max_bytes=LINE, compress="none"))
    for frame_id in ("f000", "f001", "f002"):
        publish(log, ledger, frame_id)
    first, second, _third = rotated_files(path)
    # killed after the .gz of the first got its name (before the plain file went), and half-way through the second
    (tmp_path / "events.jsonl.000001.gz").write_bytes(gzip.compress(first.read_bytes()))
    (tmp_path / ".events.jsonl.000002.gz.tmp-1-abcd").write_bytes(b"\x1f\x8b half")
    assert ids(path) == ["f000/error", "f001/error", "f002/error"]  # readers take the .gz and skip the temporary
    EventLog(path, ledger, rotation=EventLogConfig(max_bytes=LINE)).tidy()
    assert sorted(p.name for p in tmp_path.glob("*events.jsonl.*")) == [
        "events.jsonl.000001.gz", "events.jsonl.000002.gz", "events.jsonl.000003.gz"]
    assert ids(path) == ["f000/error", "f001/error", "f002/error"]


WRITER = textwrap.dedent("""
    import sys
    from latticewatch.config import EventLogConfig
    from latticewatch.runtime.eventlog import EventLog
    from latticewatch.runtime.ledger import Ledger
    from latticewatch.sinks.events import error_event, render

    root, n = sys.argv[1], int(sys.argv[2])
    ledger = Ledger(root + "/ledger.sqlite")
    log = EventLog(root + "/events.jsonl", ledger, rotation=EventLogConfig(max_bytes=int(sys.argv[3]), keep=0))
    log.recover()
    print("ready", flush=True)
    for i in range(n):
        frame_id = f"f{i:04d}"
        if ledger.is_done(frame_id):
            continue
        events = [error_event(frame_id, "o", "bad header"), error_event(frame_id + "/b", "o", "second")]
        ledger.see(frame_id, source="s", origin="o")
        ledger.analysed(frame_id, render(events))
        log.publish(frame_id, events)
    log.tidy()
    print("done", flush=True)
""")


def test_sigkill_at_random_moments_while_rotating_loses_and_repeats_no_event(tmp_path):
    n, rng, kills = 300, random.Random(14), 0
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    while True:
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(n), str(3 * LINE)],
                                  stdout=subprocess.PIPE, text=True, env=env)
        assert writer.stdout.readline() == "ready\n"
        if kills == 12:
            break
        time.sleep(rng.uniform(0.02, 0.3))  # a rotation every two frames: kills land in and near them
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        kills += 1
    assert writer.stdout.readline() == "done\n" and writer.wait(timeout=120) == 0
    got = ids(tmp_path / "events.jsonl")
    expected = [f"f{i:04d}{suffix}/error" for i in range(n) for suffix in ("", "/b")]
    assert len(got) == len(set(got)) and sorted(got) == sorted(expected)
    files = rotated_files(tmp_path / "events.jsonl")  # about one per two frames, all compressed by the last run
    assert len(files) >= n // 3 and all(f.suffix == ".gz" for f in files)
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]  # no temporary left
