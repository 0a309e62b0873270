"""Training commands: ``latticewatch train | train-classifier | cross-validate``.

Nothing here imports torch at module level: the parser is built on machines without the
``[train]`` extra, and the commands say what to install when it is missing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from latticewatch.cli.common import (
    EXIT_OK,
    add_baselines,
    baseline_names,
    command_line,
    needs_extra,
    print_confusion,
    progress_enabled,
)
from latticewatch.errors import ConfigError, InputError
from latticewatch.frame import CLASSES
from latticewatch.models.architectures import ARCHITECTURES, DEFAULT_WIDTHS

if TYPE_CHECKING:  # the parser is built without the training code; it is imported only to run a command
    from latticewatch.training.data.supervised import ExtraData

_TRAIN_HELP = (
    "With --images/--labels: train a segmentation net on labelled micrographs (any readable format; masks non-zero = "
    "foreground), preprocessed exactly as the analyser will (resampling to --pixel-size-nm, 3×3 median, "
    "--normalisation), with random rotations (0–360°) and flips, cross-entropy + Dice loss, Adam, early stopping on a "
    "validation split that holds out whole series; writes a segmentation-only profile. Without: generate analytic "
    "HRTEM frames and train the U-Net and the 500-tree stacking-fault forest. Either way: ONNX + safetensors (+ skops) "
    "and a manifest with the metrics and this command. Needs the [train] extra (torch)."
)

_CLASSIFIER_HELP = """\
Train the profile's region classifier, one of two kinds:

--kind forest (default): the random forest of Groschner et al. (2021) — 500 trees, Gini
impurity, classes weighted to balance them — on five features of each region (mean, spread
and centre of mass of its direction-resolved lattice-band Fourier power; mean and standard
deviation of its pixels), computed after the profile's own preprocessing.

--kind cnn: a small CNN (4 conv blocks 16-32-64-128, global pooling) on a --crop-size window
around each region at the profile's sampling, with channels image, mask and log power
spectrum; trained for --steps steps of --batch-size crops, classes drawn equally often,
with the eight 90° turns/flips and shifts ≤ --shift px. Source images are split into
train, validation (early stopping, the `uncertain_below` threshold, the defect confusion)
and test (every score printed and recorded: balanced accuracy, confusion, coverage, tables
per dose/size/defocus/material, defect-fraction series). Writes cnn.onnx + cnn.safetensors
and the manifest's classifier section (kind "cnn"); the forest files stay. Needs torch.

Classes: stacking_fault, no_stacking_fault, misoriented, agglomeration, empty.

Training regions come from a crops index (DIR/crops/index.csv as `latticewatch simulate`
writes it: columns crop, mask, class, image, instance, pixel_size_nm; paths relative to the
csv) or are generated analytically (--synthetic N per class). The crops of some source images
are held out as the test set (never crops of one image on both sides); the balanced accuracy
and confusion matrix on them are printed and recorded in the manifest.

PROFILE_DIR must already be a profile (e.g. from `latticewatch train`); its classifier
files, manifest classifier section and sha256 are replaced, the segmentation model is kept.
"""

_CROSS_VALIDATE_HELP = (
    "Split labelled images into --folds folds, never splitting an acquisition series (names ending _layer_NNNN share a "
    "series), train a fresh net on each training split (early stopping on a series-grouped inner validation split) "
    "and score it on the held-out fold; fit each --baselines method on the same split. Prints per-fold lines as folds "
    "finish and a table of per-fold, pooled (all test pixels) and mean±sd metrics. Needs the [train] extra (torch)."
)


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


def json_object(text: str) -> dict:
    """``--isolation``: a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"min_area_nm2\": 0.5}}', got {text!r}")
    return value


def add_training_arguments(p: argparse.ArgumentParser) -> None:
    """Options of one training run: architecture, sampling, optimiser, augmentation."""
    g = p.add_argument_group("network and training")
    g.add_argument("--arch", choices=ARCHITECTURES, default="unet", help="segmentation network (default: %(default)s)")
    g.add_argument("--widths", type=int, nargs="+", default=None, metavar="N",
                   help="filters per level (unet) or per ResNet stage; default: "
                   + "; ".join(f"{a} {' '.join(map(str, w))}" for a, w in DEFAULT_WIDTHS.items()))
    g.add_argument("--normalisation", choices=("max", "percentile", "bezier_zscore", "zscore"), default=None,
                   help="intensity normalisation the profile will use (default: max; Sadre et al.: bezier_zscore; "
                   "zscore: mean 0, sd 1, independent of contrast and offset)")
    g.add_argument("--pixel-size-nm", type=pixel_size_arg, default=None, metavar="X|none",
                   help="model sampling: images are resampled to X nm/px; 'none' never resamples "
                   "(default: 0.05 for --synthetic, else the images' own pixel size)")
    g.add_argument("--val-fraction", type=float, default=0.15,
                   help="fraction of the images (whole series) held out for early stopping and metrics; "
                   "0 trains on all for exactly --steps (default: %(default)s)")
    g.add_argument("--steps", type=int, default=2000, help="maximum optimiser steps (default: %(default)s)")
    g.add_argument("--lr", type=float, default=1e-4,
                   help="peak Adam learning rate, cosine-decayed (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=8, help="crops per step (default: %(default)s)")
    g.add_argument("--crop", type=int, default=256, help="crop side in model pixels (default: %(default)s)")
    g.add_argument("--augment", choices=("rotate", "dihedral"), default=None,
                   help="rotate: any angle 0–360° + flips (default for --images); dihedral: 90° turns + flips "
                   "(default for --synthetic)")
    g.add_argument("--eval-every", type=int, default=100,
                   help="steps between validations and checkpoints (default: %(default)s)")
    g.add_argument("--patience", type=int, default=8,
                   help="validations without improvement before stopping (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of sampling, augmentation and initialisation (default: %(default)s)")
    g.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads (default: all cores)")
    _add_adaptation_arguments(p)


def _add_adaptation_arguments(p: argparse.ArgumentParser) -> None:
    """Options for adapting a net to real micrographs: start weights, augmentation, train-only extra images."""
    g = p.add_argument_group("adapting to real micrographs")
    g.add_argument("--init", metavar="PROFILE", default=None,
                   help="start from this profile's weights (installed name, directory or .safetensors; same --arch "
                   "and --widths) instead of random ones")
    g.add_argument("--scale-jitter", type=float, default=0.0, metavar="J",
                   help="rotate augmentation also rescales crops by a factor in [1/(1+J), 1+J] (default: %(default)s)")
    g.add_argument("--intensity-augment", action="store_true",
                   help="photometric randomisation of every crop: gamma, gradient, blur, noise, clipping")
    g.add_argument("--extra-images", type=Path, metavar="DIR", default=None,
                   help="train-only labelled images (e.g. `latticewatch simulate` output) mixed into the training "
                   "crops; never used for validation or testing")
    g.add_argument("--extra-labels", type=Path, metavar="DIR", default=None, help="masks of --extra-images")
    g.add_argument("--extra-synthetic", type=int, default=0, metavar="N",
                   help="also mix N train-only analytic frames (256², at the model pixel size) into the training "
                   "crops (default: %(default)s)")
    g.add_argument("--extra-fraction", type=float, default=0.5, metavar="F",
                   help="share of training crops drawn from the extra images (default: %(default)s)")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``train``, ``train-classifier`` and ``cross-validate`` to the top-level command parser."""
    p = sub.add_parser("train", help="train a profile: on labelled images (--images/--labels) or on synthetic frames",
                       description=_TRAIN_HELP)
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="profile directory to write")
    p.add_argument("--name", default="nanoparticles", help="profile name (default: %(default)s)")
    g = p.add_argument_group("labelled data")
    g.add_argument("--images", type=Path, metavar="DIR", help="training images")
    g.add_argument("--labels", type=Path, metavar="DIR", help="masks with the same file stems")
    g.add_argument("--val-images", type=Path, metavar="DIR",
                   help="separate validation images (instead of --val-fraction)")
    g.add_argument("--val-labels", type=Path, metavar="DIR", help="masks of --val-images")
    g.add_argument("--foreground", default="particle", help="what the foreground class is (default: %(default)s)")
    g.add_argument("--description", default="", help="profile description for the manifest (default: none)")
    g.add_argument("--isolation", type=json_object, metavar="JSON",
                   help='isolation rules for the manifest, e.g. \'{"min_area_nm2": 0.5}\' '
                   "(default: the built-in rules)")
    g.add_argument("--low-value-class", type=int, choices=(0, 1), default=None,
                   help="class-mask value the archive may reduce (default: 0, the background)")
    g.add_argument("--cross-validation", type=Path, nargs="+", default=[], metavar="CV.json",
                   help="record these cross-validate results in the manifest (this architecture's, and variants "
                   "compared)")
    g.add_argument("--resume", action="store_true",
                   help="continue from DIR/checkpoint.safetensors of an interrupted run")
    g = p.add_argument_group("synthetic data")
    g.add_argument("--synthetic", type=int, default=None, metavar="N",
                   help="training frames to generate (default: 300)")
    g.add_argument("--regions-per-class", type=int, default=300,
                   help="forest training regions per class (default: %(default)s)")
    add_training_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("train-classifier", help="train the 5-class stacking-fault classifier (forest or CNN) of a "
                       "profile", description=_CLASSIFIER_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, metavar="PROFILE_DIR", help="profile directory to update")
    p.add_argument("--kind", choices=("forest", "cnn"), default="forest", help="classifier (default: %(default)s)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--crops", type=Path, metavar="INDEX_CSV", help="crops index, e.g. sim/crops/index.csv")
    source.add_argument("--synthetic", type=int, metavar="N_PER_CLASS",
                        help="generate N analytic regions per class instead")
    p.add_argument("--test-fraction", type=float, default=0.2,
                   help="share of source images held out for testing (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the split, the forest or CNN and synthetic regions (default: %(default)s)")
    _add_cnn_arguments(p)
    p.set_defaults(func=train_classifier_command)

    p = sub.add_parser("cross-validate", description=_CROSS_VALIDATE_HELP,
                       help="k-fold cross-validation of a segmentation net (and baselines) on labelled images")
    p.add_argument("--images", type=Path, required=True, metavar="DIR", help="images (MRC, TIFF, PNG, DM, SER, EMD)")
    p.add_argument("--labels", type=Path, required=True, metavar="DIR",
                   help="masks with the same stems (non-zero = foreground)")
    p.add_argument("--folds", type=int, default=5, help="number of folds (default: %(default)s)")
    p.add_argument("--fold-seed", type=int, default=0, help="seed dealing series to folds (default: %(default)s)")
    add_baselines(p, (), "classical baselines fitted on each training split")
    p.add_argument("--json", type=Path, metavar="OUT.json", help="write all results here (updated after every fold)")
    p.add_argument("--resume", action="store_true", help="reuse the finished folds of a matching earlier run in --json")
    add_training_arguments(p)
    p.set_defaults(func=cmd_cross_validate)


def _add_cnn_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("--kind cnn")
    g.add_argument("--steps", type=int, default=3000, help="optimiser steps (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=32, help="crops per step (default: %(default)s)")
    g.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate, one-cycle (default: %(default)s)")
    g.add_argument("--crop-size", type=int, default=96, metavar="PX",
                   help="window side at the profile's pixel size (default: %(default)s)")
    g.add_argument("--shift", type=int, default=6, metavar="PX",
                   help="largest random shift of the window in training (default: %(default)s)")
    g.add_argument("--noise-crops", type=int, default=0, metavar="N",
                   help="add N lattice-free noise crops (white, smoothed, low-count, gradients, flat) of class "
                   "empty to the training images, so that blobs of noise are not called particles (default: 0)")
    g.add_argument("--val-fraction", type=float, default=0.15,
                   help="share of source images for validation (default: %(default)s)")
    g.add_argument("--eval-every", type=int, default=200,
                   help="steps between validations; the best is kept (default: %(default)s)")
    g.add_argument("--target-accuracy", type=float, default=0.92,
                   help="SF-vs-no-SF balanced accuracy the uncertain threshold aims at (default: %(default)s)")
    g.add_argument("--min-coverage", type=float, default=0.6,
                   help="least share of SF/no-SF particles the threshold may leave labelled (default: %(default)s)")
    g.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads (default: all cores)")


def training_config(args: argparse.Namespace, *, augment: str):
    """`UNetTrainingConfig` from parsed options; a missing torch is a `ConfigError` naming the extra."""
    from latticewatch.models.architectures import check

    augment = args.augment or augment
    _check_adaptation_options(args, augment)

    with needs_extra("training"):
        from latticewatch.training.fit.unet import UNetTrainingConfig

    widths = check(args.arch, args.widths or DEFAULT_WIDTHS[args.arch])
    return UNetTrainingConfig(
        architecture=args.arch, widths=widths, crop=args.crop, batch_size=args.batch_size, learning_rate=args.lr,
        max_steps=args.steps, eval_every=args.eval_every, patience=args.patience, seed=args.seed, threads=args.threads,
        augment=augment, scale_jitter=args.scale_jitter, intensity_augment=args.intensity_augment,
        extra_fraction=args.extra_fraction, init=args.init,
    )


def _check_adaptation_options(args: argparse.Namespace, augment: str) -> None:
    if args.scale_jitter < 0:
        raise ConfigError(f"--scale-jitter must be 0 or more, got {args.scale_jitter}")
    if args.scale_jitter > 0 and augment != "rotate":
        raise ConfigError("--scale-jitter needs the rotate augmentation (--augment rotate)")
    if not 0 <= args.extra_fraction <= 1:
        raise ConfigError(f"--extra-fraction must lie between 0 and 1, got {args.extra_fraction}")
    if args.extra_synthetic < 0:
        raise ConfigError(f"--extra-synthetic must be 0 or more, got {args.extra_synthetic}")
    if (args.extra_images is None) != (args.extra_labels is None):
        raise ConfigError("give both --extra-images and --extra-labels")


def extra_data(args: argparse.Namespace) -> ExtraData | None:
    """The train-only `ExtraData` of ``--extra-images/--extra-labels`` and ``--extra-synthetic`` (None
    when neither was given); shared by ``train --images`` and ``cross-validate``."""
    if args.extra_images is None and not args.extra_synthetic:
        return None
    from latticewatch.training.data.supervised import ExtraData

    return ExtraData(args.extra_images, args.extra_labels, args.extra_synthetic, args.seed)


def load_cross_validation(path: Path) -> dict:
    """A ``cross-validate --json`` result, for recording in a trained profile's manifest."""
    result = json.loads(Path(path).read_text())
    if "model" not in result or "pooled" not in result["model"]:
        raise InputError(f"{path}: not a finished cross-validate result (no pooled model metrics)")
    return result


def _check_train_options(args: argparse.Namespace) -> None:
    if args.images is None and (args.labels or args.val_images or args.val_labels):
        raise ConfigError("--labels/--val-images/--val-labels need --images")
    if args.images is not None and (args.labels is None or args.synthetic is not None):
        raise ConfigError("--images needs --labels and excludes --synthetic")
    if (args.val_images is None) != (args.val_labels is None):
        raise ConfigError("give both --val-images and --val-labels")
    if args.images is None and (args.pixel_size_nm == "none" or (args.normalisation or "max") != "max"):
        raise ConfigError("--synthetic profiles use max normalisation at a known pixel size")
    if args.images is None and (args.extra_images is not None or args.extra_synthetic):
        raise ConfigError("--extra-images/--extra-synthetic need --images (the synthetic profile is all analytic)")


def cmd_train(args: argparse.Namespace) -> int:
    _check_train_options(args)
    config = training_config(args, augment="dihedral" if args.images is None else "rotate")
    from latticewatch.training.fit.profile import build_labelled_profile, build_synthetic_profile

    if args.images is None:
        manifest = build_synthetic_profile(
            args.out, name=args.name, n_frames=args.synthetic or 300, n_regions_per_class=args.regions_per_class,
            pixel_size_nm=args.pixel_size_nm or 0.05, config=config, progress=progress_enabled(),
            command=command_line(args),
        )
        seg, clf = manifest.training["segmentation"].metrics, manifest.training["classifier"].metrics
        print(f"profile {manifest.name} written to {args.out}: validation Dice {seg['val_dice']:.3f}, "
              f"forest balanced accuracy {clf['balanced_accuracy']:.3f}")
        return EXIT_OK
    manifest = build_labelled_profile(
        args.out, name=args.name, images_dir=args.images, labels_dir=args.labels, config=config,
        normalisation=args.normalisation or "max", pixel_size_nm=args.pixel_size_nm, command=command_line(args),
        val_fraction=args.val_fraction, val_dirs=(args.val_images, args.val_labels) if args.val_images else None,
        foreground=args.foreground, description=args.description, isolation=args.isolation,
        archive=None if args.low_value_class is None else {"low_value_class": args.low_value_class},
        cross_validation=[load_cross_validation(path) for path in args.cross_validation], resume=args.resume,
        progress=progress_enabled(), extra=extra_data(args),
    )
    metrics = manifest.training["segmentation"].metrics
    scores = metrics.get("validation")
    if scores:
        summary = (f"validation Dice {scores['dice']:.3f}, Jaccard {scores['jaccard']:.3f} "
                   f"on {scores['n_images']} images")
    else:
        summary = f"{metrics['steps']} steps on all {metrics['n_train_images']} images, no validation split"
    print(f"profile {manifest.name} ({config.architecture}) written to {args.out}: {summary}")
    return EXIT_OK


def cmd_cross_validate(args: argparse.Namespace) -> int:
    from latticewatch.training.data.labelled import load_labelled

    config = training_config(args, augment="rotate")
    from latticewatch.training.assess.cross_validation import cross_validate, format_table

    result = cross_validate(
        load_labelled(args.images, args.labels), config, folds=args.folds, fold_seed=args.fold_seed,
        normalisation=args.normalisation or "max", pixel_size_nm=args.pixel_size_nm, val_fraction=args.val_fraction,
        baselines=baseline_names(args.baselines), out_json=args.json, resume=args.resume, command=command_line(args),
        progress=progress_enabled(), report=lambda line: print(line, file=sys.stderr, flush=True),
        extra=extra_data(args), dataset=args.images.parent,
    )
    print(format_table(result))
    if args.json:
        print(f"results in {args.json}")
    return EXIT_OK


def train_classifier_command(args: argparse.Namespace) -> int:
    from latticewatch.models.manifest import read_manifest

    if not 0 < args.test_fraction < 1:
        raise ConfigError(f"--test-fraction must lie between 0 and 1, got {args.test_fraction}")
    if args.synthetic is not None and args.synthetic < 2:
        raise ConfigError(f"--synthetic needs at least 2 regions per class, got {args.synthetic}")
    if args.kind == "cnn":
        return _train_cnn_command(args)
    from latticewatch.training.fit.classifier import features_from_index, synthetic_features, train_classifier

    manifest = read_manifest(args.out)
    if args.crops is not None:
        features = features_from_index(args.crops, manifest, progress=progress_enabled())
    else:
        features = synthetic_features(args.synthetic, args.seed, manifest, progress=progress_enabled())
    for reason in features.skipped:
        print(f"skipped: {reason}", file=sys.stderr)
    try:
        result = train_classifier(args.out, features, test_fraction=args.test_fraction, seed=args.seed,
                                  command=command_line(args))
    except ValueError as err:  # the training data cannot be split (e.g. all crops from one image)
        raise InputError(str(err)) from err
    m = result.metrics
    print(f"{m['n_train']} training regions from {m['n_images_train']} image(s), {m['n_test']} test regions from "
          f"{m['n_images_test']} other image(s)")
    print_confusion(m["classes"], m["classes"], m["confusion_matrix"])
    print(f"balanced accuracy on the held-out images: {m['balanced_accuracy']:.3f}")
    print(f"forest written to {args.out / result.manifest.classifier.skops}; manifest updated")
    return EXIT_OK


def _train_cnn_command(args: argparse.Namespace) -> int:
    from latticewatch.models.manifest import read_manifest
    from latticewatch.stages.crops import CropSpec

    if not 0 < args.val_fraction < 1 - args.test_fraction:
        raise ConfigError(f"--val-fraction must lie between 0 and 1 - --test-fraction, got {args.val_fraction}")
    if args.steps < 1 or args.batch_size < 1 or args.eval_every < 1:
        raise ConfigError("--steps, --batch-size and --eval-every must be positive")
    if args.crop_size < 16 or args.shift < 0:
        raise ConfigError(f"--crop-size must be ≥ 16 and --shift ≥ 0, got {args.crop_size} and {args.shift}")
    with needs_extra("train-classifier --kind cnn"):
        from latticewatch.training.fit.cnn_classifier import (
            CnnTrainingConfig,
            crops_from_index,
            synthetic_crops,
            train_cnn_classifier,
        )
    config = CnnTrainingConfig(
        spec=CropSpec(size_px=args.crop_size), steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr,
        eval_every=args.eval_every, shift_px=args.shift, val_fraction=args.val_fraction,
        test_fraction=args.test_fraction, target_accuracy=args.target_accuracy, min_coverage=args.min_coverage,
        seed=args.seed, threads=args.threads, noise_crops=args.noise_crops,
    )
    manifest = read_manifest(args.out)
    if args.crops is not None:
        crops = crops_from_index(args.crops, manifest, progress=progress_enabled())
    else:
        crops = synthetic_crops(args.synthetic, args.seed, manifest)
    for reason in crops.skipped:
        print(f"skipped: {reason}", file=sys.stderr)
    result = train_cnn_classifier(args.out, crops, config, command=command_line(args), progress=progress_enabled())
    _print_cnn_report(result.metrics)
    print(f"CNN written to {args.out / 'cnn.onnx'}; manifest updated (classifier kind cnn)")
    return EXIT_OK


def _print_cnn_report(m: dict) -> None:
    from latticewatch.training.assess.classifier_metrics import format_table
    from latticewatch.training.assess.defect_series import format_series_table

    def number(value: float | None) -> str:
        return "–" if value is None else f"{value:.3f}"

    test = m["test"]
    print(f"{m['n_train']} training crops from {m['n_images_train']} image(s), {m['n_validation']} validation from "
          f"{m['n_images_validation']}, {m['n_test']} test from {m['n_images_test']}; best step {m['best_step']}")
    print(f"uncertain below {test['uncertain_below']} ({m['uncertain_below_rule']})")
    print_confusion(list(CLASSES), test["confusion_columns"], test["confusion_matrix"])
    print(f"test: balanced accuracy {number(test['balanced_accuracy'])} on the {number(test['coverage'])} labelled "
          f"(all, no abstaining: {number(test['balanced_accuracy_all'])}); SF vs no SF "
          f"{number(test['sf_vs_nosf_balanced_accuracy'])} "
          f"(forced: {number(test['sf_vs_nosf_balanced_accuracy_forced'])})")
    for name, rows in m["tables"].items():
        if rows:
            print(format_table(rows, name))
    series = m["defect_series"]
    if "within_tolerance" in series:
        print(f"defect-fraction series of {series['frames']} frames ({series['n_series']} per row):")
        print(format_series_table(series))
