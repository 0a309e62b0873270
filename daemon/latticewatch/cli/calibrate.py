"""Command-line side of calibration: ``latticewatch calibrate threshold | baselines | pixel-size | int8-set | domain``.

:func:`register` adds the command and its actions to the main parser.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from latticewatch.cli.common import (
    BASELINE_NAMES,
    EXIT_OK,
    add_baselines,
    add_profile,
    add_threads,
    baseline_names,
    command_line,
    positive_float,
    progress_enabled,
)
from latticewatch.errors import ConfigError

_HELP = """\
Calibrate a profile against labelled data, or an instrument against a known crystal.

  threshold   decision threshold on the particle probability that maximises Dice on a
              labelled set; written into the profile's manifest.json
  baselines   fit the Otsu / Fourier / Bragg baselines on a labelled set and store their
              parameters in the manifest, for `latticewatch evaluate`
  pixel-size  nm per pixel at one magnification from the lattice fringes of a known crystal
              (Au, Ag, Pd, Pt, Cu, Si, CdSe, graphene), into an instrument calibration TOML
  int8-set    representative model-ready frames for calibrating an INT8 TensorRT engine
  domain      the input statistics of the profile's training frames, the reference its
              out-of-domain check compares every frame with; written into manifest.json
"""

_THRESHOLD_HELP = """\
Run the profile's network on labelled images exactly as `process` does, and choose the
threshold on the particle probability (0.05–0.95 in steps of 0.01) that maximises the Dice
coefficient pooled over all pixels. Writes segmentation.threshold and isolation.threshold of
the profile's manifest.json (atomically; model files are not touched, so the profile still
verifies). Prints old → new threshold and the Dice before and after. Use a validation set,
not the network's training set.
"""

_BASELINES_HELP = """\
Fit the classical baselines (Otsu threshold; Fourier annulus filter, Groschner et al. 2021;
Bragg filter, Sadre et al. 2021) on labelled images, at the model's pixel size and
normalisation, and store their parameters in the profile's manifest.json. `latticewatch
evaluate` then uses these instead of fitting on the evaluation set.
"""

_PIXEL_HELP = """\
Measure the pixel size of a camera at one magnification from an HRTEM image of a known
crystal. The lattice-fringe frequency is taken from the image's power spectrum (reflections
refined to sub-pixel; a ring profile for many randomly oriented crystals), and
nm/pixel = d-spacing × fringe frequency. d-spacings come from a table (Au, Ag, Pd, Pt, Cu:
fcc; Si: diamond; CdSe: wurtzite; graphene) for the given reflection, or from --lattice-nm.

The step is added to the calibration TOML (or replaces the step at the same magnification);
the file is created when missing (then --instrument is needed). Prints the measured fringe
period, the pixel size, and the pixel size in the image header if it has one.
Use with `latticewatch process --calibration FILE`.
"""

_INT8_HELP = """\
Choose N representative tiles from a folder of micrographs for INT8 calibration of a future
TensorRT engine. Frames are prepared exactly as the analyser prepares them (resampled to the
model's pixel size, median filtered, normalised), cut into TILE×TILE tiles, described by their
mean, standard deviation and particle coverage, and picked by farthest-point sampling so the
set covers empty carbon, dense particles and everything between. Saved with numpy.savez (no
pickled objects) together with the ONNX file's sha256 from the manifest.
"""

_DOMAIN_HELP = """\
Describe the frames the profile was trained on, prepared exactly as the analyser prepares
them, by a 15-number descriptor of the model input (shape of the radially averaged power
spectrum in 12 bins, spread of the local variance, spectral peak height), and store their
mean and covariance as the manifest's domain.reference. The limit is --margin times the
largest leave-one-out distance among those frames. The analyser then flags a frame whose
input is farther than the limit: "input statistics unlike training: distance X (limit Y)".
Give every folder the profile trained on (and --synthetic N for `train --extra-synthetic N`).
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``calibrate`` with its four actions to the ``latticewatch`` command.

    Examples
    --------
    >>> parser = argparse.ArgumentParser(prog="latticewatch")
    >>> register(parser.add_subparsers(dest="command"))
    >>> parser.parse_args(["calibrate", "threshold", "--images", "i", "--labels", "l"]).func.__name__
    'threshold_command'
    """
    fmt = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser("calibrate",
                              help="tune a profile's threshold/baselines; pixel size from lattice fringes; INT8 set",
                              description=_HELP, formatter_class=fmt)
    sub = p.add_subparsers(dest="calibrate_command", metavar="ACTION", required=True)

    q = sub.add_parser("threshold", help="Dice-optimal decision threshold into the manifest",
                       description=_THRESHOLD_HELP, formatter_class=fmt)
    add_profile(q)
    q.add_argument("--images", type=Path, required=True, metavar="DIR", help="labelled micrographs (validation set)")
    q.add_argument("--labels", type=Path, required=True, metavar="DIR", help="masks, same file stems as the images")
    q.add_argument("--dry-run", action="store_true", help="print the result, do not write the manifest")
    add_threads(q)
    q.set_defaults(func=threshold_command)

    q = sub.add_parser("baselines", help="fit Otsu/Fourier/Bragg baselines, store them in the manifest",
                       description=_BASELINES_HELP, formatter_class=fmt)
    add_profile(q)
    q.add_argument("--images", type=Path, required=True, metavar="DIR", help="labelled micrographs")
    q.add_argument("--labels", type=Path, required=True, metavar="DIR", help="masks, same file stems as the images")
    add_baselines(q, BASELINE_NAMES, "baselines to fit")
    q.add_argument("--dry-run", action="store_true", help="print the parameters, do not write the manifest")
    q.set_defaults(func=baselines_command)

    q = sub.add_parser("pixel-size", help="nm/pixel at a magnification from a known crystal's fringes",
                       description=_PIXEL_HELP, formatter_class=fmt)
    q.add_argument("image", type=Path, metavar="IMAGE",
                   help="HRTEM image of the calibration crystal (first frame of a stack is used)")
    q.add_argument("--material", required=True,
                   help="crystal: Au, Ag, Pd, Pt, Cu, Si, CdSe, graphene (or a label with --lattice-nm)")
    q.add_argument("--reflection", metavar="HKL",
                   help="lattice planes whose fringes are measured, e.g. 111, 200, 002, 10-10")
    q.add_argument("--lattice-nm", type=float, metavar="D", help="the fringe spacing d in nm (overrides the table)")
    q.add_argument("--camera", required=True, help="camera name (a calibration file is for one camera)")
    q.add_argument("--magnification", type=float, required=True, metavar="M",
                   help="nominal magnification as the microscope reports it")
    q.add_argument("--voltage-kv", type=float, default=None, metavar="KV", help="accelerating voltage in kV")
    q.add_argument("--binning", type=int, default=1, help="camera binning (default: %(default)s)")
    q.add_argument("--instrument", help="microscope name (needed when the file is created)")
    q.add_argument("--near", type=float, metavar="NM_PER_PX",
                   help="expected pixel size; look only within ±25 %% of the fringe frequency it implies")
    q.add_argument("--out", type=Path, required=True, metavar="TOML",
                   help="calibration file to create or update, e.g. calibration/NAME.toml")
    q.add_argument("--dry-run", action="store_true", help="print the measurement, do not write the file")
    q.set_defaults(func=pixel_size_command)

    q = sub.add_parser("int8-set", help="representative preprocessed frames for INT8 calibration (.npz)",
                       description=_INT8_HELP, formatter_class=fmt)
    add_profile(q)
    q.add_argument("--images", type=Path, required=True, metavar="DIR",
                   help="micrographs typical of the data to be analysed")
    q.add_argument("--n", type=int, default=32, help="number of tiles to keep (default: %(default)s)")
    q.add_argument("--tile", type=int, default=512, help="tile side at the model's pixel size (default: %(default)s)")
    q.add_argument("--out", type=Path, required=True, metavar="FILE.npz",
                   help="where to write the set (.npz appended if missing)")
    add_threads(q)
    q.set_defaults(func=int8_set_command)

    q = sub.add_parser("domain", help="input statistics of the training frames, for the out-of-domain check",
                       description=_DOMAIN_HELP, formatter_class=fmt)
    add_profile(q)
    q.add_argument("--images", type=Path, nargs="+", required=True, metavar="DIR",
                   help="folders of the frames the profile was trained on")
    q.add_argument("--pixel-size-nm", type=positive_float, metavar="NM",
                   help="pixel size of frames whose files give none")
    q.add_argument("--synthetic", type=int, default=0, metavar="N",
                   help="add the N analytic frames of `train --extra-synthetic N` (default: %(default)s)")
    q.add_argument("--synthetic-seed", type=int, default=1000, metavar="S",
                   help="their seed: the training run's --seed + 1000 (default: %(default)s)")
    q.add_argument("--margin", type=float, default=2.0,
                   help="limit = margin × largest leave-one-out training distance (default: %(default)s)")
    q.add_argument("--dry-run", action="store_true", help="print the result, do not write the manifest")
    q.set_defaults(func=domain_command)


def threshold_command(args: argparse.Namespace) -> int:
    from latticewatch.training.assess.calibrate.threshold import calibrate_threshold

    r = calibrate_threshold(args.profile, args.images, args.labels, dry_run=args.dry_run, command=command_line(args),
                            threads=args.threads, progress=progress_enabled())
    print(f"{r.n_images} labelled image(s); pooled Dice at threshold {r.old:.2f}: {r.dice_before:.4f}")
    print(f"threshold {r.old:.2f} → {r.new:.2f}: Dice {r.dice_before:.4f} → {r.dice_after:.4f}")
    if r.written:
        print(f"written to {r.manifest_path} (segmentation.threshold and isolation.threshold)")
    else:
        print("dry run: manifest not changed")
    return EXIT_OK


def baselines_command(args: argparse.Namespace) -> int:
    from latticewatch.training.assess.calibrate.threshold import calibrate_baselines

    names = baseline_names(args.baselines)
    if not names:
        raise ConfigError("--baselines none: no baselines to fit")
    fitted = calibrate_baselines(args.profile, args.images, args.labels, names=names, dry_run=args.dry_run,
                                 command=command_line(args))
    for name, params in fitted.items():
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()
                          if k not in ("kind", "fitted_dice", "fitted_images"))
        print(f"{name:8s} training Dice {params['fitted_dice']:.3f}  {shown}")
    print("dry run: manifest not changed" if args.dry_run else "stored in the manifest (baselines)")
    return EXIT_OK


def pixel_size_command(args: argparse.Namespace) -> int:
    from latticewatch.training.assess.calibrate.pixel_size import calibrate_pixel_size

    r = calibrate_pixel_size(
        args.image, material=args.material, reflection=args.reflection, lattice_nm=args.lattice_nm, camera=args.camera,
        magnification=args.magnification, voltage_kv=args.voltage_kv, out=args.out, instrument=args.instrument,
        near_nm_per_px=args.near, binning=args.binning, dry_run=args.dry_run,
    )
    m = r.measurement
    how = f"{m.n_spots} reflections, spread {100 * m.spread:.2f} %" if m.method == "spots" else "ring profile"
    print(f"fringe period {m.period_px:.3f} px ({how}, contrast {m.contrast:.0f}×)")
    print(f"{args.material} ({args.reflection or '?'}) d = {r.d_nm:.5f} nm → pixel size {r.pixel_size_nm:.5f} nm/px "
          f"at {args.magnification:g}×")
    if r.header_pixel_size_nm:
        difference = 100 * (r.pixel_size_nm / r.header_pixel_size_nm - 1)
        print(f"image header says {r.header_pixel_size_nm:.5f} nm/px ({difference:+.2f} %)")
    for warning in r.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if r.replaced is not None:
        print(f"replaces {r.replaced:.5f} nm/px previously stored at this magnification")
    steps = len(r.calibration.steps)
    print("dry run: nothing written" if args.dry_run else f"written to {args.out} ({steps} magnification step(s))")
    return EXIT_OK


def int8_set_command(args: argparse.Namespace) -> int:
    from latticewatch.training.assess.calibrate.int8_set import int8_calibration_set

    if args.n < 1:
        raise ConfigError(f"--n must be at least 1, got {args.n}")
    r = int8_calibration_set(args.profile, args.images, args.out, n=args.n, tile=args.tile, threads=args.threads,
                             progress=progress_enabled())
    for failure in r.skipped:  # a sample of the data: a file it cannot use is left out, not an error
        print(f"skipped: {failure.error}", file=sys.stderr)
    print(f"{r.n_chosen} of {r.n_candidates} tiles from {r.n_frames} frame(s) written to {r.path}")
    return EXIT_OK


def _domain_command_line(args: argparse.Namespace) -> str:
    """`command_line` for several --images folders: each is recorded relative to its own data set."""
    from latticewatch.models.manifest import recorded_command, relative_path

    folders = {str(d): relative_path(d, d.parent) for d in args.images}
    argv = [folders.get(a, a) for a in getattr(args, "argv", None) or []]
    return recorded_command(argv)


def domain_command(args: argparse.Namespace) -> int:
    from latticewatch.training.assess.calibrate.domain import calibrate_domain

    if args.synthetic < 0:
        raise ConfigError(f"--synthetic must be 0 or more, got {args.synthetic}")
    r = calibrate_domain(args.profile, args.images, pixel_size_nm=args.pixel_size_nm, n_synthetic=args.synthetic,
                         synthetic_seed=args.synthetic_seed, margin=args.margin, dry_run=args.dry_run,
                         command=_domain_command_line(args), progress=progress_enabled())
    for failure in r.skipped:
        print(f"skipped: {failure.error}", file=sys.stderr)
    loo = r.loo_distances
    print(f"{r.reference.n_frames} training frame(s): distance from the reference {r.distances.min():.2f}–"
          f"{r.distances.max():.2f}, leave-one-out median {np.median(loo):.2f}, max {loo.max():.2f} "
          f"({r.names[int(loo.argmax())]})")
    print(f"limit {r.reference.limit:.2f} (margin {args.margin:g})")
    print(f"written to {r.manifest_path} (domain.reference, training.domain_reference)" if r.written
          else "dry run: manifest not changed")
    return EXIT_OK
