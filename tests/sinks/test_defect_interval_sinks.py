"""The defect fraction with its interval wherever it is shown: the analysis, the frame event, the per-frame report,
the metrics and the dashboard. Only stacking_fault / no_stacking_fault particles of trusted frames count."""

import dataclasses
import json
import math

import jsonschema
import pytest
from prometheus_client import CollectorRegistry

from latticewatch.schemas import load_schema
from latticewatch.sinks.dashboard import DashboardState
from latticewatch.sinks.events import RunnerInfo, frame_events, parse, render
from latticewatch.sinks.metrics import Metrics
from latticewatch.sinks.reports import frame_report
from latticewatch.stages.defect_fraction import DefectConfusion, estimate_defect_fraction

RUNNER = RunnerInfo(phases_s={"segment": 0.1}, latency_s=0.2, budget_ms=None, overrun=False)
CONFUSION = DefectConfusion(true_stacking_fault=(85, 15), true_no_stacking_fault=(10, 90), data="held-out test set")
#: Particles that are not on zone axis or not confidently classified: none of them counts.
NOT_COUNTED = [("uncertain", 3.0), ("misoriented", 3.0), ("agglomeration", 9.0), ("empty", 2.0)]


@pytest.fixture
def confused(analysed):
    """``confused(k, n_sf, n_nosf)``: a frame with that many faults and fault-free particles, plus the uncounted
    ones, analysed by a classifier with `CONFUSION`."""

    def make(k, n_sf, n_nosf, **changes):
        labels = [("stacking_fault", 3.0)] * n_sf + [("no_stacking_fault", 4.0)] * n_nosf + NOT_COUNTED
        frame, analysis = analysed(k, labels)
        return frame, dataclasses.replace(analysis, defect_confusion=CONFUSION, **changes)

    return make


def test_the_analysis_counts_only_zone_axis_particles_and_corrects_them(confused):
    frame, analysis = confused(0, 6, 14)
    expected = estimate_defect_fraction(6, 14, CONFUSION)
    assert analysis.defect == expected and analysis.defect.raw == 0.3
    assert analysis.defect_fraction == expected.estimate != expected.raw
    _, doubtful = confused(1, 6, 14, out_of_domain=("probability near 0.5",))
    assert doubtful.defect.counted == 0 and doubtful.defect_fraction is None and doubtful.defect.upper is None


def test_the_frame_event_and_report_carry_estimate_raw_bounds_and_confusion(confused):
    frame, analysis = confused(0, 6, 14)
    event = frame_events(frame, analysis, RUNNER)[0]
    d = analysis.defect
    assert event.defect_fraction == pytest.approx(d.estimate, abs=1e-4) and event.defect_fraction_raw == 0.3
    assert event.defect_fraction_lower < event.defect_fraction < event.defect_fraction_upper
    assert (event.defect_fraction_lower, event.defect_fraction_upper) == pytest.approx((d.lower, d.upper), abs=1e-4)
    assert event.defect_confusion == CONFUSION
    jsonschema.Draft202012Validator(load_schema("frame")).validate(json.loads(event.rendered()))
    assert parse(render([event]))[0].defect_confusion == CONFUSION
    report = frame_report(frame, analysis)
    assert {k: report[k] for k in ("defect_fraction", "defect_fraction_lower", "defect_fraction_upper")} == {
        "defect_fraction": event.defect_fraction, "defect_fraction_lower": event.defect_fraction_lower,
        "defect_fraction_upper": event.defect_fraction_upper}
    # a consumer can pool frames from the event alone: its counts and its confusion give back its interval
    again = estimate_defect_fraction(event.class_counts["stacking_fault"], event.class_counts["no_stacking_fault"],
                                     event.defect_confusion)
    assert again.lower == pytest.approx(event.defect_fraction_lower, abs=1e-4)


def test_an_event_logged_before_the_interval_existed_still_parses(confused):
    line = json.loads(frame_events(*confused(0, 1, 1), RUNNER)[0].rendered())
    for key in ("defect_fraction_raw", "defect_fraction_lower", "defect_fraction_upper", "defect_confusion"):
        del line[key]
    [event] = parse(json.dumps(line))
    assert event.defect_fraction_lower is None and event.defect_confusion is None


def test_metrics_show_the_frame_and_the_pooled_rolling_estimate_with_bounds(confused):
    metrics = Metrics(registry=CollectorRegistry(), rolling_frames=2)
    sample = metrics.registry.get_sample_value
    assert math.isnan(sample("latticewatch_defect_fraction_rolling_bounds", {"bound": "upper"}))
    for k, (n_sf, n_nosf) in enumerate([(9, 1), (1, 0), (2, 18)]):
        metrics.consume(frame_events(*confused(k, n_sf, n_nosf), RUNNER))
    last = estimate_defect_fraction(2, 18, CONFUSION)
    assert sample("latticewatch_defect_fraction") == pytest.approx(last.estimate, abs=1e-4)
    assert sample("latticewatch_defect_fraction_bounds", {"bound": "lower"}) == pytest.approx(last.lower, abs=1e-4)
    assert sample("latticewatch_defect_fraction_bounds", {"bound": "upper"}) == pytest.approx(last.upper, abs=1e-4)
    # the last two frames pooled: 3 faults in 21, not the mean of 1.0 and 0.1
    pooled = estimate_defect_fraction(3, 18, CONFUSION)
    assert sample("latticewatch_defect_fraction_rolling") == pytest.approx(pooled.estimate)
    assert sample("latticewatch_defect_fraction_rolling_bounds", {"bound": "lower"}) == pytest.approx(pooled.lower)
    assert sample("latticewatch_defect_fraction_rolling_bounds", {"bound": "upper"}) == pytest.approx(pooled.upper)
    # a frame outside the domain: no per-frame fraction, and the rolling one unchanged
    metrics.consume(frame_events(*confused(3, 9, 0, out_of_domain=("probability near 0.5",)), RUNNER))
    assert math.isnan(sample("latticewatch_defect_fraction_bounds", {"bound": "lower"}))
    assert sample("latticewatch_defect_fraction_rolling") == pytest.approx(pooled.estimate)


def test_the_dashboard_series_has_the_rolling_band_and_the_size_bins_their_interval(confused):
    state = DashboardState(history=10, rolling=2)
    for k, (n_sf, n_nosf) in enumerate([(9, 1), (1, 0), (2, 18)]):
        state.add_analysis(*confused(k, n_sf, n_nosf))
    state.add_analysis(*confused(3, 5, 0, out_of_domain=("probability near 0.5",)))
    snap = json.loads(json.dumps(state.snapshot()))  # what the page gets
    series = snap["series"]
    pooled = estimate_defect_fraction(3, 18, CONFUSION)
    assert series[2]["rolling"] == pytest.approx(pooled.estimate, abs=1e-4)
    assert series[2]["rolling_interval"] == pytest.approx({"lower": pooled.lower, "upper": pooled.upper}, abs=1e-4)
    assert series[3]["defect_fraction"] is None and series[3]["defect"] == {"lower": None, "upper": None}
    assert series[3]["rolling"] == pytest.approx(estimate_defect_fraction(2, 18, CONFUSION).estimate, abs=1e-4)
    assert series[0]["defect"]["lower"] < series[0]["defect_fraction"] <= series[0]["defect"]["upper"] == 1.0
    sizes = snap["sizes"]
    fault_bin = next(i for i, n in enumerate(sizes["oriented"]) if n)
    interval = sizes["defect_interval"][fault_bin]
    assert interval["lower"] <= sizes["defect_fraction"][fault_bin] <= interval["upper"]
    assert snap["verdict"]["defect_fraction_upper"] is None  # the last frame is not trusted
