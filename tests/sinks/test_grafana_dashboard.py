"""The shipped Grafana dashboard only asks for metrics the daemon exports."""

import json
import re
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from latticewatch.sinks.metrics import METRIC_NAMES, Metrics

DASHBOARD = Path(__file__).parents[2] / "grafana" / "latticewatch.json"
SUFFIXES = ("_bucket", "_sum", "_count", "_created", "_total", "_info")
PROMQL_WORDS = {"sum", "by", "rate", "histogram_quantile", "le", "without", "avg", "max", "min", "irate", "increase"}


def exported_names():
    """Every sample name a daemon exposes, with archive, queue and publisher probes present."""
    probe = {"queues": {"prepare": 0}, "archive": {"frames_written": 1, "raw_bytes": 2, "stored_bytes": 1, "failures": 0},
             "events": {"sent": 1, "dropped": 0}}
    m = Metrics(registry=CollectorRegistry(), probe=lambda: probe)
    m.on_events('{"event_id":"a:0/frame","type":"frame","frame_id":"a:0","timings_s":{"segment":0.1},'
                '"runner":{"phases_s":{"segment":0.1},"latency_s":0.2,"overrun":true},"class_counts":{}}\n'
                '{"event_id":"a:0/region/0","type":"particle","label":"empty","equivalent_diameter_nm":3.0}\n'
                '{"event_id":"a:1/error","type":"error","frame_id":"a:1"}\n')
    text = generate_latest(m.registry).decode()
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def test_every_promql_expression_references_exported_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    exported = exported_names()
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
    for family in ("latticewatch_defect_fraction_rolling", "latticewatch_frames_total", "latticewatch_frame_latency_seconds_bucket",
                   "latticewatch_particle_diameter_nm_bucket", "latticewatch_queue_depth", "latticewatch_archive_compression_ratio"):
        assert family in used
