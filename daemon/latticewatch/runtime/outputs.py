"""The daemon's live outputs: the ZeroMQ event publisher and the Prometheus metrics.

Both listen to the durable event log (`latticewatch.sinks.events.EventLog`), so they see exactly
the events written to ``events.jsonl``, in order, once durable; both read the runner's queues
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

log = logging.getLogger("latticewatch.runtime.outputs")


class Outputs:
    """Publisher and metrics of one daemon run; `listeners` go to the pipeline, `attach` gives them the runner.

    Examples
    --------
    >>> from latticewatch.config import parse_config
    >>> outputs = Outputs(parse_config({"events": {"enabled": False}, "metrics": {"enabled": False}}, plugin_kinds=set()))
    >>> outputs.listeners
    []
    """

    def __init__(self, config: Config, *, profile: str = "") -> None:
        from latticewatch import __version__

        self.publisher = None
        self.metrics = None
        self.metrics_server = None
        self._pipeline = None
        self._runner = None
        self._last = (time.monotonic(), 0)
        self._lock = threading.Lock()
        self.problems: list[str] = []
        e, m = config.events, config.metrics
        if e.enabled:
            import zmq

            from latticewatch.sinks.publisher import EventPublisher

            try:
                self.publisher = EventPublisher(e.address, high_water_mark=e.high_water_mark,
                                                status_interval_s=e.status_interval_s, status=self.status)
            except zmq.ZMQError as err:
                self.problems.append(f"events.address: cannot bind {e.address}: {err}")
        if m.enabled:
            from latticewatch.sinks.metrics import Metrics, MetricsServer

            self.metrics = Metrics(rolling_frames=m.rolling_frames, probe=self.probe,
                                   build={"version": __version__, "profile": profile or config.profile})
            try:
                self.metrics_server = MetricsServer(self.metrics, m.host, m.port)
            except OSError as err:
                self.problems.append(f"metrics.port: cannot serve on {m.host}:{m.port}: {err.strerror or err}")
        for problem in self.problems:
            # analysis and the durable log matter more than a live output: go on without it, loudly
            log.error("%s; running without it (events stay in the durable log: `latticewatch events`)", problem)
        if self.publisher is not None:
            log.info("events published on %s", self.publisher.address)
        if self.metrics_server is not None:
            log.info("metrics on http://%s:%d/metrics", self.metrics_server.host, self.metrics_server.port)

    @property
    def listeners(self) -> list:
        return [x.on_events for x in (self.publisher, self.metrics) if x is not None]

    def attach(self, pipeline, runner) -> None:
        self._pipeline, self._runner = pipeline, runner

    def _queues(self) -> dict[str, int]:
        queues = dict(getattr(self._runner, "queue_depths", dict)())
        archive = getattr(self._pipeline, "archive", None)
        if archive is not None:
            queues["archive"] = archive._queue.qsize()
            queues["archive_backlog"] = archive.backlog()
        return queues

    def probe(self) -> dict[str, Any]:
        """What a scrape reads live: queue depths, the archive writer's and the publisher's counters."""
        out: dict[str, Any] = {"queues": self._queues() if self._pipeline is not None else {}}
        archive = getattr(self._pipeline, "archive", None)
        if archive is not None:
            c = archive.writer.counters
            out["archive"] = {"frames_written": c.frames_written, "raw_bytes": c.raw_bytes, "stored_bytes": c.stored_bytes,
                              "failures": c.failures}
        if self.publisher is not None:
            out["events"] = dict(self.publisher.counters)
        return out

    def status(self) -> dict[str, Any]:
        """The fields of a ``latticewatch.status`` event."""
        if self._pipeline is None:
            return {"fps": 0.0, "analysed": 0, "quarantined": 0, "overruns": 0, "backlog": {}, "budget_ms": None}
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
