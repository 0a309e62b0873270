"""The client side of ``latticewatch batch``: plan the work, send it to Dask, record every frame exactly once.

::

    client (this process)                                   workers (each loads the profile once)
    ─────────────────────                                   ─────────────────────────────────────
    sources ─▶ plan: count sections (headers only),         analyse_ref(FrameRef, spec, out):
               skip what the ledger says is done  ──refs──▶   read by path (+ archive key), analyse,
    ledger + event log ◀── as_completed ◀── RefResult ─────   write process's reports into out/
    (out/.latticewatch/, only the client writes them)          (atomic: a repeated task leaves one copy)
    end: out/particles.csv (+ .parquet) rebuilt from the per-frame tables

Exactly once, after any crash (the daemon's rules, `latticewatch.runtime.ledger`): a frame counts
as done only when its result is in the ledger; its reports are on disk before that (the worker
wrote them), its events go from the ledger to ``events.jsonl`` (`EventLog` cuts back a log written
past its last commit). A re-run therefore analyses only frames the ledger does not know, a
repeated task overwrites its own reports with the same content, no event is logged twice, and
the combined table, rebuilt from the per-frame files at the end, cannot hold a row twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import distributed

from latticewatch.io.atomic import atomic_path, write_atomic
from latticewatch.runtime.batch import Failure, micrograph_files
from latticewatch.runtime.cluster import AnalyserPlugin, AnalyserSpec, FrameRef, RefResult, analyse_ref, reduced_problem
from latticewatch.runtime.eventlog import EventLog
from latticewatch.runtime.ledger import Ledger
from latticewatch.runtime.store import StateDir
from latticewatch.sinks.events import error_event, parse, render

log = logging.getLogger(__name__)

#: The combined particle table of every per-frame table in the output directory.
COMBINED_CSV = "particles.csv"
COMBINED_PARQUET = "particles.parquet"
#: The batch's ledger and event log live here, inside the output directory.
STATE_DIR = ".latticewatch"


@dataclass
class Plan:
    """What a run has to do: the tasks, and what earlier runs already settled."""

    refs: list[FrameRef] = field(default_factory=list)
    frames: int = 0  # frames the tasks are expected to give (a failed file counts one)
    skipped: int = 0  # frames an earlier run analysed
    earlier: list[Failure] = field(default_factory=list)  # frames an earlier run recorded as failed
    refused: list[Failure] = field(default_factory=list)  # archived frames stored reduced: failed without a task


@dataclass
class BatchResult:
    """What `ScaleOut.run` did: summary rows of the frames it analysed, every failure, the combined tables."""

    rows: list[dict[str, Any]]
    failures: list[Failure]
    skipped: int
    table: Path
    parquet: Path | None
    wall_s: float
    worker_s: float  # the tasks' own time, summed over workers


def expand_sources(sources: Sequence[Path]) -> list[Path]:
    """Folders become their micrographs (`micrograph_files`); files stay as given, in order, once each.

    >>> expand_sources([Path("a.mrc"), Path("a.mrc")])
    [PosixPath('a.mrc')]
    """
    files: list[Path] = []
    for source in sources:
        files += micrograph_files(source) if source.is_dir() else [source]
    return list(dict.fromkeys(files))


class ScaleOut:
    """One ``latticewatch batch`` run on a Dask client, its ledger and event log in ``out/.latticewatch``.

    Parameters
    ----------
    client
        The Dask client (`latticewatch.runtime.cluster.open_client`); its workers must see the
        input files and ``out`` under the same paths.
    out
        Output directory: per-frame reports, the combined tables and the state.
    spec
        The profile and reading options every worker loads once.
    save_probability
        Also write each frame's probability map (``.npy``), as ``process --save-probabilities``.
    on_frame, on_failure
        Called on the client as each frame's result or failure is recorded (the command line prints).
    progress
        A progress bar over the frames on stderr.

    Examples
    --------
    >>> with open_client(local_workers=2) as client:  # doctest: +SKIP
    ...     result = ScaleOut(client, Path("out"), AnalyserSpec("nanoparticles")).run([Path("session/")])
    >>> len(result.rows), result.failures  # doctest: +SKIP
    (200, [])
    """

    def __init__(self, client: distributed.Client, out: Path, spec: AnalyserSpec, *, save_probability: bool = False,
                 on_frame: Callable[[Any], None] | None = None, on_failure: Callable[[Failure], None] | None = None,
                 progress: bool = False) -> None:
        self.client = client
        self.out = Path(out)
        self.spec = spec
        self.save_probability = save_probability
        self.on_frame = on_frame
        self.on_failure = on_failure
        self.progress = progress
        self.state = StateDir(self.out / STATE_DIR)

    def run(self, sources: Sequence[Path] = (), archives: Sequence[Path] = ()) -> BatchResult:
        """Analyse what the ledger does not know yet of ``sources`` (files, folders) and ``archives`` (roots)."""
        start = time.perf_counter()
        ledger = Ledger(self.state.ledger_path)
        try:
            events = EventLog(self.state.events_path, ledger)
            events.recover()  # a killed run's stored but unlogged events, and a log cut back to its commit
            plan = self.plan(ledger, expand_sources(sources), archives)
            for failure in plan.earlier + plan.refused:  # told again (earlier ones are recorded already)
                self._fail(ledger, events, failure)
            rows, failures, worker_s = self._execute(ledger, events, plan)
        finally:
            ledger.close()
        table, parquet = combine_tables(self.out)
        return BatchResult(rows, plan.earlier + plan.refused + failures, plan.skipped, table, parquet,
                           time.perf_counter() - start, worker_s)

    def plan(self, ledger: Ledger, files: Sequence[Path], archives: Sequence[Path] = ()) -> Plan:
        """The tasks for what the ledger does not know; frames it knows are skipped or reported failed."""
        from latticewatch.io.readers import ReadError, count_sections
        from latticewatch.sinks.archive import ArchiveReader

        plan = Plan()
        for path in files:
            try:
                n = count_sections(path, permissive=self.spec.permissive)
                # one section: ``path``, or ``path#0`` for a permissive truncated stack that declared more
                ids = [[str(path), f"{path}#0"]] if n == 1 else [[f"{path}#{k}"] for k in range(n)]
            except (ReadError, OSError):  # a whole-file failure: the task reports it by the batch rules
                ids = [[str(path)]]
            done = {fid for names in ids for fid in names if self._settled(ledger, plan, fid, str(path))}
            pending = [names for names in ids if not done & set(names)]
            if pending:
                plan.refs.append(FrameRef(str(path), skip=frozenset(done)))
                plan.frames += len(pending)
        planned: set[str] = set()
        for root in archives:
            for entry in ArchiveReader(root).entries():
                if entry.frame_id in planned or self._settled(ledger, plan, entry.frame_id, str(entry.path)):
                    continue  # the same frame in two archives is analysed once
                planned.add(entry.frame_id)
                if not entry.lossless:  # a reduced frame: its low-value pixels are gone (README "Archive")
                    plan.refused.append(Failure(str(entry.path), entry.frame_id,
                                                 reduced_problem(entry.frame_id, str(entry.path), entry.policy)))
                    continue
                plan.refs.append(FrameRef(str(entry.path), entry.key, entry.frame_id))
                plan.frames += 1
        return plan

    @staticmethod
    def _settled(ledger: Ledger, plan: Plan, frame_id: str, file: str) -> bool:
        """Whether an earlier run settled the frame (counted as skipped, or as a failure when it failed)."""
        state = ledger.state(frame_id)
        if state in (None, "seen"):
            return False
        if state == "quarantined":
            plan.earlier.append(Failure(file, frame_id, f"{frame_id}: failed in an earlier run (its error event is "
                                         f"in {STATE_DIR}/events.jsonl); not retried"))
        else:
            plan.skipped += 1
        return True

    def _execute(self, ledger: Ledger, events: EventLog, plan: Plan) -> tuple[list[dict], list[Failure], float]:
        """Run the plan's tasks, recording each result as it arrives; rows come back in plan order."""
        from tqdm import tqdm

        if not plan.refs:
            return [], [], 0.0
        self.client.register_plugin(AnalyserPlugin(self.spec))
        futures = [self.client.submit(analyse_ref, ref, self.spec, str(self.out), pure=False,
                                      save_probability=self.save_probability) for ref in plan.refs]
        order = {id(future): i for i, future in enumerate(futures)}
        results: list[tuple[int, RefResult]] = []
        failures: list[Failure] = []
        try:
            with tqdm(total=plan.frames, desc="frames", unit="frame", disable=not self.progress) as bar:
                for future in distributed.as_completed(futures):
                    try:
                        result = future.result()  # a task's non-input error (model, disk, bug) stops the batch here
                    except distributed.KilledWorker as err:
                        failures.append(self._given_up(plan.refs[order[id(future)]], err))
                        bar.update(1)
                        continue
                    failures += self._record(ledger, events, result)
                    results.append((order[id(future)], result))
                    bar.update(len(result.done) + len(result.failures))
        finally:
            self.client.cancel(futures)  # after an error: nothing more runs for a batch that stopped
        results.sort(key=lambda item: item[0])
        return [d.row for _, r in results for d in r.done], failures, sum(r.seconds for _, r in results)

    def _given_up(self, ref: FrameRef, err: distributed.KilledWorker) -> Failure:
        """A task Dask gave up on after its workers died: this run's failure, kept out of the ledger.

        Its file may crash or exhaust the worker that reads it (it then sinks alone), or the cluster
        lost nodes; either way nothing about the frame is known, so a re-run tries it again.
        """
        failure = Failure(ref.path, ref.frame_id, f"{ref.frame_id or ref.path}: given up after the workers running it "
                          f"died ({err}); a crash or out of memory reading or analysing it? Not recorded: running "
                          "the batch again tries it again")
        if self.on_failure is not None:
            self.on_failure(failure)
        return failure

    def _record(self, ledger: Ledger, events: EventLog, result: RefResult) -> list[Failure]:
        """Ledger and event log for one task's frames and failures; a frame already done is left alone."""
        for done in result.done:
            if not ledger.see(done.frame_id, source="batch", origin=done.origin):
                continue  # recorded before (a task that ran twice): its reports are the same files
            ledger.analysed(done.frame_id, done.events)
            events.publish(done.frame_id, parse(done.events))
            if self.on_frame is not None:
                self.on_frame(done)
        for failure in result.failures:
            self._fail(ledger, events, failure)
        return list(result.failures)

    def _fail(self, ledger: Ledger, events: EventLog, failure: Failure) -> None:
        """Quarantine a failed frame (a whole file under its path) with its error event, once."""
        frame_id = failure.frame_id or failure.file
        if not ledger.is_done(frame_id):
            error = [error_event(frame_id, failure.file, failure.error)]
            ledger.quarantined(frame_id, failure.error, render(error), source="batch", origin=failure.file)
            events.publish(frame_id, error)
        if self.on_failure is not None:
            self.on_failure(failure)


def combine_tables(out: Path) -> tuple[Path, Path | None]:
    """``out/particles.csv``: every per-frame ``*_particles.csv`` in ``out``, one header, rows as written.

    Rebuilt whole at the end of each run (atomically), so it holds each frame's rows once whatever
    runs came before. Also ``particles.parquet`` when pyarrow is installed (``None`` otherwise).

    Examples
    --------
    >>> import tempfile
    >>> out = Path(tempfile.mkdtemp())
    >>> for name, row in (("a", "a,0"), ("b", "b,0")):
    ...     _ = (out / f"{name}_particles.csv").write_text(f"frame_id,region_id\\n{row}\\n")
    >>> table, _ = combine_tables(out)
    >>> table.read_text().splitlines()
    ['frame_id,region_id', 'a,0', 'b,0']
    """
    from latticewatch.sinks.reports import CSV_COLUMNS

    parts = sorted(p for p in out.glob("*_particles.csv") if not p.name.startswith("."))
    header = (",".join(CSV_COLUMNS) + "\r\n").encode()  # what csv.DictWriter writes, for a table of no frame

    def write(fh) -> None:
        for i, part in enumerate(parts):
            text = part.read_bytes()
            _, _, rows = text.partition(b"\n")
            fh.write(text if i == 0 else rows)
        if not parts:
            fh.write(header)

    table = out / COMBINED_CSV
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(table, write)
    return table, _parquet(table)


def _parquet(table: Path) -> Path | None:
    """The CSV as Parquet when pyarrow is importable (an optional extra: ``pip install pyarrow``)."""
    try:
        from pyarrow import csv as pa_csv
        from pyarrow import parquet
    except ImportError:
        log.info("pyarrow is not installed: %s written, no Parquet copy", table)
        return None
    target = table.with_name(COMBINED_PARQUET)
    with atomic_path(target) as tmp:
        parquet.write_table(pa_csv.read_csv(table), tmp)
    return target
