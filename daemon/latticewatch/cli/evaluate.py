"""Command-line side of evaluation: ``latticewatch evaluate``.

:func:`register` adds the subcommand to the main parser.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from latticewatch.cli.common import (
    BASELINE_NAMES,
    add_baselines,
    add_profile,
    add_threads,
    baseline_names,
    exit_code,
    progress_enabled,
    report_failure,
)
from latticewatch.errors import ConfigError

_HELP = """\
Score a profile's particle segmentation against labelled micrographs, and in the same run the
classical baselines: Otsu threshold, Fourier annulus filter (Groschner et al. 2021) and Bragg
filter (Sadre et al. 2021).

IMAGES holds micrographs in any format `process` reads (MRC, TIFF, DM3/DM4, SER, EMD, PNG);
LABELS holds one PNG/TIFF mask per image with the same file stem, non-zero = particle (or
whatever the profile's foreground is, e.g. contamination). The network runs exactly as in
`process`: resampled to the model's pixel size (from the file header), median filtered,
normalised. Two network masks are scored: the probability map at the decision threshold
('model') and the mask after isolation morphology ('model, isolated').

Metrics are pooled over every pixel of the set: Dice (= F1), Jaccard (IoU), precision,
recall, pixel accuracy, balanced accuracy and the confusion matrix [[TN, FP], [FN, TP]].

Baseline parameters come from the profile manifest when `calibrate baselines` stored them;
else they are fitted on --fit-images/--fit-labels; else on the evaluation set itself, by
2-fold cross-fitting (fit on one half, score the other) — a warning says so.

Every frame of every image is scored; the sections of a stack share the stack's label. A file
or section that cannot be read or analysed is named on stderr (and in --json "failures") and
the rest is scored: exit code 1. A missing or unreadable label is exit code 2.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``evaluate`` to the ``latticewatch`` command.

    Examples
    --------
    >>> parser = argparse.ArgumentParser(prog="latticewatch")
    >>> register(parser.add_subparsers(dest="command"))
    >>> parser.parse_args(["evaluate", "--images", "i", "--labels", "l"]).func.__name__
    'evaluate_command'
    """
    p = subparsers.add_parser(
        "evaluate",
        help="score a profile (and Otsu/Fourier/Bragg baselines) against labelled images",
        description=_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_profile(p)
    p.add_argument("--images", type=Path, required=True, metavar="DIR", help="labelled micrographs")
    p.add_argument("--labels", type=Path, required=True, metavar="DIR", help="masks, same file stems as the images")
    p.add_argument("--threshold", type=float, metavar="T",
                   help="decision threshold on the particle probability, 0–1 "
                   "(default: the manifest's segmentation.threshold)")
    add_baselines(p, BASELINE_NAMES, "baselines to run alongside")
    p.add_argument("--fit-images", type=Path, metavar="DIR", help="separate labelled images to fit the baselines on")
    p.add_argument("--fit-labels", type=Path, metavar="DIR", help="their masks")
    p.add_argument("--per-image", action="store_true", help="also report every image's metrics")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    add_threads(p)
    p.set_defaults(func=evaluate_command)


def evaluate_command(args: argparse.Namespace) -> int:
    from latticewatch.training.assess.evaluate import evaluate, format_report

    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise ConfigError(f"--threshold must lie in 0–1, got {args.threshold}")
    report = evaluate(
        args.profile, args.images, args.labels, threshold=args.threshold, baselines=baseline_names(args.baselines),
        fit_images=args.fit_images, fit_labels=args.fit_labels, per_image=args.per_image, threads=args.threads,
        progress=progress_enabled(), on_failure=report_failure,
    )
    fit = report["baseline_fit"]
    if fit and fit["source"] in ("cross_fit", "in_sample"):
        print(f"warning: baseline parameters {fit['note']}", file=sys.stderr)
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print(format_report(report))
    return exit_code(report["failures"])
