"""Ledger state machine and the event log's crash recovery (no analysis needed)."""

import json
import sqlite3

import pytest

from latticewatch.runtime.eventlog import EventLog
from latticewatch.runtime.ledger import Ledger, LedgerError
from latticewatch.sinks.events import ParticleEvent, error_event, now, render


def particles(n, frame_id):
    return [ParticleEvent(event_id=f"{frame_id}/region/{i}", at=now(), frame_id=frame_id, region_id=i,
                          bbox=(0, 0, 2, 2), centroid_px=(1.0, 1.0), centroid_nm=None, area_px=4, area_nm2=None,
                          equivalent_diameter_nm=None, eccentricity=0.0, solidity=1.0, touches_edge=False,
                          agglomerate_suspect=False, features={}, label="unclassified", probabilities={})
            for i in range(n)]


def lines(n, frame_id):
    return render(particles(n, frame_id))


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
    f1, f2 = particles(2, "f1"), particles(3, "f2")
    ledger.analysed("f1", render(f1))
    log.publish("f1", f1)
    ledger.analysed("f2", render(f2))
    # the crash: f2's events half-written to the log, the ledger never told
    with open(tmp_path / "events.jsonl", "a") as fh:
        fh.write(render(f2)[:40])
    restarted = EventLog(tmp_path / "events.jsonl", ledger)
    assert restarted.recover() == 1
    ids = [json.loads(line)["event_id"] for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert ids == ["f1/region/0", "f1/region/1", "f2/region/0", "f2/region/1", "f2/region/2"]
    assert ledger.state("f2") == "published" and restarted.recover() == 0
