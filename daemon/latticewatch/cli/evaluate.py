"""Command-line side of evaluation: ``latticewatch evaluate``.

:func:`register` adds the subcommand to the main parser.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("latticewatch.training.assess.evaluate")

EXIT_OK, EXIT_USAGE = 0, 2

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
    p.add_argument("--profile", default="nanoparticles", help="installed profile name or profile directory (default: %(default)s)")
    p.add_argument("--images", type=Path, required=True, metavar="DIR", help="labelled micrographs")
    p.add_argument("--labels", type=Path, required=True, metavar="DIR", help="masks, same file stems as the images")
    p.add_argument("--threshold", type=float, metavar="T",
                   help="decision threshold on the particle probability, 0–1 (default: the manifest's segmentation.threshold)")
    p.add_argument("--baselines", default="otsu,fourier,bragg", metavar="LIST",
                   help="comma-separated baselines to run alongside, or 'none' (default: %(default)s)")
    p.add_argument("--fit-images", type=Path, metavar="DIR", help="separate labelled images to fit the baselines on")
    p.add_argument("--fit-labels", type=Path, metavar="DIR", help="their masks")
    p.add_argument("--per-image", action="store_true", help="also report every image's metrics")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.add_argument("--threads", type=int, default=None, help="inference threads (default: all usable cores)")
    p.set_defaults(func=evaluate_command)


def evaluate_command(args: argparse.Namespace) -> int:
    from latticewatch.models.manifest import ManifestError
    from latticewatch.training.assess.baselines import BaselineError
    from latticewatch.training.assess.evaluate import evaluate, format_report, parse_baselines
    from latticewatch.training.data.labelled import LabelledDataError

    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        print(f"error: --threshold must lie in 0–1, got {args.threshold}", file=sys.stderr)
        return EXIT_USAGE
    try:
        report = evaluate(
            args.profile, args.images, args.labels, threshold=args.threshold, baselines=parse_baselines(args.baselines),
            fit_images=args.fit_images, fit_labels=args.fit_labels, per_image=args.per_image, threads=args.threads,
            progress=sys.stderr.isatty(),
        )
    except (LabelledDataError, ManifestError, BaselineError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    fit = report["baseline_fit"]
    if fit and fit["source"] in ("cross_fit", "in_sample"):
        print(f"warning: baseline parameters {fit['note']}", file=sys.stderr)
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print(format_report(report))
    return EXIT_OK
