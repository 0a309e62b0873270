"""Sinks: consumers of the typed events (ZeroMQ publisher, metrics, dashboard), reports, and the archive format."""
