"""``latticewatch bench``: how fast the pipeline (or the archive) runs on this machine."""

from __future__ import annotations

import argparse
import json
import sys
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
from latticewatch.models.backends import BACKEND_CHOICES


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``bench`` to the top-level command parser."""
    p = sub.add_parser(
        "bench",
        help="measure per-stage speed and frames/s per backend (or the archive's, or the cold start)",
        description="Time every stage on synthetic uint16 frames (0.025 nm/px, resampled to the model's sampling as in "
        "production) for each backend, push frames through the daemon's pipelined runner for frames/s and latency, "
        "and, in the same run, time a naive pipeline (eager torch per 512² tile, per-particle Python loops) at the "
        "camera's sampling and at the model's for the ratios. Prints median and p99 per stage and end to end for each "
        "frame size. A backend that cannot run here is reported as skipped (exit code 0 when another ran, 2 when "
        "none could). Goals (issue 15) are checked in the JSON's 'goals'. --archive measures the "
        "archive encoder/decoder instead; --startup the cold start: wall time of `latticewatch process FILE` on one "
        "frame and of `latticewatch run` until it is ready, each in fresh interpreters (goals: 2 s and 3 s).",
    )
    add_profile(p)
    p.add_argument("--backend", type=_backends, default=["auto"], metavar="B[,B…]",
                   help=f"backends to measure in one run, comma-separated ({', '.join(BACKEND_CHOICES)}; "
                   "default: auto)")
    p.add_argument("--sizes", type=_sides, nargs="+", default=[[1024, 4096]], metavar="PX[,PX…]",
                   help="frame sides in pixels, comma- or space-separated (default: 1024,4096)")
    p.add_argument("--repeats", type=positive_int, default=7,
                   help="timed repetitions per measurement (default: %(default)s; half for a naive run over 1 s); "
                   "each pipelined run gets about 0.7 s × this of frames (4 to 400 frames)")
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


def _backends(text: str) -> list[str]:
    """``--backend``: comma-separated kinds of `BACKEND_CHOICES`, each once, in the order given."""
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    wrong = [k for k in kinds if k not in BACKEND_CHOICES]
    if wrong or not kinds:
        raise argparse.ArgumentTypeError(f"unknown backend {', '.join(wrong) or repr(text)}; "
                                         f"choose from {', '.join(BACKEND_CHOICES)}")
    return list(dict.fromkeys(kinds))


def _sides(text: str) -> list[int]:
    """``--sizes``: one or more comma-separated frame sides."""
    return [frame_side(t) for t in text.split(",") if t.strip()]


def cmd_bench(args: argparse.Namespace) -> int:
    if args.archive:
        from latticewatch.sinks.archive.bench import format_bench_table, run_archive_bench

        results = run_archive_bench(repeats=args.repeats, frames=args.archive_frames)
        print(json.dumps(results, indent=2) if args.json else format_bench_table(results))
        return EXIT_OK
    if args.startup:
        from latticewatch.runtime.bench_startup import format_startup, run_startup_bench

        results = run_startup_bench(args.profile, file=args.startup_file, repeats=args.repeats,
                                    daemon=not args.no_daemon)
        print(json.dumps(results, indent=2) if args.json else format_startup(results))
        return exit_code(results["failures"])
    from latticewatch.runtime.bench import format_results, run_pipeline_bench

    sizes = list(dict.fromkeys(side for group in args.sizes for side in group))
    results = run_pipeline_bench(args.profile, backends=args.backend, sizes=sizes, repeats=args.repeats,
                                 naive=not args.no_naive, threads=args.threads, on_failure=report_failure)
    for kind, measured in results["backends"].items():
        if "skipped" in measured:
            print(f"bench: backend {kind} skipped: {measured['skipped']}", file=sys.stderr)
    print(json.dumps(results, indent=2) if args.json else format_results(results))
    return exit_code(results["failures"])
