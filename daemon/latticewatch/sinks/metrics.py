"""Prometheus metrics of the daemon, fed by the durable event log and a few live probes.

Counters, histograms and per-frame gauges are updated from the events as they are appended to
``events.jsonl`` (`Metrics` is a sink of the log; the runner already measured every phase and put
it in the frame event: metrics are middleware, never stage code). Queue depths, the archive's bytes
and the publisher's drops are read when Prometheus scrapes (a collector calling ``probe``). Every object takes
``registry=``, so tests use a fresh `prometheus_client.CollectorRegistry` each.

A frame outside the model's domain (its frame event lists ``out_of_domain`` reasons) is counted
in ``latticewatch_frames_out_of_domain_total``; its particles are left out of the particle counts,
the size histograms and the defect fractions.

The defect fractions are the estimates corrected for the classifier's measured confusion, with
their 95 % interval as ``…_bounds{bound="lower|upper"}`` (`latticewatch.stages.defect_fraction`).
The rolling one pools the particle counts of the last ``rolling_frames`` frames in the model's
domain, then estimates once: a frame with one particle weighs one particle, not one frame.

Names follow Prometheus conventions (base units, ``_total`` counters, histograms for latency);
sizes of particles are in nanometres (``_nm``), the unit of the rest of latticewatch.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from latticewatch.sinks.events import ErrorEvent, Event, FrameEvent, ParticleEvent, WarningEvent
from latticewatch.stages.defect_fraction import estimate_defect_fraction

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DIAMETER_BUCKETS_NM = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 12.0, 15.0, 20.0, 30.0, 50.0)

#: Every metric name exposed (without the ``_bucket``/``_sum``/``_count``/``_created`` suffixes).
METRIC_NAMES = (
    "latticewatch_build_info",
    "latticewatch_frames_total",
    "latticewatch_frames_out_of_domain_total",
    "latticewatch_frame_latency_seconds",
    "latticewatch_stage_seconds",
    "latticewatch_phase_seconds",
    "latticewatch_particles_total",
    "latticewatch_particle_diameter_nm",
    "latticewatch_defect_fraction",
    "latticewatch_defect_fraction_bounds",
    "latticewatch_defect_fraction_rolling",
    "latticewatch_defect_fraction_rolling_bounds",
    "latticewatch_frame_particles",
    "latticewatch_frame_coverage_ratio",
    "latticewatch_budget_overruns_total",
    "latticewatch_quarantined_frames_total",
    "latticewatch_errors_total",
    "latticewatch_queue_depth",
    "latticewatch_archive_frames_total",
    "latticewatch_archive_raw_bytes_total",
    "latticewatch_archive_stored_bytes_total",
    "latticewatch_archive_compression_ratio",
    "latticewatch_archive_failures_total",
    "latticewatch_events_sent_total",
    "latticewatch_events_dropped_total",
)


class _Probe:
    """A collector that asks ``probe()`` at scrape time for queue depths, archive and publisher counters."""

    def __init__(self, probe: Callable[[], dict[str, Any]]) -> None:
        self.probe = probe

    def describe(self) -> list:
        return []  # values exist only at scrape time

    def collect(self) -> Iterator:
        try:
            p = self.probe()
        except Exception:
            log.exception("metrics probe failed")
            return
        queues = GaugeMetricFamily("latticewatch_queue_depth", "Frames waiting, per queue", labels=["queue"])
        for name, depth in sorted(p.get("queues", {}).items()):
            queues.add_metric([name], depth)
        yield queues
        a = p.get("archive")
        if a is not None:
            for name, key, doc in (
                ("latticewatch_archive_frames", "frames_written", "Frames written to the archive"),
                ("latticewatch_archive_raw_bytes", "raw_bytes", "Raw bytes (shape × itemsize) of archived frames"),
                ("latticewatch_archive_stored_bytes", "stored_bytes", "Bytes the archive wrote for them"),
                ("latticewatch_archive_failures", "failures", "Archive writes that failed (disk full, permissions …)"),
            ):
                yield CounterMetricFamily(name, doc, value=a.get(key, 0))
            ratio = a["raw_bytes"] / a["stored_bytes"] if a.get("stored_bytes") else math.nan
            yield GaugeMetricFamily("latticewatch_archive_compression_ratio",
                                    "Raw over stored bytes of this run's archive", value=ratio)
        e = p.get("events")
        if e is not None:
            yield CounterMetricFamily("latticewatch_events_sent", "Messages sent on the ZeroMQ PUB socket",
                                      value=e.get("sent", 0))
            yield CounterMetricFamily("latticewatch_events_dropped",
                                      "Messages dropped at a subscriber's high-water mark", value=e.get("dropped", 0))


class Metrics:
    """The daemon's metrics, updated from the events of the durable log (`consume`).

    Parameters
    ----------
    registry
        Where to register (a fresh one per test).
    rolling_frames
        Frames in the rolling defect fraction.
    build
        Labels of ``latticewatch_build_info`` (version, profile …).
    probe
        Called at scrape time: ``{"queues": {name: depth}, "archive": {...}, "events": {...}}``.

    Examples
    --------
    >>> from latticewatch.sinks.events import error_event
    >>> m = Metrics(registry=CollectorRegistry())
    >>> m.consume([error_event("cam:s#0", "", "header is not JSON")])
    >>> m.registry.get_sample_value("latticewatch_frames_total", {"source": "cam", "outcome": "quarantined"})
    1.0
    >>> m.registry.get_sample_value("latticewatch_defect_fraction_rolling")
    nan
    """

    name = "metrics"

    def __init__(self, *, registry: CollectorRegistry | None = None, rolling_frames: int = 100,
                 build: dict[str, str] | None = None, probe: Callable[[], dict[str, Any]] | None = None) -> None:
        r = self.registry = registry if registry is not None else CollectorRegistry()
        self.build = Info("latticewatch_build", "latticewatch version and the loaded profile", registry=r)
        self.build.info(build or {})
        self.frames = Counter("latticewatch_frames", "Frames by source and outcome (analysed, quarantined)",
                              ["source", "outcome"], registry=r)
        self.out_of_domain = Counter("latticewatch_frames_out_of_domain",
                                     "Frames outside the model's domain (left out of the particle statistics)",
                                     registry=r)
        self.latency = Histogram("latticewatch_frame_latency_seconds", "Arrival to analysis published, per frame",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.stage = Histogram("latticewatch_stage_seconds", "Seconds per analysis stage, per frame", ["stage"],
                               buckets=STAGE_BUCKETS, registry=r)
        self.phase = Histogram("latticewatch_phase_seconds",
                               "Seconds per runner phase (prepare, segment, finish, publish), per frame",
                               ["phase"], buckets=STAGE_BUCKETS, registry=r)
        self.particles = Counter("latticewatch_particles", "Particles by class", ["class"], registry=r)
        self.diameter = Histogram("latticewatch_particle_diameter_nm",
                                  "Equivalent diameter of particles (nm), by class",
                                  ["class"], buckets=DIAMETER_BUCKETS_NM, registry=r)
        self.defect = Gauge("latticewatch_defect_fraction",
                            "Stacking faults among zone-axis particles of the last frame, corrected for the "
                            "classifier's confusion (NaN: none on zone axis)", registry=r)
        self.defect_bounds = Gauge("latticewatch_defect_fraction_bounds",
                                   "95 % interval of latticewatch_defect_fraction", ["bound"], registry=r)
        self.defect_rolling = Gauge("latticewatch_defect_fraction_rolling",
                                    f"Stacking faults among zone-axis particles of the last {rolling_frames} frames "
                                    "(counts pooled), corrected for the classifier's confusion", registry=r)
        self.defect_rolling_bounds = Gauge("latticewatch_defect_fraction_rolling_bounds",
                                           "95 % interval of latticewatch_defect_fraction_rolling", ["bound"],
                                           registry=r)
        self.frame_particles = Gauge("latticewatch_frame_particles", "Particles in the last frame", registry=r)
        self.coverage = Gauge("latticewatch_frame_coverage_ratio", "Fraction of the last frame segmented as particle",
                              registry=r)
        self.overruns = Counter("latticewatch_budget_overruns", "Frames whose phases exceeded the per-frame budget",
                                registry=r)
        self.quarantined = Counter("latticewatch_quarantined_frames", "Frames quarantined (could not be analysed)",
                                   registry=r)
        self.errors = Counter("latticewatch_errors", "Error and warning events by kind", ["kind"], registry=r)
        self._show(self.defect, self.defect_bounds, None, None, None)
        self._show(self.defect_rolling, self.defect_rolling_bounds, None, None, None)
        self._window: collections.deque[tuple[int, int]] = collections.deque(maxlen=rolling_frames)
        self._lock = threading.Lock()
        if probe is not None:
            r.register(_Probe(probe))

    def consume(self, events: Sequence[Event]) -> None:
        """Count the events of one append to the event log (a frame's particles come with its frame event)."""
        doubtful = {e.frame_id for e in events if isinstance(e, FrameEvent) and e.out_of_domain}
        for event in events:
            if isinstance(event, FrameEvent):
                self._frame(event)
            elif isinstance(event, ParticleEvent) and event.frame_id not in doubtful:
                label = event.label or "unclassified"
                self.particles.labels(label).inc()
                if event.equivalent_diameter_nm is not None:
                    self.diameter.labels(label).observe(event.equivalent_diameter_nm)
            elif isinstance(event, (ErrorEvent, WarningEvent)):
                suffix = event.event_id.rpartition("/")[2]
                self.errors.labels(suffix or event.type).inc()
                if isinstance(event, ErrorEvent) and suffix == "error":  # the frame itself failed (not archive trouble)
                    self.frames.labels(_source(event), "quarantined").inc()
                    self.quarantined.inc()

    def _frame(self, e: FrameEvent) -> None:
        self.frames.labels(_source(e), "analysed").inc()
        for stage, seconds in e.timings_s.items():
            self.stage.labels(stage).observe(seconds)
        for phase, seconds in e.runner.phases_s.items():
            self.phase.labels(phase).observe(seconds)
        self.latency.observe(e.runner.latency_s)
        if e.runner.overrun:
            self.overruns.inc()
        self.frame_particles.set(e.particles)
        self.coverage.set(e.coverage)
        if e.out_of_domain:  # not trusted: no fraction, and its counts stay out of the rolling one
            self.out_of_domain.inc()
            self._show(self.defect, self.defect_bounds, None, None, None)
            return
        self._show(self.defect, self.defect_bounds, e.defect_fraction, e.defect_fraction_lower,
                   e.defect_fraction_upper)
        counts = e.class_counts
        with self._lock:
            self._window.append((counts.get("stacking_fault", 0), counts.get("no_stacking_fault", 0)))
            rolling = estimate_defect_fraction(sum(f for f, _ in self._window), sum(c for _, c in self._window),
                                               e.defect_confusion)
            self._show(self.defect_rolling, self.defect_rolling_bounds, rolling.estimate, rolling.lower,
                       rolling.upper)

    @staticmethod
    def _show(gauge: Gauge, bounds: Gauge, value: float | None, lower: float | None, upper: float | None) -> None:
        """Set a fraction and its interval; ``None`` (nothing counted) shows as NaN."""
        for target, v in ((gauge, value), (bounds.labels("lower"), lower), (bounds.labels("upper"), upper)):
            target.set(math.nan if v is None else v)


def _source(event: FrameEvent | ErrorEvent) -> str:
    return event.frame_id.partition(":")[0] or "unknown"


class MetricsServer:
    """``/metrics`` over HTTP (prometheus-client's server) on ``host:port``; port 0 picks a free one.

    Examples
    --------
    >>> server = MetricsServer(Metrics(registry=CollectorRegistry()), "127.0.0.1", 0)
    >>> server.port > 0
    True
    >>> server.close()
    """

    def __init__(self, metrics: Metrics, host: str = "127.0.0.1", port: int = 9108) -> None:
        from prometheus_client import start_http_server

        self._server, self._thread = start_http_server(port, addr=host, registry=metrics.registry)
        self.host = host
        self.port = self._server.server_address[1]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
