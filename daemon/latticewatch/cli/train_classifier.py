"""Command-line side of ``latticewatch train-classifier``.

:func:`register` adds the subcommand to the main parser.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

EXIT_OK, EXIT_USAGE = 0, 2

_HELP = """\
Train the profile's region classifier: the random forest of Groschner et al. (2021) — 500
trees, Gini impurity, classes weighted to balance them — on five features of each region
(mean, spread and centre of mass of its direction-resolved lattice-band Fourier power; mean
and standard deviation of its pixels), computed after the profile's own preprocessing.

Classes: stacking_fault, no_stacking_fault, misoriented, agglomeration, empty.

Training regions come from a crops index (DIR/crops/index.csv as `latticewatch simulate`
writes it: columns crop, mask, class, image, instance, pixel_size_nm; paths relative to the
csv) or are generated analytically (--synthetic N per class). The crops of some source images
are held out as the test set (never crops of one image on both sides); the balanced accuracy
and confusion matrix on them are printed and recorded in the manifest.

PROFILE_DIR must already be a profile (e.g. from `latticewatch train`); its forest file,
manifest classifier section and sha256 are replaced, the segmentation model is kept.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train-classifier`` to the ``latticewatch`` command.

    Examples
    --------
    >>> parser = argparse.ArgumentParser(prog="latticewatch")
    >>> register(parser.add_subparsers(dest="command"))
    >>> parser.parse_args(["train-classifier", "--out", "p", "--synthetic", "10"]).func.__name__
    'train_classifier_command'
    """
    p = subparsers.add_parser("train-classifier", help="train the 5-class stacking-fault forest of a profile",
                              description=_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, metavar="PROFILE_DIR", help="profile directory to update")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--crops", type=Path, metavar="INDEX_CSV", help="crops index, e.g. sim/crops/index.csv")
    source.add_argument("--synthetic", type=int, metavar="N_PER_CLASS", help="generate N analytic regions per class instead")
    p.add_argument("--test-fraction", type=float, default=0.2, help="share of source images held out for testing (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the forest and synthetic regions (default: %(default)s)")
    p.set_defaults(func=train_classifier_command)


def _print_confusion(metrics: dict) -> None:
    classes = metrics["classes"]
    short = [c.replace("no_stacking_fault", "no SF").replace("stacking_fault", "SF")[:10] for c in classes]
    width = max(len(c) for c in classes)
    print("confusion matrix on the held-out images (rows: true class, columns: predicted)")
    print(" " * width + "  " + "  ".join(f"{s:>10}" for s in short))
    for name, row in zip(classes, metrics["confusion_matrix"]):
        print(f"{name:<{width}}  " + "  ".join(f"{v:>10d}" for v in row))


def train_classifier_command(args: argparse.Namespace) -> int:
    from latticewatch.models.manifest import ManifestError, read_manifest
    from latticewatch.training.fit.classifier import CropIndexError, features_from_index, synthetic_features, train_classifier

    command = "latticewatch " + shlex.join(getattr(args, "argv", []) or [])
    progress = sys.stderr.isatty()
    try:
        manifest = read_manifest(args.out)
        if args.crops is not None:
            features = features_from_index(args.crops, manifest, progress=progress)
            data = f"crops index {args.crops}"
        else:
            if args.synthetic < 2:
                raise ValueError("--synthetic needs at least 2 regions per class")
            features = synthetic_features(args.synthetic, args.seed, manifest, progress=progress)
            data = f"analytic generator, {args.synthetic} regions per class, seed {args.seed}"
        for reason in features.skipped:
            print(f"skipped: {reason}", file=sys.stderr)
        result = train_classifier(args.out, features, test_fraction=args.test_fraction, seed=args.seed, command=command, data=data)
    except (ManifestError, CropIndexError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    m = result.metrics
    print(f"{m['n_train']} training regions from {m['n_images_train']} image(s), {m['n_test']} test regions from "
          f"{m['n_images_test']} other image(s)")
    _print_confusion(m)
    print(f"balanced accuracy on the held-out images: {m['balanced_accuracy']:.3f}")
    print(f"forest written to {args.out / result.manifest.classifier.skops}; manifest updated")
    return EXIT_OK
