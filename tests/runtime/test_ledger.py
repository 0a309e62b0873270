"""Ledger state machine and the event log's crash recovery (no analysis needed)."""

import json
import sqlite3

import pytest

from latticewatch.runtime.ledger import Ledger, LedgerError
from latticewatch.sinks.events import EventLog, error_event, render


@pytest.fixture
def ledger(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    yield ledger
    ledger.close()


def lines(n, frame_id):
    return "".join(json.dumps({"event_id": f"{frame_id}/region/{i}"}) + "\n" for i in range(n))


def test_states_move_forward_only(ledger):
    assert ledger.see("a", source="s", origin="o")
    ledger.analysed("a", lines(1, "a"))
    with pytest.raises(LedgerError, match="analysed"):
        ledger.analysed("a", lines(1, "a"))  # never analysed twice
    ledger.published("a", 10)
    ledger.archived("a")
    assert ledger.state("a") == "archived" and ledger.analyses("a") == 1
    assert not ledger.see("a", source="s", origin="o")
    assert ledger.counts() == {"seen": 0, "analysed": 0, "published": 0, "archived": 1, "quarantined": 0}


def test_wal_mode_and_reopen_keeps_everything(tmp_path, ledger):
    ledger.see("a", source="s", origin="o", spool="key-a")
    ledger.quarantined("b", "bad header", render([error_event("b", "o", "bad header")]), source="s", origin="o")
    assert sqlite3.connect(tmp_path / "ledger.sqlite").execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    again = Ledger(tmp_path / "ledger.sqlite")
    assert again.spooled() == [("a", "key-a")]
    assert again.state("b") == "quarantined" and again.is_done("b") and not again.is_done("a")
    again.close()


def test_event_log_cut_back_and_republished_after_a_crash(tmp_path, ledger):
    log = EventLog(tmp_path / "events.jsonl", ledger)
    for fid in ("f1", "f2"):
        ledger.see(fid, source="s", origin="o")
    ledger.analysed("f1", lines(2, "f1"))
    log.publish("f1", lines(2, "f1"))
    ledger.analysed("f2", lines(3, "f2"))
    # the crash: f2's events half-written to the log, the ledger never told
    with open(tmp_path / "events.jsonl", "a") as fh:
        fh.write(lines(3, "f2")[:40])
    restarted = EventLog(tmp_path / "events.jsonl", ledger)
    assert restarted.recover() == 1
    ids = [json.loads(line)["event_id"] for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert ids == ["f1/region/0", "f1/region/1", "f2/region/0", "f2/region/1", "f2/region/2"]
    assert ledger.state("f2") == "published" and restarted.recover() == 0
