"""The daemon's live outputs, built from the config: the ZeroMQ event publisher, the Prometheus metrics, the dashboard.

Each is a `latticewatch.sinks.events.Sink`: the pipeline's event log feeds them the typed events
once they are durable, in log order. The publisher and the metrics also read the runner's queues
and the archive's counters when asked (status events, scrapes). They are opened before the
pipeline. A port already in use is logged as an error naming the config key, and the daemon runs
without that output: analysis and the durable log matter more (events can be replayed later).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from latticewatch.config import Config
from latticewatch.sinks.events import Sink

log = logging.getLogger(__name__)


class Outputs:
    """Publisher, metrics and dashboard of one daemon run; `sinks` go to the pipeline, `attach` gives them the runner.

    Examples
    --------
    >>> from latticewatch.config import parse_config
    >>> off = {"events": {"enabled": False}, "metrics": {"enabled": False}, "dashboard": {"enabled": False}}
    >>> Outputs(parse_config(off, plugin_kinds=set())).sinks
    []
    """

    def __init__(self, config: Config, *, profile: str = "") -> None:
        self.publisher = None
        self.metrics = None
        self.metrics_server = None
        self.dashboard = None
        self._pipeline = None
        self._runner = None
        self._last = (time.monotonic(), 0)
        self._lock = threading.Lock()
        self.problems: list[str] = []
        if config.events.enabled:
            self._open_publisher(config)
        if config.metrics.enabled:
            self._open_metrics(config, profile or config.profile)
        if config.dashboard.enabled:
            self._open_dashboard(config)
        for problem in self.problems:
            # analysis and the durable log matter more than a live output: go on without it, loudly
            log.error("%s; running without it (events stay in the durable log: `latticewatch events`)", problem)

    def _open_publisher(self, config: Config) -> None:
        import zmq

        from latticewatch.sinks.publisher import EventPublisher

        e = config.events
        try:
            self.publisher = EventPublisher(e.address, high_water_mark=e.high_water_mark,
                                            status_interval_s=e.status_interval_s, status=self.status)
        except zmq.ZMQError as err:
            self.problems.append(f"events.address: cannot bind {e.address}: {err}")
            return
        log.info("events published on %s", self.publisher.address)

    def _open_metrics(self, config: Config, profile: str) -> None:
        from latticewatch import __version__
        from latticewatch.sinks.metrics import Metrics, MetricsServer

        m = config.metrics
        self.metrics = Metrics(rolling_frames=m.rolling_frames, probe=self.probe,
                               build={"version": __version__, "profile": profile})
        try:
            self.metrics_server = MetricsServer(self.metrics, m.host, m.port)
        except OSError as err:
            self.problems.append(f"metrics.port: cannot serve on {m.host}:{m.port}: {err.strerror or err}")
            return
        log.info("metrics on http://%s:%d/metrics", self.metrics_server.host, self.metrics_server.port)

    def _open_dashboard(self, config: Config) -> None:
        from latticewatch.sinks.dashboard import open_dashboard

        d = config.dashboard
        try:
            self.dashboard = open_dashboard(config)  # it logs its address
        except OSError as err:
            self.problems.append(f"dashboard.port: cannot listen on {d.host}:{d.port}: {err.strerror or err}")

    @property
    def sinks(self) -> list[Sink]:
        """The outputs that opened, for the pipeline's event log."""
        return [x for x in (self.publisher, self.metrics, self.dashboard) if x is not None]

    def attach(self, pipeline, runner) -> None:
        self._pipeline, self._runner = pipeline, runner

    def _queues(self) -> dict[str, int]:
        queues = dict(getattr(self._runner, "queue_depths", dict)())
        archive = getattr(self._pipeline, "archive", None)
        if archive is not None:
            queues["archive"] = archive.queued()
            queues["archive_backlog"] = archive.backlog()
        return queues

    def probe(self) -> dict[str, Any]:
        """What a scrape reads live: queue depths, the archive writer's and the publisher's counters."""
        out: dict[str, Any] = {"queues": self._queues() if self._pipeline is not None else {}}
        archive = getattr(self._pipeline, "archive", None)
        if archive is not None:
            c = archive.writer.counters
            out["archive"] = {"frames_written": c.frames_written, "raw_bytes": c.raw_bytes,
                              "stored_bytes": c.stored_bytes, "failures": c.failures}
        if self.publisher is not None:
            out["events"] = dict(self.publisher.counters)
        return out

    def status(self) -> dict[str, Any]:
        """The fields of a ``latticewatch.status`` event (see `latticewatch.sinks.events.StatusEvent`); none before
        `attach`."""
        if self._pipeline is None:
            return {}
        stats = self._pipeline.stats
        now = time.monotonic()
        with self._lock:
            then, before = self._last
            self._last = (now, stats.analysed)
        return {"fps": round((stats.analysed - before) / max(now - then, 1e-9), 3), "analysed": stats.analysed,
                "quarantined": stats.quarantined, "overruns": stats.overruns, "deferred": stats.deferred,
                "budget_ms": self._pipeline.budget_ms, "backlog": self._queues()}

    def close(self) -> None:
        if self.publisher is not None:
            self.publisher.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
        if self.dashboard is not None:
            self.dashboard.close()
