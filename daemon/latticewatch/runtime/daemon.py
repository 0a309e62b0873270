"""The daemon: a validated config turned into sources, a pipeline and a runner, stopped by signals."""

from __future__ import annotations

import functools
import logging
import signal
import threading
from collections.abc import Sequence

from latticewatch.calibration import apply_calibration, load_calibration
from latticewatch.config import Config, FolderSourceConfig, PluginSourceConfig, ZmqSourceConfig
from latticewatch.errors import StateError
from latticewatch.runtime.analyser import Analyser
from latticewatch.runtime.archiving import open_session_writer
from latticewatch.runtime.outputs import Outputs
from latticewatch.runtime.pipeline import Pipeline, RunStats
from latticewatch.runtime.runners import InlineRunner, PipelinedRunner
from latticewatch.runtime.store import StateDir
from latticewatch.sinks.events import Sink
from latticewatch.sources.base import Source, discover_sources

log = logging.getLogger(__name__)


class SourceUnavailable(StateError):
    """A configured source kind whose plugin is missing or broken."""


def build_sources(config: Config) -> list[Source]:
    """One `Source` per ``[sources.<name>]`` table.

    Examples
    --------
    >>> from latticewatch.config import parse_config
    >>> [s.name for s in build_sources(parse_config({}, plugin_kinds=set()))]
    ['incoming']
    """
    from latticewatch.sources.folder import FolderSource
    from latticewatch.sources.zmq_stream import ZmqStreamSource

    sources: list[Source] = []
    plugins = None
    for name, sc in config.sources.items():
        if isinstance(sc, FolderSourceConfig):
            sources.append(FolderSource(sc.path, name=name, polling=sc.polling, settle_s=sc.settle_s,
                                        poll_interval_s=sc.poll_interval_s, recursive=sc.recursive,
                                        permissive=sc.permissive))
        elif isinstance(sc, ZmqSourceConfig):
            sources.append(ZmqStreamSource(sc.address, name=name, socket=sc.socket, bind=sc.bind,
                                           max_pixels=sc.max_pixels, high_water_mark=sc.high_water_mark))
        elif isinstance(sc, PluginSourceConfig):
            plugins = plugins if plugins is not None else discover_sources()
            plugin = plugins.get(sc.kind)
            if plugin is None or plugin.factory is None:
                why = plugin.error if plugin else "not installed"
                raise SourceUnavailable(f"sources.{name}: source plugin {sc.kind!r} is unusable: {why}")
            source = plugin.factory({**sc.options, "name": name})
            sources.append(source)
    return sources


def build_pipeline(config: Config, *, sinks: Sequence[Sink] = ()) -> Pipeline:
    """Load the profile and the calibration, open the state directory and the archive session.

    ``sinks`` get the events (`latticewatch.sinks.events.Sink`).
    """
    analyser = Analyser(config.profile, threads=config.runtime.threads or None)
    calibrate = None
    if config.calibration is not None:
        calibrate = functools.partial(apply_calibration, calibration=load_calibration(config.calibration),
                                      name=config.calibration.name)
    archive = None
    if config.archive.enabled:
        a = config.archive
        archive = open_session_writer(config.archive_root, "run", analyser.manifest.archive, policy=a.policy,
                                      margin_nm=a.margin_nm, reduce=a.reduce, codec=a.codec, max_bytes=a.max_bytes,
                                      max_age_s=a.max_age_s, min_free_bytes=a.min_free_bytes, retry_max_s=a.retry_max_s)
    return Pipeline(analyser, StateDir(config.state_dir), sinks=sinks, budget_ms=config.runtime.budget_ms,
                    archive=archive, archive_queue=config.runtime.queue_size, calibrate=calibrate)


def run_daemon(config: Config, stop: threading.Event, *, sinks: Sequence[Sink] = ()) -> RunStats:
    """Run until ``stop`` is set (or every source ends); returns what was done.

    ``sinks`` get the events besides the configured outputs (ZeroMQ events, metrics, dashboard).
    """
    sources = build_sources(config)
    outputs = Outputs(config)  # a port in use: logged, run without that output
    try:
        pipeline = build_pipeline(config, sinks=[*sinks, *outputs.sinks])
    except BaseException:
        outputs.close()
        raise
    rt = config.runtime
    runner = (InlineRunner(pipeline) if rt.runner == "inline"
              else PipelinedRunner(pipeline, queue_size=rt.queue_size, max_batch=rt.max_batch))
    outputs.attach(pipeline, runner)
    log.info("latticewatch daemon: profile %s, %d source(s) [%s], events in %s, archive %s", config.profile,
             len(sources), ", ".join(s.name for s in sources), pipeline.state.events_path,
             pipeline.archive.writer.session_dir if pipeline.archive else "off")
    try:
        return runner.run(sources, stop)
    finally:
        pipeline.close()
        outputs.close()


def stop_on_signals(stop: threading.Event) -> None:
    """SIGINT (Ctrl-C) and SIGTERM (systemd) set ``stop``: queued frames finish, then the daemon exits."""

    def handler(signum, _frame) -> None:
        log.warning("%s: stopping after the frames in flight", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
