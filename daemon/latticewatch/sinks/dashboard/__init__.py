"""The live dashboard page and the verdict API served by the daemon (``[dashboard]`` in the config)."""

from latticewatch.sinks.dashboard.server import DashboardSink
from latticewatch.sinks.dashboard.state import DashboardState, VerdictRule, size_histograms, verdict_for

__all__ = ["DashboardSink", "DashboardState", "VerdictRule", "open_dashboard", "size_histograms", "verdict_for"]


def open_dashboard(config, events_path=None) -> DashboardSink:
    """The dashboard sink of a validated `latticewatch.config.Config` (its ``[dashboard]`` table)."""
    d = config.dashboard
    return DashboardSink(host=d.host, port=d.port, events_path=events_path,
                         rule=VerdictRule(min_particles=d.verdict_min_particles, min_coverage=d.verdict_min_coverage),
                         verdict_file=d.verdict_file, history=d.history, thumbnail_px=d.thumbnail_px,
                         sse_queue=d.sse_queue, max_rate_hz=d.max_rate_hz, budget_ms=config.runtime.budget_ms)


def start_dashboard(config) -> DashboardSink | None:
    """`open_dashboard` for the daemon: ``None`` when ``[dashboard] enabled = false`` or the port is taken.

    A dashboard that cannot listen is an error in the log, not a reason to stop analysing frames.
    """
    import logging

    if not config.dashboard.enabled:
        return None
    try:
        return open_dashboard(config, events_path=config.state_dir / "events.jsonl")
    except OSError as err:
        logging.getLogger("latticewatch.sinks.dashboard").error(
            "dashboard: cannot listen on %s:%d (%s); running without it (set [dashboard] port, or enabled = false)",
            config.dashboard.host, config.dashboard.port, err.strerror or err)
        return None
