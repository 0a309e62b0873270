"""The shipped Grafana dashboard only asks for metrics the daemon exports."""

import json
import re
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from latticewatch.sinks.events import RunnerInfo, error_event, frame_events
from latticewatch.sinks.metrics import METRIC_NAMES, Metrics

DASHBOARD = Path(__file__).parents[2] / "grafana" / "latticewatch.json"
SUFFIXES = ("_bucket", "_sum", "_count", "_created", "_total", "_info")
PROMQL_WORDS = {"sum", "by", "rate", "histogram_quantile", "le", "without", "avg", "max", "min", "irate", "increase"}


def exported_names(analysed):
    """Every sample name a daemon exposes, with archive, queue and publisher probes present."""
    probe = {"queues": {"prepare": 0},
             "archive": {"frames_written": 1, "raw_bytes": 2, "stored_bytes": 1, "failures": 0},
             "events": {"sent": 1, "dropped": 0}}
    m = Metrics(registry=CollectorRegistry(), probe=lambda: probe)
    runner = RunnerInfo(phases_s={"segment": 0.1}, latency_s=0.2, budget_ms=None, overrun=True)
    m.consume(frame_events(*analysed(0, [("empty", 3.0)]), runner))
    m.consume([error_event("a:1", "", "bad header")])
    text = generate_latest(m.registry).decode()
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def test_every_promql_expression_references_exported_metrics(analysed):
    dashboard = json.loads(DASHBOARD.read_text())
    exported = exported_names(analysed)
    assert {n for n in METRIC_NAMES} <= {re.sub(r"_(bucket|sum|count|created)$", "", n) for n in exported} | {
        n.removesuffix("_total") for n in exported} | exported
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 12
    used = set()
    for expr in exprs:
        without_strings = re.sub(r'"[^"]*"|\{[^}]*\}|\[[^\]]*\]', "", expr)
        names = {w for w in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", without_strings) if w not in PROMQL_WORDS}
        names -= {"source", "outcome", "class", "stage", "queue", "kind", "phase"}  # label names in by (...)
        assert names, expr
        for name in names:
            assert name in exported, f"{expr!r} uses {name!r}, which the daemon does not export"
        used |= names
    # the dashboard shows the defect fraction and covers every family the issue asks for
    for family in ("latticewatch_defect_fraction_rolling", "latticewatch_defect_fraction_rolling_bounds",
                   "latticewatch_defect_fraction_bounds", "latticewatch_frames_total",
                   "latticewatch_frame_latency_seconds_bucket", "latticewatch_particle_diameter_nm_bucket",
                   "latticewatch_queue_depth", "latticewatch_archive_compression_ratio"):
        assert family in used


def test_the_defect_fraction_panels_shade_the_interval_between_the_exported_bounds():
    panels = json.loads(DASHBOARD.read_text())["panels"]
    shaded = set()
    for panel in panels:
        legends = {t["legendFormat"]: t["expr"] for t in panel.get("targets", [])}
        for override in panel["fieldConfig"]["overrides"]:
            fill = {p["id"]: p["value"] for p in override["properties"]}.get("custom.fillBelowTo")
            if fill is not None:
                upper, lower = legends[override["matcher"]["options"]], legends[fill]
                assert upper.endswith('_bounds{bound="upper"}') and lower == upper.replace("upper", "lower")
                shaded.add(upper.partition("{")[0])
    assert shaded == {"latticewatch_defect_fraction_bounds", "latticewatch_defect_fraction_rolling_bounds"}
