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
    EXIT_OK,
    add_backend,
    add_baselines,
    add_profile,
    add_threads,
    baseline_names,
    command_line,
    exit_code,
    print_confusion,
    progress_enabled,
    report_failure,
)
from latticewatch.errors import ConfigError
from latticewatch.frame import CLASSES

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
    add_backend(p)
    p.set_defaults(func=evaluate_command)
    _register_classifier(subparsers)


_CLASSIFIER_HELP = """\
Score a profile's region classifier (the paper's forest or the CNN, whichever its manifest names)
on a labelled crops index (DIR/crops/index.csv as `latticewatch simulate` writes it), with the
files and thresholds the daemon uses: its `uncertain_below` (particles below it are `uncertain`)
and its `defect_confusion` (the corrected defect fraction of the series check).

By default every crop is scored: use it on a data set the profile never trained on, e.g. one
simulated with another seed. --test-split SEED scores only the test images of
`train-classifier --seed SEED --test-fraction F` on the same index, so that two profiles trained
on one index (forest and CNN) are compared on the same held-out particles.

Prints: balanced accuracy over the 5 classes (labelled particles, and all with no abstaining),
coverage, stacking fault vs no fault, the confusion matrix, tables per dose, particle size,
|defocus| and material, and the defect-fraction series (within ±0.05 of the truth, interval
coverage). --record NAME also writes the result into the profile's manifest as training.NAME.
"""


def _register_classifier(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("evaluate-classifier", help="score a profile's region classifier on a crops index",
                              description=_CLASSIFIER_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_profile(p)
    p.add_argument("--crops", type=Path, required=True, metavar="INDEX_CSV",
                   help="crops index, e.g. sim/crops/index.csv")
    p.add_argument("--test-split", type=int, default=None, metavar="SEED",
                   help="score only the test images of train-classifier's split with this seed")
    p.add_argument("--test-fraction", type=float, default=0.2, help="that split's test fraction (default: 0.2)")
    p.add_argument("--record", metavar="NAME", help="write the result into the profile's manifest as training.NAME")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    add_threads(p)
    p.set_defaults(func=evaluate_classifier_command)


def evaluate_classifier_command(args: argparse.Namespace) -> int:
    from latticewatch.models.manifest import update_manifest
    from latticewatch.runtime.plugins import resolve_profile
    from latticewatch.training.assess.classifier_eval import evaluate_classifier, score_crops, test_rows
    from latticewatch.training.assess.classifier_metrics import format_table
    from latticewatch.training.assess.defect_series import format_series_table

    if not 0 < args.test_fraction < 1:
        raise ConfigError(f"--test-fraction must lie between 0 and 1, got {args.test_fraction}")
    directory, manifest = resolve_profile(args.profile)
    scores = score_crops(directory, manifest, args.crops, threads=args.threads, progress=progress_enabled())
    for problem in scores.skipped:
        print(f"skipped: {problem}", file=sys.stderr)
    rows = None if args.test_split is None else test_rows(scores, args.test_fraction, args.test_split)
    result = evaluate_classifier(scores, manifest, rows)
    result["data"] = (f"crops index {args.crops}" + ("" if rows is None else
                      f", test images of the split with seed {args.test_split} and fraction {args.test_fraction}"))
    if args.record:
        entry = {"command": command_line(args), "data": result["data"], "metrics": result}
        update_manifest(directory, lambda m: m.setdefault("training", {}).__setitem__(args.record, entry))
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
        return EXIT_OK
    m = result["metrics"]

    def number(value: float | None) -> str:
        return "–" if value is None else f"{value:.3f}"

    print(f"{manifest.name}@{manifest.version} ({result['kind']}) on {result['n_crops']} crops from "
          f"{result['n_images']} image(s); uncertain below {m['uncertain_below']}")
    print_confusion(list(CLASSES), m["confusion_columns"], m["confusion_matrix"])
    print(f"balanced accuracy {number(m['balanced_accuracy'])} on the {number(m['coverage'])} labelled (all, no "
          f"abstaining: {number(m['balanced_accuracy_all'])}); SF vs no SF {number(m['sf_vs_nosf_balanced_accuracy'])} "
          f"(forced: {number(m['sf_vs_nosf_balanced_accuracy_forced'])})")
    for name, table in result["tables"].items():
        if table:
            print(format_table(table, name))
    if "within_tolerance" in result["defect_series"]:
        print(format_series_table(result["defect_series"]))
    return EXIT_OK


def evaluate_command(args: argparse.Namespace) -> int:
    from latticewatch.training.assess.evaluate import evaluate, format_report

    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise ConfigError(f"--threshold must lie in 0–1, got {args.threshold}")
    report = evaluate(
        args.profile, args.images, args.labels, threshold=args.threshold, baselines=baseline_names(args.baselines),
        fit_images=args.fit_images, fit_labels=args.fit_labels, per_image=args.per_image, threads=args.threads,
        backend=args.backend, progress=progress_enabled(), on_failure=report_failure,
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
