"""Sinks: consumers of finished analyses (events, metrics, dashboard, archive)."""
