"""``latticewatch models list | import-keras | flatten-forest``: the installed profiles, published weights turned
into one, and an older profile's skops forest flattened for fast loading."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from latticewatch.cli.common import EXIT_OK, command_line, needs_extra


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``models`` and its actions to the top-level command parser."""
    p = sub.add_parser("models", help="list installed profiles, import Keras weights, flatten a forest",
                       description="Model profiles (plugins): list the installed ones, import published weights, "
                       "or flatten an older profile's forest.")
    models_sub = p.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    q = models_sub.add_parser(
        "list", help="installed profiles, verified, with the reason a broken one is unusable",
        description="List every installed profile (entry point latticewatch.profiles) with its version, pixel size and "
        "normalisation, after checking its files against the manifest's sha256; a broken one says why. Then the "
        "inference backends (--backend): which can run here, and why the others cannot.",
    )
    q.add_argument("--json", action="store_true", help="print the listing as JSON")
    q.set_defaults(func=cmd_models_list)
    q = models_sub.add_parser(
        "import-keras",
        help="turn published pyNanoFind Keras weights (.h5) into a profile",
        description="Convert the pyNanoFind U-Net weights (Keras 2.2 HDF5) into a latticewatch profile directory "
        "(ONNX + safetensors + manifest; segmentation only, max normalisation, pixel size unset). Needs the [train] "
        "extra (torch).",
    )
    q.add_argument("file", type=Path, metavar="FILE.h5", help="the Keras weights file")
    q.add_argument("--name", required=True, help="profile name")
    q.add_argument("--out", type=Path, metavar="DIR", help="profile directory (default: profiles/NAME)")
    q.set_defaults(func=cmd_models_import_keras)
    q = models_sub.add_parser(
        "flatten-forest",
        help="add the flattened forest (forest.safetensors) to a profile that has only its skops file",
        description="Write the profile's skops random forest as flattened arrays (safetensors), which the analyser "
        "loads without scikit-learn in milliseconds; checked to give scikit-learn's probabilities bit for bit. The "
        "manifest gains classifier.arrays and its sha256; nothing else changes. For profiles written before the "
        "arrays existed.",
    )
    q.add_argument("profile_dir", type=Path, metavar="PROFILE_DIR", help="the profile directory (changed in place)")
    q.set_defaults(func=cmd_models_flatten_forest)


def cmd_models_list(args: argparse.Namespace) -> int:
    from latticewatch.runtime.plugins import discover_profiles

    profiles = discover_profiles(verify=True)
    if args.json:
        json.dump({name: {"directory": str(e.directory) if e.directory else None,
                          "version": e.manifest.version if e.manifest else None, "error": e.error}
                   for name, e in profiles.items()}, sys.stdout, indent=2)
        print()
        return EXIT_OK
    for name, entry in sorted(profiles.items()):
        if entry.manifest:
            seg = entry.manifest.segmentation
            print(f"{name:16s} {entry.manifest.version:8s} ok      {seg.pixel_size_nm} nm/px, "
                  f"{seg.normalisation} normalisation — {entry.directory}")
        else:
            print(f"{name:16s} {'?':8s} BROKEN  {entry.error}")
    _print_backends()
    return EXIT_OK


def _print_backends() -> None:
    """Which inference backends can run here (``--backend``), and why the others cannot."""
    from latticewatch.models.backends import BACKEND_CHOICES, resolve, unavailable

    print(f"\nbackends (--backend; auto here: {resolve('auto')})")
    for kind in BACKEND_CHOICES[1:]:
        reason = unavailable(kind)
        print(f"{kind:16s} {'ok' if reason is None else 'no':8s} {reason or ''}".rstrip())


def cmd_models_import_keras(args: argparse.Namespace) -> int:
    with needs_extra("models import-keras"):
        import torch  # noqa: F401  (asked for first: the ONNX export needs it, after reading the whole file)

        from latticewatch.models.keras_import import import_keras_profile
    out = args.out or Path("profiles") / args.name
    import_keras_profile(args.file, out, name=args.name, command=command_line(args))
    print(f"profile {args.name} written to {out}; use it with --profile {out}")
    return EXIT_OK


def cmd_models_flatten_forest(args: argparse.Namespace) -> int:
    from latticewatch.training.fit.classifier import write_forest_arrays

    clf = write_forest_arrays(args.profile_dir).classifier
    print(f"{args.profile_dir / clf.arrays} written from {clf.skops}; the manifest names it")
    return EXIT_OK
