"""``latticewatch batch``: analyse folders, stacks and archives on a Dask cluster, exactly once per frame."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from latticewatch.cli.common import (
    add_backend,
    add_batch_options,
    add_profile,
    add_report_options,
    exit_code,
    positive_int,
    progress_enabled,
)
from latticewatch.errors import ConfigError

if TYPE_CHECKING:
    from latticewatch.runtime.cluster import FrameDone

_HELP = (
    "Analyse micrographs (folders, files, stacks) and frames archived whole (--archive) across a Dask cluster, "
    "writing the same per-frame reports as 'process' into DIR plus DIR/particles.csv (all particles of all frames; "
    "also particles.parquet when pyarrow is installed). Default: a local cluster of one worker process per core; "
    "--scheduler tcp://HOST:8786 uses a running cluster (e.g. dask-jobqueue on Slurm) whose workers see the input "
    "files and DIR under the same paths. Each worker loads the profile once. A ledger in DIR/.latticewatch records "
    "every frame: running the same command again (after a crash, or with new files) analyses only what is missing "
    "and never repeats a report, an event (DIR/.latticewatch/events.jsonl) or a table row. Frames archived reduced "
    "are refused (their low-value pixels are gone). A bad file or frame is named on stderr and the others go on; "
    "exit code 1 if any failed (in this run or an earlier one on DIR)."
)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``batch`` to the top-level command parser."""
    p = sub.add_parser("batch", help="analyse folders, stacks and archives on a Dask cluster", description=_HELP)
    p.add_argument("sources", nargs="*", type=Path, metavar="SRC", help="micrograph files, stacks or folders of them")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory (created if needed)")
    p.add_argument("--archive", type=Path, action="append", default=[], metavar="ROOT",
                   help="also re-analyse the frames archived whole under ROOT (an archive root, session directory "
                   "or .h5 file; repeatable); this reads archives, it does not write one")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--scheduler", metavar="ADDRESS", help="address of a running Dask scheduler (tcp://HOST:8786)")
    where.add_argument("--local-workers", type=positive_int, metavar="N",
                       help="worker processes of the local cluster (default: one per usable core)")
    add_profile(p)
    add_report_options(p)
    add_batch_options(p)
    add_backend(p)
    threads = next(a for a in p._actions if a.dest == "threads")
    threads.help = "inference threads per task (default: 1, with one single-threaded worker process per core)"
    p.set_defaults(func=cmd_batch)


def cmd_batch(args: argparse.Namespace) -> int:
    from latticewatch.calibration import load_calibration
    from latticewatch.cli.common import report_failure
    from latticewatch.cli.process import _print_table
    from latticewatch.runtime.cluster import AnalyserSpec, dashboard_link, open_client
    from latticewatch.runtime.plugins import resolve_profile
    from latticewatch.runtime.scaleout import ScaleOut

    if not args.sources and not args.archive:
        raise ConfigError("batch: nothing to analyse; give SRC files or folders, or --archive ROOT")
    _, manifest = resolve_profile(str(args.profile))  # a wrong profile or calibration fails here, before a cluster
    if args.calibration is not None:
        load_calibration(args.calibration)
    # one task per worker thread: an analyser using every core in each of them would oversubscribe the cores
    profile = str(Path(args.profile).resolve()) if Path(args.profile).is_dir() else args.profile  # workers' cwd differs
    spec = AnalyserSpec(profile, backend=args.backend, classifier=args.classifier, threads=args.threads or 1,
                        permissive=args.permissive, calibration=str(args.calibration) if args.calibration else None)
    if not args.verbose:  # the cluster's INFO lines (workers started, keys cancelled …) are noise here; -v shows them
        logging.getLogger("distributed").setLevel(logging.WARNING)
    progress = progress_enabled()
    with open_client(args.scheduler, args.local_workers) as client:
        workers = len(client.scheduler_info()["workers"])
        link = dashboard_link(client)
        print(f"dask: {args.scheduler or 'local cluster'}, {workers} worker(s)"
              + (f"; dashboard {link}" if link else ""), file=sys.stderr)
        run = ScaleOut(client, args.out, spec, save_probability=args.save_probabilities, on_frame=_warn,
                       on_failure=report_failure, progress=progress)
        result = run.run(args.sources, args.archive)
    if args.json:
        json.dump({"frames": result.rows, "failures": [f.as_dict() for f in result.failures],
                   "skipped": result.skipped, "out": str(args.out), "particles_csv": str(result.table),
                   "particles_parquet": str(result.parquet) if result.parquet else None,
                   "workers": workers, "wall_s": round(result.wall_s, 3), "worker_s": round(result.worker_s, 3)},
                  sys.stdout, indent=2)
        print()
    else:
        _print_table(result.rows, classified=manifest.classifier is not None)
        print(f"{len(result.rows)} frame(s) analysed, {result.skipped} done by an earlier run, "
              f"{len(result.failures)} failed; results in {args.out}, all particles in {result.table}")
    return exit_code(result.failures)


def _warn(done: FrameDone) -> None:
    """A frame's analysis warnings on stderr as its result arrives, in the words of ``process``."""
    for text in done.warnings:
        print(f"warning: {done.frame_id}: {text}", file=sys.stderr)
    if done.out_of_domain:
        print(f"warning: {done.frame_id}: model_out_of_domain: {'; '.join(done.out_of_domain)}; its particles, "
              "sizes and defect fraction are not reliable", file=sys.stderr)
