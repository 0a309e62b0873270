"""The event models: the shipped JSON Schemas are generated from them; the JSON they render is what consumers got."""

import json
from datetime import datetime, timezone

import jsonschema
import numpy as np
import pydantic
import pytest

from latticewatch.schemas import SCHEMAS, generate_schema, load_schema
from latticewatch.sinks.events import (
    ErrorEvent,
    FrameEvent,
    ParticleEvent,
    PublisherCounters,
    RunnerInfo,
    StatusEvent,
    archive_error_event,
    error_event,
    frame_events,
    now,
    parse,
    pixel_size_warning,
    render,
    topics,
)
from latticewatch.sinks.reports import frame_report

RUNNER = RunnerInfo(phases_s={"prepare": 0.01, "segment": 0.2, "finish": 0.03}, latency_s=0.5, budget_ms=250.0,
                    overrun=True)


@pytest.mark.parametrize("event_type", SCHEMAS)
def test_shipped_schemas_are_the_ones_generated_from_the_models(event_type):
    assert load_schema(event_type) == generate_schema(event_type), (
        f"{event_type}.v1.json differs from its model; regenerate the shipped schemas: python -m latticewatch.schemas")


@pytest.fixture
def events(analysed):
    frame, analysis = analysed(4, [("stacking_fault", 3.0), ("empty", 5.5)])
    meta = {"mdoc": {"Magnification": 380000, "StagePosition": [1.5, -2.0]}, "note": "Ångström"}
    acquired = datetime(2024, 6, 1, 10, tzinfo=timezone.utc)
    frame = type(frame)(frame.frame_id, frame.pixels, frame.pixel_size_nm, acquired, meta, "/x/grid.mrc")
    return frame, analysis, frame_events(frame, analysis, RUNNER)


def test_frame_events_render_the_keys_and_values_of_the_dicts_published_before_the_models(events):
    frame, analysis, evts = events
    report = frame_report(frame, analysis)
    regions = report.pop("regions")
    at = evts[0].at
    # what the daemon rendered before the events were models: the report's dicts, `runner` last (the values the
    # analyser computes have the fields' types; an int given for a float field would now be written 2.0, not 2)
    before = [{"event_id": f"{frame.frame_id}/frame", "type": "frame", "at": at, **report,
               "runner": RUNNER.model_dump()},
              *({"event_id": f"{frame.frame_id}/region/{r['region_id']}", "type": "particle", "at": at,
                 "frame_id": frame.frame_id, **r} for r in regions)]
    old_default = lambda v: v.isoformat() if isinstance(v, datetime) else v.item()  # noqa: E731
    assert render(evts) == "".join(json.dumps(e, default=old_default, separators=(",", ":")) + "\n" for e in before)
    assert [e.event_id for e in evts] == ["cam:4/frame", "cam:4/region/0", "cam:4/region/1"]


def test_notices_render_as_before():
    err = archive_error_event("cam:s#3", "o", "disk full", reason="no_space", retry_in_s=5.0)
    assert list(json.loads(err.rendered())) == ["event_id", "type", "at", "frame_id", "origin", "problem", "component",
                                                "reason", "retry_in_s"]
    assert list(json.loads(error_event("cam:1", "o", "bad header").rendered())) == [
        "event_id", "type", "at", "frame_id", "origin", "problem"]  # no archive fields, not even null
    warning = json.loads(pixel_size_warning("cam:0", "o", "no pixel size", source="cam").rendered())
    assert warning["event_id"] == "cam:0/pixel-size" and warning["type"] == "warning" and warning["source"] == "cam"


def test_every_event_validates_against_the_schema_of_each_topic_it_is_sent_on(events):
    *_, evts = events
    status = StatusEvent(event_id="status/run/1", at=now(), fps=1.5, analysed=3, quarantined=0, overruns=1, deferred=0,
                         budget_ms=None, backlog={"prepare": 0},
                         publisher=PublisherCounters(sent=4, dropped=0, status=1))
    notices = [error_event("cam:1", "o", "bad header"), pixel_size_warning("cam:0", "o", "no pixel size", source="cam"),
               archive_error_event("cam:2", "o", "disk full", reason="no_space", retry_in_s=5.0)]
    sent = set()
    for event in [*evts, *notices, status]:
        for topic in topics(event):
            validator = jsonschema.Draft202012Validator(load_schema(topic), format_checker=jsonschema.FormatChecker())
            validator.validate(json.loads(event.rendered()))
            sent.add(topic)
    assert sent == set(SCHEMAS)


def test_parse_gives_back_the_events_and_their_exact_lines(events):
    *_, evts = events
    text = render(evts)
    again = parse(text)
    assert [e.model_dump() for e in again] == [e.model_dump() for e in evts] and render(again) == text
    assert isinstance(again[0], FrameEvent) and again[0].analysed is None  # pixels are not in the log
    assert evts[0].analysed is not None
    with pytest.raises(ValueError):
        parse('{"event_id": "a/frame", "type": "frame"}\n')


def test_a_copy_renders_itself_again():
    event = error_event("cam:1", "o", "bad header")
    assert json.loads(event.model_copy(update={"problem": "other"}).rendered())["problem"] == "other"
    assert json.loads(event.rendered())["problem"] == "bad header"


def particle(**changes):
    fields = dict(event_id="m:0/region/0", at=now(), frame_id="m:0", region_id=0, bbox=(0, 0, 2, 2),
                  centroid_px=(1.0, 1.0), centroid_nm=None, area_px=4, area_nm2=None, equivalent_diameter_nm=None,
                  eccentricity=0.5, solidity=0.9, touches_edge=False, agglomerate_suspect=False, features={},
                  label="stacking_fault", probabilities={"stacking_fault": 0.75})
    return ParticleEvent(**{**fields, **changes})


def test_fractions_take_float_rounding_at_their_bounds_but_nothing_more():
    assert particle(solidity=1 + 2e-16).solidity == 1.0  # a convex hull's area a hair under the pixel count
    assert particle(probabilities={"empty": np.float32(1.0)}).probabilities == {"empty": 1.0}
    with pytest.raises(pydantic.ValidationError, match="solidity"):
        particle(solidity=1.01)
    with pytest.raises(pydantic.ValidationError, match="event_id"):
        particle(event_id="m:0/frame")


def test_defects_are_published_on_their_own_topic_too():
    assert topics(particle()) == ("particle", "defect")
    assert topics(particle(label="empty")) == ("particle",)
    assert isinstance(error_event("a", "", "x"), ErrorEvent) and topics(error_event("a", "", "x")) == ("error",)
