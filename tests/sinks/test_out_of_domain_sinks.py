"""A frame outside the model's domain in the sinks: its warning event, no share in the defect statistics, lossless."""

import dataclasses
import json
import math

import jsonschema
from prometheus_client import CollectorRegistry

from latticewatch.schemas import load_schema
from latticewatch.sinks.archive import UncertaintyRule
from latticewatch.sinks.archive.rules import lossless_reason
from latticewatch.sinks.dashboard import DashboardState
from latticewatch.sinks.events import RunnerInfo, WarningEvent, frame_events, parse, render
from latticewatch.sinks.metrics import Metrics

RUNNER = RunnerInfo(phases_s={"segment": 0.1}, latency_s=0.2, budget_ms=None, overrun=False)
REASON = "one region spans the frame: 99.0 % of it, touching all four edges (limit 95 %)"


def frames(analysed):
    """A trusted frame with one fault among two oriented particles, then a doubtful one with three faults."""
    good = analysed(0, [("stacking_fault", 3.0), ("no_stacking_fault", 4.0)])
    frame, analysis = analysed(1, [("stacking_fault", 3.0)] * 3, coverage_px=4000)
    return good, (frame, dataclasses.replace(analysis, out_of_domain=(REASON,)))


def test_the_frame_events_end_with_a_warning_that_validates_and_parses_back(analysed):
    _, (frame, analysis) = frames(analysed)
    events = frame_events(frame, analysis, RUNNER)
    warning = events[-1]
    assert isinstance(warning, WarningEvent) and warning.event_id == "cam:1/out-of-domain"
    assert warning.kind == "model_out_of_domain" and warning.reasons == [REASON] and REASON in warning.problem
    assert events[0].out_of_domain == [REASON]
    for event in (events[0], warning):
        validator = jsonschema.Draft202012Validator(load_schema(event.type), format_checker=jsonschema.FormatChecker())
        validator.validate(json.loads(event.rendered()))
    assert render(parse(render(events))) == render(events)
    good_frame, good_analysis = frames(analysed)[0]
    assert not any(isinstance(e, WarningEvent) for e in frame_events(good_frame, good_analysis, RUNNER))


def test_metrics_count_the_frame_but_leave_its_particles_out_of_the_defect_fraction(analysed):
    metrics = Metrics(registry=CollectorRegistry())
    for frame, analysis in frames(analysed):
        metrics.consume(frame_events(frame, analysis, RUNNER))
    sample = metrics.registry.get_sample_value
    assert sample("latticewatch_frames_out_of_domain_total") == 1
    assert sample("latticewatch_frames_total", {"source": "cam", "outcome": "analysed"}) == 2
    assert sample("latticewatch_defect_fraction_rolling") == 0.5  # 1 of 2, not 4 of 5
    assert math.isnan(sample("latticewatch_defect_fraction"))  # the last frame is not trusted
    assert sample("latticewatch_particles_total", {"class": "stacking_fault"}) == 1


def test_the_dashboard_marks_the_frame_and_leaves_its_particles_out(analysed):
    state = DashboardState(history=10)
    for frame, analysis in frames(analysed):
        state.add_analysis(frame, analysis)
    snap = state.snapshot()
    assert snap["totals"]["out_of_domain"] == 1 and snap["totals"]["frames"] == 2 and snap["totals"]["particles"] == 2
    assert [s["out_of_domain"] for s in snap["series"]] == [False, True]
    assert [s["rolling"] for s in snap["series"]] == [0.5, 0.5]
    assert snap["series"][1]["defect_fraction"] is None
    assert snap["class_totals"]["stacking_fault"] == 1 and sum(snap["sizes"]["counts"]["stacking_fault"]) == 1
    assert snap["verdict"]["verdict"] == "unknown" and snap["verdict"]["out_of_domain"] == [REASON]


def test_the_archive_keeps_the_frame_whole_whatever_the_uncertainty_thresholds(analysed):
    trusting = UncertaintyRule(min_mean_confidence=None)
    (good_frame, good), (frame, doubtful) = frames(analysed)
    assert lossless_reason(good_frame, good, reduce=True, rule=trusting) is None
    assert lossless_reason(frame, doubtful, reduce=True, rule=trusting) == f"model out of domain: {REASON}"
