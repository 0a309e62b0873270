"""Command-line pieces shared by ``latticewatch train`` and ``latticewatch cross-validate``, and
the ``cross-validate`` command itself (registered by ``cli.build_parser``).

Nothing here imports torch at module level: the parser is built on machines without the
``[train]`` extra, and the commands say what to install when it is missing.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from latticewatch.models.architectures import ARCHITECTURES, DEFAULT_WIDTHS

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
TORCH_HINT = "training needs torch (pip install torch==2.13.0 && pip install '.[train]')"


def pixel_size_arg(text: str) -> float | str:
    """``--pixel-size-nm``: a positive number of nm, or ``none`` (never resample)."""
    if text.lower() == "none":
        return "none"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a pixel size in nm or 'none', got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"pixel size must be positive, got {value}")
    return value


def add_training_arguments(p: argparse.ArgumentParser) -> None:
    """Options of one training run: architecture, sampling, optimiser, augmentation."""
    g = p.add_argument_group("network and training")
    g.add_argument("--arch", choices=ARCHITECTURES, default="unet", help="segmentation network (default: %(default)s)")
    g.add_argument("--widths", type=int, nargs="+", default=None, metavar="N",
                   help="filters per level (unet) or per ResNet stage; default: "
                   + "; ".join(f"{a} {' '.join(map(str, w))}" for a, w in DEFAULT_WIDTHS.items()))
    g.add_argument("--normalisation", choices=("max", "percentile", "bezier_zscore"), default=None,
                   help="intensity normalisation the profile will use (default: max; Sadre et al.: bezier_zscore)")
    g.add_argument("--pixel-size-nm", type=pixel_size_arg, default=None, metavar="X|none",
                   help="model sampling: images are resampled to X nm/px; 'none' never resamples "
                   "(default: 0.05 for --synthetic, else the images' own pixel size)")
    g.add_argument("--val-fraction", type=float, default=0.15,
                   help="fraction of the images (whole series) held out for early stopping and metrics; "
                   "0 trains on all for exactly --steps (default: %(default)s)")
    g.add_argument("--steps", type=int, default=2000, help="maximum optimiser steps (default: %(default)s)")
    g.add_argument("--lr", type=float, default=1e-4, help="peak Adam learning rate, cosine-decayed (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=8, help="crops per step (default: %(default)s)")
    g.add_argument("--crop", type=int, default=256, help="crop side in model pixels (default: %(default)s)")
    g.add_argument("--augment", choices=("rotate", "dihedral"), default=None,
                   help="rotate: any angle 0–360° + flips (default for --images); dihedral: 90° turns + flips (default for --synthetic)")
    g.add_argument("--eval-every", type=int, default=100, help="steps between validations and checkpoints (default: %(default)s)")
    g.add_argument("--patience", type=int, default=8, help="validations without improvement before stopping (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")


def training_config(args: argparse.Namespace, *, augment: str):
    """`UNetTrainingConfig` from parsed options (imports torch; raises ImportError without it)."""
    from latticewatch.models.architectures import check
    from latticewatch.training.fit.unet import UNetTrainingConfig

    widths = check(args.arch, args.widths or DEFAULT_WIDTHS[args.arch])
    return UNetTrainingConfig(
        architecture=args.arch, widths=widths, crop=args.crop, batch_size=args.batch_size, learning_rate=args.lr,
        max_steps=args.steps, eval_every=args.eval_every, patience=args.patience, seed=args.seed, threads=args.threads,
        augment=args.augment or augment,
    )


def progress_enabled() -> bool:
    return sys.stderr.isatty()


def cmd_cross_validate(args: argparse.Namespace) -> int:
    from latticewatch.models.architectures import ArchitectureError
    from latticewatch.training.data.labelled import LabelledDataError, load_labelled

    try:
        from latticewatch.training.assess.cross_validation import cross_validate, format_table

        config = training_config(args, augment="rotate")
    except ImportError as err:
        print(f"error: {TORCH_HINT}: {err}", file=sys.stderr)
        return EXIT_USAGE
    except ArchitectureError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    try:
        data = load_labelled(args.images, args.labels)
        result = cross_validate(
            data, config, folds=args.folds, fold_seed=args.fold_seed, normalisation=args.normalisation or "max",
            pixel_size_nm=args.pixel_size_nm, val_fraction=args.val_fraction, baselines=args.baselines, out_json=args.json,
            resume=args.resume, command="latticewatch " + shlex.join(args.argv), progress=progress_enabled(),
            report=lambda line: print(line, file=sys.stderr, flush=True),
        )
    except (LabelledDataError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    print(format_table(result))
    if args.json:
        print(f"results in {args.json}")
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``cross-validate`` to the top-level command parser."""
    p = sub.add_parser(
        "cross-validate",
        help="k-fold cross-validation of a segmentation net (and baselines) on labelled images",
        description="Split labelled images into --folds folds, never splitting an acquisition series (names ending "
        "_layer_NNNN share a series), train a fresh net on each training split (early stopping on a series-grouped "
        "inner validation split) and score it on the held-out fold; fit each --baselines method on the same split. "
        "Prints per-fold lines as folds finish and a table of per-fold, pooled (all test pixels) and mean±sd "
        "metrics. Needs the [train] extra (torch).",
    )
    p.add_argument("--images", type=Path, required=True, metavar="DIR", help="images (MRC, TIFF, PNG, DM, SER, EMD)")
    p.add_argument("--labels", type=Path, required=True, metavar="DIR", help="masks with the same stems (non-zero = foreground)")
    p.add_argument("--folds", type=int, default=5, help="number of folds (default: %(default)s)")
    p.add_argument("--fold-seed", type=int, default=0, help="seed dealing series to folds (default: %(default)s)")
    p.add_argument("--baselines", nargs="*", default=[], choices=("bragg", "fourier", "otsu"), metavar="NAME",
                   help="classical baselines fitted on each training split: bragg, fourier, otsu")
    p.add_argument("--json", type=Path, metavar="OUT.json", help="write all results here (updated after every fold)")
    p.add_argument("--resume", action="store_true", help="reuse the finished folds of a matching earlier run in --json")
    add_training_arguments(p)
    p.set_defaults(func=cmd_cross_validate)


def load_cross_validation(path: Path) -> dict:
    """A ``cross-validate --json`` result, for recording in a trained profile's manifest."""
    result = json.loads(Path(path).read_text())
    if "model" not in result or "pooled" not in result["model"]:
        raise ValueError(f"{path}: not a finished cross-validate result (no pooled model metrics)")
    return result
