"""The daemon's live outputs, built from the config: the ZeroMQ event publisher, the Prometheus metrics, the dashboard.

Each is a `latticewatch.sinks.events.Sink`: the pipeline's event log feeds them the typed events
once they are durable, in log order. The publisher and the metrics also read the runner's queues
and the archive's counters when asked (status events, scrapes).

Lifecycle, in the daemon's order: `Outputs` opens the sinks and binds the ports before the
pipeline; `start` makes HTTP listen (metrics, dashboard with ``/healthz`` and ``/readyz``) once
the pipeline and its sources are up; `attach` / `detach` give the status and scrape readers a
pipeline and take it back (`detach` waits for a read in progress, so nothing reads a ledger that
is being closed); `close` comes after the pipeline's own close, whose archive may still publish.
A port already in use is logged as an error naming the config key, and the daemon runs without
that output: analysis and the durable log matter more (events can be replayed later).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from latticewatch.config import Config
from latticewatch.sinks.events import Sink

if TYPE_CHECKING:  # the sinks' modules load only when their output is enabled (start-up time)
    from latticewatch.sinks.dashboard.server import Readiness

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
        self._attached = threading.RLock()  # held by every reader of the pipeline, and by `detach`
        self.config = config
        self.problems: list[str] = []
        if config.events.enabled:
            self._open_publisher(config)
        if config.metrics.enabled:
            self._open_metrics(config, profile or config.profile)
        if config.dashboard.enabled:
            self._open_dashboard(config)
        self._report()

    def _report(self) -> None:
        for problem in self.problems:
            # analysis and the durable log matter more than a live output: go on without it, loudly
            log.error("%s; running without it (events stay in the durable log: `latticewatch events`)", problem)
        self.problems.clear()

    def _open_publisher(self, config: Config) -> None:
        import zmq

        from latticewatch.sinks.publisher import EventPublisher

        e = config.events
        try:
            self.publisher = EventPublisher(e.address, high_water_mark=e.high_water_mark,
                                            status_interval_s=e.status_interval_s, status=self.status,
                                            curve_secret_key=e.curve_secret_key, curve_clients=e.curve_clients)
        except zmq.ZMQError as err:
            self.problems.append(f"events.address: cannot bind {e.address}: {err}")
            return
        log.info("events published on %s", self.publisher.address)

    def _open_metrics(self, config: Config, profile: str) -> None:
        from latticewatch import __version__
        from latticewatch.sinks.metrics import Metrics

        self.metrics = Metrics(rolling_frames=config.metrics.rolling_frames, probe=self.probe,
                               build={"version": __version__, "profile": profile})

    def _serve_metrics(self) -> None:
        from latticewatch.sinks.metrics import MetricsServer

        m = self.config.metrics
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
            self.dashboard = open_dashboard(config, serve=False)  # bound now, listening from `start`
        except OSError as err:
            self.problems.append(f"dashboard.port: cannot listen on {d.host}:{d.port}: {err.strerror or err}")

    @property
    def sinks(self) -> list[Sink]:
        """The outputs that opened, for the pipeline's event log."""
        return [x for x in (self.publisher, self.metrics, self.dashboard) if x is not None]

    def start(self, readiness: Readiness | None = None) -> None:
        """HTTP listens from now on: ``/metrics``, and the dashboard with ``/readyz`` answered by ``readiness``."""
        if self.metrics is not None:
            self._serve_metrics()
        if self.dashboard is not None:
            self.dashboard.serve(readiness)  # it logs its address
        self._report()

    def attach(self, pipeline, runner) -> None:
        """Status events and scrapes read this pipeline and runner from now on."""
        with self._attached:
            self._pipeline, self._runner = pipeline, runner
            with self._lock:  # a reloaded pipeline counts from 0 again
                self._last = (time.monotonic(), pipeline.stats.analysed)

    def detach(self) -> None:
        """No reader touches the pipeline once this returns (it waits for a status event or a scrape in progress)."""
        with self._attached:
            self._pipeline, self._runner = None, None

    def reconfigure(self, config: Config) -> list[str]:
        """Take what a reloaded config may change live (verdict thresholds, budget); the keys needing a restart."""
        if self.dashboard is not None:
            from latticewatch.sinks.dashboard import VerdictRule

            d = config.dashboard
            self.dashboard.state.rule = VerdictRule(min_particles=d.verdict_min_particles,
                                                    min_coverage=d.verdict_min_coverage)
            self.dashboard.state.budget_ms = config.runtime.budget_ms
        fixed = [name for name in ("events", "metrics")
                 if getattr(config, name) != getattr(self.config, name)]
        live = {"verdict_min_particles", "verdict_min_coverage"}
        old, new = self.config.dashboard.model_dump(), config.dashboard.model_dump()
        fixed += [f"dashboard.{k}" for k in old if k not in live and old[k] != new[k]]
        return fixed

    def _queues(self) -> dict[str, int]:
        queues = dict(getattr(self._runner, "queue_depths", dict)())
        archive = getattr(self._pipeline, "archive", None)
        if archive is not None:
            queues["archive"] = archive.queued()
            queues["archive_backlog"] = archive.backlog()
        return queues

    def probe(self) -> dict[str, Any]:
        """What a scrape reads live: queue depths, the archive writer's and the publisher's counters."""
        with self._attached:
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
        with self._attached:
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
        """Stop the status thread and the servers and close the socket (after the pipeline's own close)."""
        self.detach()
        if self.publisher is not None:
            self.publisher.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
        if self.dashboard is not None:
            self.dashboard.close()
