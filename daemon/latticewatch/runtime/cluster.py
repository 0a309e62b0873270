"""The worker side of scale-out on Dask: a cluster to run on, the profile loaded once per worker, the tasks.

`open_client` connects to a scheduler (``tcp://host:8786``, e.g. one dask-jobqueue started on Slurm)
or starts an in-process `~distributed.LocalCluster` of worker processes. `AnalyserPlugin` loads the
profile once in each worker process when the worker starts (and again only in a worker that
replaces a dead one); the tasks find it in a per-process cache keyed by the `AnalyserSpec`.

Two tasks run on the workers:

* `analyse_ref` (``latticewatch batch``): a `FrameRef` names a micrograph file or an archived
  frame; the worker reads it from the shared filesystem, analyses it, writes the same per-frame
  reports as ``process`` into the output directory and returns a compact `RefResult` (summary
  rows, rendered events, failures), never the pixels. A bad file or frame is a `Failure` in the
  result, by the rules of `latticewatch.runtime.batch.Batch` (it is what reads the files here
  too); anything else (a lost model, a full disk, a bug) raises and stops the batch, as it stops
  ``process``.
* `analyse_pixels` (the daemon's offload): the frame's pixels travel with the task and the
  `~latticewatch.frame.Analysis` comes back; the caller keeps its ledger and events.

Nothing here touches a ledger: the client (`latticewatch.runtime.scaleout`) is its only writer.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import distributed

from latticewatch.frame import Analysis, Frame
from latticewatch.models.backends import cpu_threads
from latticewatch.runtime.batch import Batch, Failure

if TYPE_CHECKING:
    from latticewatch.runtime.analyser import Analyser

log = logging.getLogger(__name__)

#: The name the plugin is registered under on the workers (registering again replaces it).
PLUGIN_NAME = "latticewatch-analyser"


@dataclass(frozen=True)
class AnalyserSpec:
    """What a worker loads once and every task shares: the profile, how to run it, how to read files.

    Parameters
    ----------
    profile
        Installed profile name or profile directory (a directory must be on the workers' filesystem).
    backend
        Inference backend kind (`latticewatch.models.backends.BACKEND_CHOICES`), resolved on each
        worker (``auto``: the fastest that runs there, so GPU workers use their GPU).
    classifier
        ``profile`` or ``baseline`` (`latticewatch.runtime.analyser.Analyser`).
    threads
        Inference threads of each analyser. A worker runs one task per worker thread, so 1 (one
        process per core) uses every core without oversubscribing them.
    permissive
        Readers warn and guess on inconsistent headers instead of failing.
    calibration
        Instrument calibration TOML (on the workers' filesystem) for frames without a pixel size.

    Examples
    --------
    >>> AnalyserSpec("nanoparticles", threads=1).profile
    'nanoparticles'
    """

    profile: str = "nanoparticles"
    backend: str = "auto"
    classifier: str = "profile"
    threads: int | None = 1
    permissive: bool = False
    calibration: str | None = None


@dataclass(frozen=True)
class FrameRef:
    """A frame (or the frames of a file) named by where it lies on the shared filesystem.

    ``key is None``: every frame of the micrograph file ``path`` (one, or each section of a stack)
    except those in ``skip``. Otherwise the frame stored under ``key`` in the archive file ``path``
    (`latticewatch.sinks.archive.ArchiveReader`), whose id was ``frame_id``.

    Examples
    --------
    >>> FrameRef("data/stack.mrc", skip=frozenset({"data/stack.mrc#0"})).key is None
    True
    """

    path: str
    key: str | None = None
    frame_id: str | None = None
    skip: frozenset[str] = frozenset()


@dataclass(frozen=True)
class FrameDone:
    """One analysed frame as the client needs it: its summary row, its rendered events, its warnings."""

    frame_id: str
    origin: str
    row: dict[str, Any]  # `latticewatch.sinks.reports.summary`
    events: str  # JSON lines (`latticewatch.sinks.events.render`), as the ledger stores them
    warnings: tuple[str, ...]
    out_of_domain: tuple[str, ...]


@dataclass(frozen=True)
class RefResult:
    """What `analyse_ref` returns for one `FrameRef`: frames done, failures, worker time and where."""

    ref: FrameRef
    done: tuple[FrameDone, ...]
    failures: tuple[Failure, ...]
    seconds: float  # wall time of the task on the worker: reading, analysis, reports
    worker: str


# ------------------------------------------------------------------------------ per-process analysers

_loaded: dict[AnalyserSpec, Analyser] = {}
_loaded_lock = threading.Lock()
_loads = 0  # profiles loaded by this process: tests check it is one per worker


def worker_analyser(spec: AnalyserSpec) -> Analyser:
    """This process's analyser for ``spec``, loaded on first use and kept.

    Examples
    --------
    >>> worker_analyser(AnalyserSpec("nanoparticles")).manifest.name  # doctest: +SKIP
    'nanoparticles'
    """
    global _loads
    with _loaded_lock:  # two worker threads must not load the same profile twice
        if spec not in _loaded:
            from latticewatch.runtime.analyser import Analyser

            start = time.perf_counter()
            _loaded[spec] = Analyser(spec.profile, backend=spec.backend, threads=spec.threads,
                                     classifier=spec.classifier)  # type: ignore[arg-type]
            _loads += 1
            log.info("pid %d loaded profile %s in %.2f s", os.getpid(), spec.profile, time.perf_counter() - start)
        return _loaded[spec]


def profile_loads() -> int:
    """How many times this process loaded a profile (run it on the workers: ``client.run(profile_loads)``)."""
    return _loads


class AnalyserPlugin(distributed.WorkerPlugin):
    """Loads the profile in each worker process as it starts, so no task pays for it.

    Registered with ``client.register_plugin(AnalyserPlugin(spec))``; Dask also runs it on
    workers that join later (a replacement for a killed one). A profile that cannot be loaded
    fails the registration on the client, naming the profile.

    Examples
    --------
    >>> client.register_plugin(AnalyserPlugin(AnalyserSpec("nanoparticles")))  # doctest: +SKIP
    """

    name = PLUGIN_NAME

    def __init__(self, spec: AnalyserSpec) -> None:
        self.spec = spec

    def setup(self, worker: distributed.Worker) -> None:
        worker_analyser(self.spec)


# ------------------------------------------------------------------------------------------ tasks


def analyse_ref(ref: FrameRef, spec: AnalyserSpec, out: str, *, save_probability: bool = False) -> RefResult:
    """Read ``ref`` on the worker, analyse it, write its reports into ``out``; never raises for bad input.

    Reports are written atomically under the frame's name (as ``process`` names them), so a task
    that runs twice (its worker died after writing) leaves one copy.

    Examples
    --------
    >>> future = client.submit(analyse_ref, FrameRef("data/a.mrc"), AnalyserSpec(), "out")  # doctest: +SKIP
    >>> [d.frame_id for d in future.result().done]  # doctest: +SKIP
    ['data/a.mrc']
    """
    from functools import partial

    from latticewatch.sinks.reports import summary, write_reports

    start = time.perf_counter()
    analyser = worker_analyser(spec)
    # this task's own reader and failures (a worker may run several tasks at once)
    batch = Batch(permissive=spec.permissive, calibration=Path(spec.calibration) if spec.calibration else None)
    frames = _archived(ref, batch) if ref.key is not None else (
        f for f in batch.frames([Path(ref.path)]) if f.frame_id not in ref.skip)
    done = []
    for frame, analysis in batch.analyse(frames, partial(analyser.analyse, keep_probability=save_probability)):
        write_reports(frame, analysis, Path(out), save_probability=save_probability)
        done.append(FrameDone(frame.frame_id, frame.origin, summary(frame, analysis),
                              _events(frame, analysis, time.perf_counter() - start), analysis.warnings,
                              analysis.out_of_domain))
    return RefResult(ref, tuple(done), tuple(batch.failures), time.perf_counter() - start, _worker_name())


def analyse_pixels(frame: Frame, spec: AnalyserSpec, *, keep_probability: bool = False) -> Analysis:
    """Analyse a frame whose pixels travelled with the task (the daemon's offload); raises `FrameError`.

    Examples
    --------
    >>> client.submit(analyse_pixels, frame, AnalyserSpec()).result().frame_id  # doctest: +SKIP
    'cam:s#0'
    """
    return worker_analyser(spec).analyse(frame, keep_probability=keep_probability)


def _archived(ref: FrameRef, batch: Batch) -> list[Frame]:
    """The archived frame ``ref`` names, rebuilt from its exact pixels; a reduced one is a failure."""
    from latticewatch.calibration import apply_calibration
    from latticewatch.io.jsonio import parse_timestamp
    from latticewatch.sinks.archive import ArchiveReader

    frame_id = ref.frame_id or ref.key
    try:
        stored = ArchiveReader(ref.path).read(ref.key)  # type: ignore[arg-type]
    except (OSError, KeyError, ValueError) as err:
        batch.fail(ref.path, frame_id, f"{ref.path}: archived frame {frame_id}: cannot be read: {err}")
        return []
    if not stored.reduced.exact_everywhere:
        batch.fail(ref.path, frame_id, reduced_problem(frame_id, ref.path, str(stored.reduced.policy)))
        return []
    frame = Frame(stored.frame_id, stored.pixels(), stored.pixel_size_nm,
                  parse_timestamp(stored.acquired_at) if stored.acquired_at else None,
                  {**stored.meta, "archive": f"{ref.path}:{ref.key}"}, stored.origin)
    if batch.calibration is not None:
        frame = apply_calibration(frame, batch.calibration, batch.calibration_name)
    return [frame]


def reduced_problem(frame_id: str, path: str, policy: str) -> str:
    """Why an archived frame stored reduced is not re-analysed (the client says it without a task too).

    >>> reduced_problem("cam:a#0", "s.h5", "drop")
    'cam:a#0: stored reduced in s.h5 (policy drop); only frames archived whole can be re-analysed'
    """
    return f"{frame_id}: stored reduced in {path} (policy {policy}); only frames archived whole can be re-analysed"


def _events(frame: Frame, analysis: Analysis, seconds: float) -> str:
    """The frame's events as the daemon renders them; the runner's phases are the worker's analysis."""
    from latticewatch.sinks.events import RunnerInfo, frame_events, render

    runner = RunnerInfo(phases_s={k: round(v, 6) for k, v in analysis.timings_s.items()},
                        latency_s=round(seconds, 6), budget_ms=None, overrun=False)
    return render(frame_events(frame, analysis, runner))


def _worker_name() -> str:
    try:
        return distributed.get_worker().address
    except ValueError:  # called outside a worker (tests, a synchronous scheduler)
        return f"pid {os.getpid()}"


# ------------------------------------------------------------------------------------------ client


def open_client(scheduler: str | None = None, local_workers: int | None = None, *, threads_per_worker: int = 1,
                dashboard: bool = True, timeout: float | None = None) -> distributed.Client:
    """A Dask client: on the scheduler at ``scheduler``, or on a new local cluster of worker processes.

    Parameters
    ----------
    scheduler
        ``tcp://host:8786`` of a running scheduler (its workers must see the input and output
        paths at the same names); ``None`` starts a `~distributed.LocalCluster` in this process,
        closed with the client.
    local_workers
        Worker processes of the local cluster; ``None``: one per usable core.
    threads_per_worker
        Tasks each local worker runs at once.
    dashboard
        Serve the local cluster's dashboard pages (they need bokeh); its HTTP server takes a free port.
    timeout
        Seconds to wait for the scheduler at ``scheduler`` (``None``: Dask's
        ``distributed.comm.timeouts.connect``); an `OSError` (`TimeoutError`) after that.

    Examples
    --------
    >>> with open_client(local_workers=2) as client:  # doctest: +SKIP
    ...     print(len(client.scheduler_info()["workers"]))
    2
    """
    if scheduler is not None:
        if local_workers is not None:
            from latticewatch.errors import ConfigError

            raise ConfigError(f"local_workers={local_workers} with scheduler {scheduler}: a scheduler brings its "
                              "own workers; give one or the other")
        return distributed.Client(scheduler, **({} if timeout is None else {"timeout": timeout}))
    workers = cpu_threads(local_workers)
    # a free port either way: the scheduler's HTTP server (health, metrics) listens even without the dashboard
    return distributed.Client(n_workers=workers, threads_per_worker=threads_per_worker, processes=True,
                              dashboard_address=":0", scheduler_kwargs={"dashboard": dashboard})


def dashboard_link(client: distributed.Client) -> str | None:
    """The scheduler's dashboard address (its HTTP server; the pages need bokeh there), ``None`` without one.

    >>> dashboard_link(client)  # doctest: +SKIP
    'http://127.0.0.1:8787/status'
    """
    if "dashboard" not in client.scheduler_info().get("services", {}):
        return None
    return client.dashboard_link
