"""The daemon: a validated config turned into sources, a pipeline and a runner, run as a service.

Lifecycle
---------
1. Outputs open and bind their ports; the profile loads; the state directory, archive session and
   runner start; the sources' threads run. Only then HTTP listens (``/healthz``, ``/readyz``) and
   systemd hears ``READY=1`` (`latticewatch.runtime.notify`).
2. The main thread supervises: every `TICK_S` it checks for a stop, a reload and the runner's
   end; at half of ``WatchdogSec=`` (at most every `STATUS_INTERVAL_S`) it sends ``STATUS=``
   (fps, backlog, last frame) and ``WATCHDOG=1`` — unless a phase has spent longer than
   `hung_after` on one frame: then the pings stop and systemd restarts the daemon.
3. SIGHUP re-reads the config (`Daemon` is given how). A config that fails to validate, a profile
   that fails to load or sources that cannot be built are logged and the running ones kept;
   otherwise the running generation is drained (sources stop, queued frames finish: a frame
   boundary) and a new one starts on the same state directory, whose ledger keeps every frame
   analysed exactly once. Outputs stay bound: their addresses need a restart, their verdict
   thresholds do not.
4. SIGTERM/SIGINT: ``STOPPING=1``, the sources stop, queued frames finish within
   `STOP_TIMEOUT_S`, or are left ``seen`` in the ledger (stream frames spooled) for the next start;
   then the readers of the pipeline are detached, the archive and the ledger flushed and closed,
   and only then the outputs closed (so no component outlives what it uses).
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from latticewatch.calibration import apply_calibration, load_calibration
from latticewatch.config import Config, FolderSourceConfig, PluginSourceConfig, ZmqSourceConfig
from latticewatch.errors import ConfigError, LatticewatchError, StateError
from latticewatch.runtime.analyser import Analyser
from latticewatch.runtime.archiving import open_session_writer
from latticewatch.runtime.notify import Notifier
from latticewatch.runtime.offload import open_offloader
from latticewatch.runtime.outputs import Outputs
from latticewatch.runtime.pipeline import Pipeline, RunStats
from latticewatch.runtime.runners import InlineRunner, PipelinedRunner
from latticewatch.runtime.store import StateDir
from latticewatch.sinks.events import Event, FrameEvent, Sink
from latticewatch.sources.base import Source, discover_sources

log = logging.getLogger(__name__)

#: Seconds SIGTERM gives the frames in flight; those still queued then are left for the next start.
STOP_TIMEOUT_S = 20.0
#: A phase busy with one frame for this many budgets, and at least `HUNG_MIN_S`, is hung.
HUNG_BUDGETS = 30
HUNG_MIN_S = 60.0
#: Longest time between ``STATUS=`` lines.
STATUS_INTERVAL_S = 5.0
#: How often the main thread looks at stop, reload and the runner.
TICK_S = 0.1


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
                                           max_pixels=sc.max_pixels, high_water_mark=sc.high_water_mark,
                                           ledger_path=config.state_dir / "ledger.sqlite",  # read only
                                           curve_secret_key=sc.curve_secret_key, curve_clients=sc.curve_clients))
        elif isinstance(sc, PluginSourceConfig):
            plugins = plugins if plugins is not None else discover_sources()
            plugin = plugins.get(sc.kind)
            if plugin is None or plugin.factory is None:
                why = plugin.error if plugin else "not installed"
                raise SourceUnavailable(f"sources.{name}: source plugin {sc.kind!r} is unusable: {why}")
            source = plugin.factory({**sc.options, "name": name})
            sources.append(source)
    return sources


def build_pipeline(config: Config, *, sinks: Sequence[Sink] = (), analyser: Analyser | None = None) -> Pipeline:
    """Load the profile (unless ``analyser`` is given) and the calibration, open the state directory and the archive
    session, and start connecting to the ``[runtime] scheduler`` (the daemon analyses here until connected).

    ``sinks`` get the events (`latticewatch.sinks.events.Sink`).
    """
    analyser = analyser or Analyser(config.profile, backend=config.runtime.backend,
                                    threads=config.runtime.threads or None)
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
    rt = config.runtime
    offload = open_offloader(rt.scheduler, config.profile, budget_ms=rt.budget_ms, offload_after_ms=rt.offload_after_ms,
                             model_ids=analyser.model_ids)
    return Pipeline(analyser, StateDir(config.state_dir), sinks=sinks, budget_ms=config.runtime.budget_ms,
                    archive=archive, archive_queue=config.runtime.queue_size, calibrate=calibrate,
                    event_log=config.events.log, offload=offload)


def hung_after(config: Config) -> float:
    """Seconds a phase may spend on one frame (or one batch) before the pipeline counts as hung.

    Examples
    --------
    >>> from latticewatch.config import parse_config
    >>> hung_after(parse_config({"runtime": {"budget_ms": 5000}}, plugin_kinds=set()))
    150.0
    """
    return max(HUNG_BUDGETS * config.runtime.budget_ms / 1000, HUNG_MIN_S)


class LastFrame:
    """A sink remembering the latest analysed frame, for the service manager's status line."""

    name = "last-frame"

    def __init__(self) -> None:
        self.frame_id: str | None = None
        self.at: float | None = None

    def consume(self, events: Sequence[Event]) -> None:
        for event in events:
            if isinstance(event, FrameEvent):
                self.frame_id, self.at = event.frame_id, time.monotonic()


class Generation:
    """One config's sources, pipeline and runner, the runner on a thread of its own; a reload starts the next one."""

    def __init__(self, config: Config, sinks: Sequence[Sink], *, analyser: Analyser | None = None,
                 sources: list[Source] | None = None) -> None:
        self.config = config
        self.sources = sources if sources is not None else build_sources(config)
        self.pipeline = build_pipeline(config, sinks=sinks, analyser=analyser)
        rt = config.runtime
        self.runner = (InlineRunner(self.pipeline) if rt.runner == "inline"
                       else PipelinedRunner(self.pipeline, queue_size=rt.queue_size, max_batch=rt.max_batch))
        self.stop = threading.Event()
        self._failure: BaseException | None = None
        self._stats: RunStats | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="latticewatch-runner", daemon=True)

    def _run(self) -> None:
        try:
            self._stats = self.runner.run(self.sources, self.stop)
        except BaseException as err:  # the ledger, the event log or the state directory failed: re-raised by close
            self._failure = err

    def start(self, wait: Callable[[float], object]) -> None:
        """Start the runner; return once its sources run (or it ended). ``wait(s)`` sleeps, ending early on stop."""
        self._thread.start()
        while not self.runner.started.is_set() and self._thread.is_alive():
            wait(TICK_S)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout_s: float, outputs: Outputs) -> RunStats:
        """Stop the sources, let queued frames finish for ``timeout_s``, then detach the outputs' readers and close the
        pipeline (archive, ledger). Re-raises the runner's failure."""
        if self._closed:
            return self.pipeline.stats
        self._closed = True
        self.stop.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive() and hasattr(self.runner, "abandon"):
            ages = self.runner.busy.ages()
            log.warning("the frames in flight did not finish within %.0f s (busy: %s); the queued ones are analysed at "
                        "the next start", timeout_s, ", ".join(f"{k} {v:.0f} s" for k, v in ages.items()) or "none")
            self.runner.abandon()
            self._thread.join(timeout_s)
        outputs.detach()
        if self._thread.is_alive() or self.runner.busy.ages():
            # a phase is stuck in a call: closing the ledger under it would fail it; the process exit rolls back
            log.error("a pipeline phase is still busy; the state is left for the next start to recover")
        else:
            self.pipeline.close()
        if self._failure is not None:
            raise self._failure
        return self._stats or self.pipeline.stats

    def hung(self, limit_s: float) -> dict[str, float]:
        """The phases busy with one frame for longer than ``limit_s``, with their seconds."""
        return {phase: age for phase, age in self.runner.busy.ages().items() if age > limit_s}


class Daemon:
    """Runs a config's pipeline as a service: readiness, watchdog, status, reload on SIGHUP, orderly stop.

    Parameters
    ----------
    config
        The validated config.
    stop
        Set to stop (SIGTERM, SIGINT: `stop_on_signals`).
    sinks
        Receive the events besides the configured outputs.
    reload
        Reads the config again (the file, plus command-line overrides); ``None``: SIGHUP is not handled.
    notifier
        The service manager's socket; default from ``$NOTIFY_SOCKET`` (none outside systemd).
    hung_after_s
        A phase busy this long with one frame stops the watchdog pings; default `hung_after` of the config.
    stop_timeout_s
        What the frames in flight get on stop.

    Examples
    --------
    >>> stats = Daemon(load_config("lw.toml"), stop, reload=lambda: load_config("lw.toml")).run()  # doctest: +SKIP
    """

    def __init__(self, config: Config, stop: threading.Event, *, sinks: Sequence[Sink] = (),
                 reload: Callable[[], Config] | None = None, notifier: Notifier | None = None,
                 hung_after_s: float | None = None, stop_timeout_s: float = STOP_TIMEOUT_S) -> None:
        self.config = config
        self.stop = stop
        self.reload = reload
        self.notifier = notifier if notifier is not None else Notifier.from_env()
        self.hung_after_s = hung_after_s if hung_after_s is not None else hung_after(config)
        self.stop_timeout_s = stop_timeout_s
        self.last = LastFrame()
        self._extra_sinks = [*sinks, self.last]
        self.outputs: Outputs | None = None
        self.current: Generation | None = None
        self._phase = "starting"
        self._hup = threading.Event()
        self._said_hung = False
        self._fps = (time.monotonic(), 0)

    def run(self) -> RunStats:
        """Start, serve until stopped (or until every source ends), stop in order; returns the last generation's
        counts."""
        self.outputs = Outputs(self.config)  # a port in use: logged, run without that output
        previous_hup = self._catch_sighup()
        stats = None
        try:
            self._start(Generation(self.config, self._sinks()))
            self.outputs.start(self.readiness)
            self._notify(READY=1, STATUS=self._status_line())
            self._supervise()
        finally:
            self._phase = "stopping"
            self._notify(STOPPING=1, STATUS="stopping: finishing the frames in flight")
            try:
                if self.current is not None:
                    stats = self.current.close(self.stop_timeout_s, self.outputs)
            finally:
                self.outputs.close()
                if previous_hup is not None:
                    signal.signal(signal.SIGHUP, previous_hup)
        return stats

    def _sinks(self) -> list[Sink]:
        return [*self._extra_sinks, *self.outputs.sinks]

    def _catch_sighup(self):
        """SIGHUP sets a flag the main loop acts on (a handler must not build pipelines); the previous handler."""
        if self.reload is None or threading.current_thread() is not threading.main_thread():
            return None
        return signal.signal(signal.SIGHUP, lambda _signum, _frame: self._hup.set())

    def _start(self, generation: Generation) -> None:
        self.current = generation
        self._fps = (time.monotonic(), 0)
        self.outputs.attach(generation.pipeline, generation.runner)
        for sink in self._extra_sinks:  # a sink that reports queues too (the terminal's progress) reads them here
            if hasattr(sink, "attach"):
                sink.attach(generation.pipeline, generation.runner)
        generation.start(self.stop.wait)
        self._phase = "running"
        p = generation.pipeline
        log.info("latticewatch daemon: profile %s, %d source(s) [%s], events in %s, archive %s",
                 generation.config.profile, len(generation.sources), ", ".join(s.name for s in generation.sources),
                 p.state.events_path, p.archive.writer.session_dir if p.archive else "off")

    def _supervise(self) -> None:
        interval = min(self.notifier.ping_interval_s or STATUS_INTERVAL_S, STATUS_INTERVAL_S) if self.notifier \
            else STATUS_INTERVAL_S
        due = time.monotonic() + interval
        while not self.stop.is_set() and self.current.running:
            if self._hup.is_set():
                self._hup.clear()
                self._reload()
            if time.monotonic() >= due:
                due = time.monotonic() + interval
                self._tick()
            self.stop.wait(TICK_S)

    def _tick(self) -> None:
        """One status line, and a watchdog ping unless the pipeline is hung."""
        hung = self.current.hung(self.hung_after_s)
        if hung:
            what = ", ".join(f"{phase} for {age:.0f} s" for phase, age in hung.items())
            if not self._said_hung:
                log.error("pipeline hung: busy with one frame in %s (limit %.0f s); watchdog pings stop so the service "
                          "manager restarts the daemon", what, self.hung_after_s)
                self._said_hung = True
            self._notify(STATUS=f"hung: {what}")
            return
        self._said_hung = False
        self._notify(WATCHDOG=1, STATUS=self._status_line())

    def _status_line(self) -> str:
        """``analysed 12 (0.8 fps), backlog 3, last frame scope:grid1.mrc#11 4 s ago`` (with ``offloaded 5, `` after the
        fps when a scheduler is configured)."""
        g = self.current
        analysed = g.pipeline.stats.analysed
        now = time.monotonic()
        then, before = self._fps
        self._fps = (now, analysed)
        backlog = sum(g.runner.queue_depths().values()) if hasattr(g.runner, "queue_depths") else 0
        last = (f"last frame {self.last.frame_id} {now - self.last.at:.0f} s ago" if self.last.frame_id
                else "no frame yet")
        offload, offloaded = g.pipeline.offload, ""
        if offload is not None:
            offloaded = f"offloaded {g.pipeline.stats.offloaded}{'' if offload.connected else ' (no cluster now)'}, "
        return (f"analysed {analysed} ({(analysed - before) / max(now - then, 1e-9):.2f} fps), {offloaded}"
                f"quarantined {g.pipeline.stats.quarantined}, backlog {backlog}, {last}")

    def _notify(self, **fields: object) -> None:
        if self.notifier is not None:
            self.notifier.notify(**fields)

    def _reload(self) -> None:
        """SIGHUP: the new config from the next frame boundary on, or the running one kept (see the module docs)."""
        log.warning("SIGHUP: reloading the configuration")
        try:
            config = self.reload()
            if config.data_dir != self.config.data_dir:
                raise ConfigError(f"data_dir: {config.data_dir} is not {self.config.data_dir}; the ledger that keeps "
                                  "analysis exactly once lives there, so moving it takes a restart")
            analyser = Analyser(config.profile, backend=config.runtime.backend, threads=config.runtime.threads or None)
            sources = build_sources(config)
        except (LatticewatchError, OSError) as err:
            log.error("SIGHUP: the new configuration is not used, the running one is kept: %s", err)
            self._notify(STATUS=f"reload refused, running configuration kept: {err}")
            return
        self._phase = "reloading"
        self._notify(RELOADING=1, STATUS="reloading: finishing the frames in flight")
        old = self.current
        old.close(self.stop_timeout_s, self.outputs)  # the frame boundary: queued frames done, the ledger closed
        if self.stop.is_set():
            return
        try:
            self._start(Generation(config, self._sinks(), analyser=analyser, sources=sources))
        except (LatticewatchError, OSError) as err:
            log.error("SIGHUP: the new configuration failed to start (%s); back to the running one", err)
            self._start(Generation(self.config, self._sinks(), analyser=old.pipeline.analyser))
        else:
            for key in self.outputs.reconfigure(config):
                log.warning("SIGHUP: %s changed; that takes a restart (the running value is kept)", key)
            self.config = config
            log.warning("SIGHUP: configuration reloaded")
        self._notify(READY=1, STATUS=self._status_line())

    def readiness(self) -> tuple[bool, dict[str, str]]:
        """What ``/readyz`` answers: sources up, models loaded, ledger writable; each check ``"ok"`` or the problem."""
        g = self.current
        if g is None or self.stop.is_set() or self._phase != "running":
            return False, {"daemon": "stopping" if self.stop.is_set() else self._phase}
        checks = {"sources": "ok" if g.running else "every source has ended, or the pipeline failed",
                  "models": "ok",  # a generation exists only with its profile loaded
                  "ledger": ledger_writable(g.pipeline.state)}
        return all(v == "ok" for v in checks.values()), checks


def ledger_writable(state: StateDir) -> str:
    """``"ok"`` when the ledger and its state directory take writes now (a full or read-only disk does not).

    Examples
    --------
    >>> import tempfile
    >>> ledger_writable(StateDir(tempfile.mkdtemp()))
    'ok'
    """
    try:
        with tempfile.TemporaryFile(dir=state.root) as probe:  # unnamed: nothing is left behind
            probe.write(b"\\0")
            probe.flush()
    except OSError as err:
        return f"the state directory {state.root} takes no writes: {err.strerror or err}"
    if state.ledger_path.exists() and not os.access(state.ledger_path, os.W_OK):
        return f"the ledger {state.ledger_path} is not writable"
    return "ok"


def run_daemon(config: Config, stop: threading.Event, *, sinks: Sequence[Sink] = (),
               reload: Callable[[], Config] | None = None, **service: Any) -> RunStats:
    """Run until ``stop`` is set (or every source ends); returns what was done (since the last reload).

    ``sinks`` get the events besides the configured outputs (ZeroMQ events, metrics, dashboard);
    ``reload`` reads the config again on SIGHUP; ``service``: the other options of `Daemon`.

    Examples
    --------
    >>> stats = run_daemon(load_config("lw.toml"), stop)  # doctest: +SKIP
    """
    return Daemon(config, stop, sinks=sinks, reload=reload, **service).run()


def stop_on_signals(stop: threading.Event) -> None:
    """SIGINT (Ctrl-C) and SIGTERM (systemd) set ``stop``: queued frames finish, then the daemon exits."""

    def handler(signum, _frame) -> None:
        log.warning("%s: stopping after the frames in flight", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
