"""``latticewatch simulate``: a whole dataset, over worker processes, resumable.

:func:`simulate_dataset` prepares the directory (:mod:`.output`), simulates the images that are
not complete yet, one process per worker, then regenerates the crop index and the dataset card
(:mod:`.card`). Image ``i`` depends only on the dataset seed and ``i``; abTEM and numba run
single-threaded in every worker and BLAS pools are held to one thread, so the same seed gives the
same images whatever ``--workers`` and however often a run is resumed.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from latticewatch.training.simulate.card import write_dataset_card
from latticewatch.training.simulate.config import SimulationConfig
from latticewatch.training.simulate.image import image_name, simulate_image
from latticewatch.training.simulate.multislice import configure_abtem
from latticewatch.training.simulate.output import is_complete, prepare_dataset, write_crop_index, write_image

logger = logging.getLogger(__name__)

#: Environment variables that size the BLAS/OpenMP pools of freshly started interpreters.
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

#: One image to make: dataset directory, seed, image index, configuration as a dict (picklable).
Job = tuple[str, int, int, dict]
#: What became of a job: image index, error message (``None`` if written), seconds.
Outcome = tuple[int, str | None, float]


@dataclass
class DatasetRun:
    """What :func:`simulate_dataset` did."""

    out: Path
    simulated: list[int]
    skipped: list[int]
    failed: dict[int, str]
    seconds: float
    workers: int

    @property
    def seconds_per_image(self) -> float | None:
        """Wall-clock seconds per simulated image (``None`` when none was simulated)."""
        return self.seconds / len(self.simulated) if self.simulated else None


def simulate_dataset(
    out: Path,
    n: int,
    seed: int = 0,
    config: SimulationConfig | None = None,
    *,
    workers: int = 1,
    progress: bool | None = None,
    preset: str = "default",
    command: str | None = None,
) -> DatasetRun:
    """Simulate images ``0 … n-1`` into ``out``, skipping complete ones, then write the card.

    Parameters
    ----------
    out
        Dataset directory (layout: :data:`latticewatch.training.simulate.output.LAYOUT`).
    n
        Number of images.
    seed
        Dataset seed; image ``i`` depends only on ``(seed, i)``.
    config
        What to simulate (default :class:`~latticewatch.training.simulate.config.SimulationConfig`).
    workers
        Processes (each single-threaded); 1 runs in this process.
    progress
        Show a progress bar (default: when stderr is a terminal).
    preset, command
        Recorded in ``dataset.json``.

    Examples
    --------
    >>> run = simulate_dataset(Path("sim"), 100, seed=1, workers=2)  # doctest: +SKIP
    >>> run.seconds_per_image  # doctest: +SKIP
    """
    config = config or SimulationConfig()
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out = Path(out)
    prepare_dataset(out, n, seed, config, preset=preset, command=command)
    todo = [i for i in range(n) if not is_complete(out, image_name(i), seed)]
    skipped = [i for i in range(n) if i not in set(todo)]
    if skipped:
        logger.info("%d of %d images already complete in %s", len(skipped), n, out)
    from tqdm import tqdm

    show = sys.stderr.isatty() if progress is None else progress
    jobs = [(str(out), int(seed), i, config.model_dump()) for i in todo]
    failed: dict[int, str] = {}
    done: list[int] = []
    t0 = time.perf_counter()
    with tqdm(total=len(jobs), desc="simulate", unit="image", disable=not show) as bar:
        if workers == 1 or len(jobs) <= 1:
            outcomes = _run_here(jobs)
        else:
            outcomes = _run_pool(jobs, min(workers, len(jobs)))
        for index, error, _ in outcomes:
            if error:
                failed[index] = error
            else:
                done.append(index)
            bar.update()
    seconds = time.perf_counter() - t0
    write_crop_index(out)
    write_dataset_card(out)
    return DatasetRun(out, sorted(done), skipped, failed, seconds, workers)


def _job(args: Job) -> Outcome:
    out, seed, index, config_dict = args
    t0 = time.perf_counter()
    try:
        config = SimulationConfig(**config_dict)
        write_image(Path(out), simulate_image(config, seed, index))
        return index, None, time.perf_counter() - t0
    except Exception as err:  # one failed image is reported; the others go on
        logger.exception("image %d failed", index)
        return index, f"{type(err).__name__}: {err}", time.perf_counter() - t0


def _run_here(jobs: list[Job]) -> Iterator[Outcome]:
    """The jobs in this process, on one core like each worker."""
    from threadpoolctl import threadpool_limits

    configure_abtem()
    with threadpool_limits(limits=1):
        yield from map(_job, jobs)


def _run_pool(jobs: list[Job], processes: int) -> Iterator[Outcome]:
    """The jobs on ``processes`` single-threaded workers, outcomes as they finish."""
    # spawn: fresh interpreters, which load BLAS with one thread and configure abTEM
    # (numba included) in their initializer before anything imports it
    with _single_threaded_children():
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(processes, initializer=_worker_init) as pool:
            yield from pool.imap_unordered(_job, jobs)


@contextlib.contextmanager
def _single_threaded_children() -> Iterator[None]:
    """Processes started inside get one BLAS/OpenMP thread; this process's environment is restored after."""
    saved = {v: os.environ.get(v) for v in _THREAD_VARIABLES}
    os.environ.update({v: "1" for v in saved})
    try:
        yield
    finally:
        for v, old in saved.items():
            if old is None:
                os.environ.pop(v, None)
            else:
                os.environ[v] = old


def _worker_init() -> None:
    # A fresh spawned interpreter: numba is not loaded yet, so its pool can be made one thread
    # wide (numba refuses a changed NUMBA_NUM_THREADS once loaded, hence not in configure_abtem).
    if "numba" not in sys.modules:
        os.environ["NUMBA_NUM_THREADS"] = "1"
    configure_abtem()
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1)  # BLAS/OpenMP pools of numpy and scipy
