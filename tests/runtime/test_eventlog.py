"""The event log feeds the sinks typed events once durable, in log order, after a restart too; a failing sink is
counted and never stops the log (no analysis needed)."""

import logging

from latticewatch.runtime.eventlog import EventLog
from latticewatch.sinks.events import ErrorEvent, error_event, pixel_size_warning, render


class Recorder:
    name = "recorder"

    def __init__(self, log_path=None):
        self.batches = []
        self.log_path = log_path

    def consume(self, events):
        # the events are durable when a sink sees them
        assert self.log_path is None or events[-1].rendered() in self.log_path.read_text()
        self.batches.append(list(events))


class Broken:
    name = "broken"

    def consume(self, events):
        raise RuntimeError("sink bug")


def quarantine(ledger, frame_id):
    events = [error_event(frame_id, "o", "bad header")]
    ledger.quarantined(frame_id, "bad header", render(events), source="s", origin="o")
    return events


def test_sinks_get_the_typed_events_once_durable_and_a_failing_sink_is_counted(tmp_path, ledger, caplog):
    path = tmp_path / "events.jsonl"
    recorder, failures = Recorder(path), []
    log = EventLog(path, ledger, sinks=[Broken(), recorder], on_sink_error=failures.append)
    first = quarantine(ledger, "a")
    with caplog.at_level(logging.ERROR, logger="latticewatch.runtime.eventlog"):
        log.publish("a", first)
        log.notify([pixel_size_warning("b", "o", "no pixel size", source="s")])
    assert [[e.event_id for e in batch] for batch in recorder.batches] == [["a/error"], ["b/pixel-size"]]
    assert recorder.batches[0][0] is first[0]
    assert [s.name for s in failures] == ["broken", "broken"] and "sink broken failed on a/error" in caplog.text
    assert path.read_text() == render([*first, *recorder.batches[1]])
    assert ledger.state("a") == "quarantined" and ledger.events_end() == path.stat().st_size


def test_after_a_restart_sinks_get_the_stored_events_with_their_stored_bytes(tmp_path, ledger):
    stored = render(quarantine(ledger, "a"))  # stored, then the process died before the append
    recorder = Recorder()
    assert EventLog(tmp_path / "events.jsonl", ledger, sinks=[recorder]).recover() == 1
    [[event]] = recorder.batches
    assert isinstance(event, ErrorEvent) and event.rendered() + "\n" == stored
    assert (tmp_path / "events.jsonl").read_text() == stored


def test_stored_text_that_is_not_an_event_of_this_version_is_still_logged(tmp_path, ledger, caplog):
    ledger.see("a", source="s", origin="o")
    ledger.analysed("a", '{"event_id":"a/frame","type":"frame","legacy":1}\n')
    recorder = Recorder()
    with caplog.at_level(logging.ERROR, logger="latticewatch.runtime.eventlog"):
        assert EventLog(tmp_path / "events.jsonl", ledger, sinks=[recorder]).recover() == 1
    assert recorder.batches == [] and "not events of this version" in caplog.text
    assert (tmp_path / "events.jsonl").read_text() == '{"event_id":"a/frame","type":"frame","legacy":1}\n'
    assert ledger.state("a") == "published"
