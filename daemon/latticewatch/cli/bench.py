"""``latticewatch bench``: how fast the pipeline (or the archive) runs on this machine."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from latticewatch.cli.common import (
    EXIT_OK,
    add_profile,
    add_threads,
    exit_code,
    frame_side,
    positive_int,
    report_failure,
)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``bench`` to the top-level command parser."""
    p = sub.add_parser(
        "bench",
        help="measure per-stage speed (or the archive's) and print medians",
        description="Time every stage on synthetic uint16 frames (0.025 nm/px, resampled to the model's sampling as in "
        "production) and, in the same run, a naive pipeline (eager torch per 512² tile, per-particle Python loops) "
        "for the ratio. Prints the median per stage and end to end for each frame size. --archive measures the "
        "archive encoder/decoder instead; --startup the cold start: wall time of `latticewatch process FILE` on one "
        "frame and of `latticewatch run` until it is ready, each in fresh interpreters (goals: 2 s and 3 s).",
    )
    add_profile(p)
    p.add_argument("--sizes", type=frame_side, nargs="+", default=[1024, 4096], metavar="PX",
                   help="frame sides in pixels (default: 1024 4096)")
    p.add_argument("--repeats", type=positive_int, default=7,
                   help="timed repetitions per measurement (default: %(default)s)")
    p.add_argument("--no-naive", action="store_true", help="skip the naive reference pipeline (it needs torch)")
    p.add_argument("--archive", action="store_true", help="benchmark the archive encoder/decoder instead")
    p.add_argument("--archive-frames", nargs="+", default=[], metavar="FILE",
                   help="with --archive: also archive these micrographs lossless, beside zstd of their raw bytes")
    p.add_argument("--startup", action="store_true",
                   help="benchmark the cold start of `process` on one frame and of the daemon instead")
    p.add_argument("--startup-file", type=Path, metavar="FILE",
                   help="with --startup: the frame `process` reads (default: a synthetic 512² MRC)")
    p.add_argument("--no-daemon", action="store_true", help="with --startup: time `process` only")
    add_threads(p)
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.archive:
        from latticewatch.sinks.archive.bench import format_bench_table, run_archive_bench

        results = run_archive_bench(repeats=args.repeats, frames=args.archive_frames)
        print(json.dumps(results, indent=2) if args.json else format_bench_table(results))
        return EXIT_OK
    if args.startup:
        from latticewatch.runtime.bench import format_startup, run_startup_bench

        results = run_startup_bench(args.profile, file=args.startup_file, repeats=args.repeats,
                                    daemon=not args.no_daemon)
        print(json.dumps(results, indent=2) if args.json else format_startup(results))
        return exit_code(results["failures"])
    from latticewatch.runtime.bench import format_results, run_pipeline_bench

    results = run_pipeline_bench(args.profile, sizes=args.sizes, repeats=args.repeats, naive=not args.no_naive,
                                 threads=args.threads, on_failure=report_failure)
    print(json.dumps(results, indent=2) if args.json else format_results(results))
    return exit_code(results["failures"])
