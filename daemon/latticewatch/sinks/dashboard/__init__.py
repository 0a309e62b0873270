"""The live dashboard page and the verdict API served by the daemon (``[dashboard]`` in the config)."""

from latticewatch.sinks.dashboard.server import DashboardSink
from latticewatch.sinks.dashboard.state import DashboardState, VerdictRule, size_histograms, verdict_for

__all__ = ["DashboardSink", "DashboardState", "VerdictRule", "open_dashboard", "size_histograms", "verdict_for"]


def open_dashboard(config, *, serve: bool = True) -> DashboardSink:
    """The dashboard sink of a validated `latticewatch.config.Config` (its ``[dashboard]`` table).

    Raises `OSError` when it cannot bind its port (the daemon then runs without it: `latticewatch.runtime.outputs`).
    ``serve=False``: the port is bound but HTTP starts with `DashboardSink.serve`.

    Examples
    --------
    >>> from latticewatch.config import parse_config
    >>> sink = open_dashboard(parse_config({"dashboard": {"port": 0}}, plugin_kinds=set()))
    >>> sink.url.startswith("http://127.0.0.1:")
    True
    >>> sink.close()
    """
    d = config.dashboard
    return DashboardSink(host=d.host, port=d.port,
                         rule=VerdictRule(min_particles=d.verdict_min_particles, min_coverage=d.verdict_min_coverage),
                         verdict_file=d.verdict_file, history=d.history, thumbnail_px=d.thumbnail_px,
                         sse_queue=d.sse_queue, max_rate_hz=d.max_rate_hz, budget_ms=config.runtime.budget_ms,
                         serve=serve)
