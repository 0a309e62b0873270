"""``latticewatch compile``: a profile's networks as TensorRT plans for this GPU, ahead of the daemon.

:func:`register` adds the command to the main parser.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from latticewatch.cli.common import EXIT_OK, add_profile, needs_extra, positive_int
from latticewatch.errors import ModelError

_HELP = """\
Build TensorRT plans of a profile's networks (the segmentation net, and the CNN classifier when the
profile has one) for the GPU of this machine, and keep them in the plan cache, where the daemon's
TensorRT backend finds them (it would otherwise build them on first use, taking minutes).

fp16 plans (the default) are built from a float16 copy of each ONNX file, written into the cache
(never into the installed profile) and checked first against the float32 network with ONNX Runtime
on a simulated frame (no probability may move by more than 0.02). A plan is specific to the
TensorRT version, the GPU model and compute capability, the shapes and the precision; its key
holds all of them and the ONNX file's sha256.

--version-compatible plans also run on later TensorRT releases of the same major version,
including the lean runtime alone (pip install tensorrt-lean-cu13), which can run plans but not
build them: compile on a machine with the TensorRT builder (pip install tensorrt-cu13) and the
same GPU model, then copy the cache directory.

--int8 adds an INT8 plan of the segmentation net, quantised explicitly (Q/DQ nodes inserted by
NVIDIA Model Optimizer, pip install 'nvidia-modelopt[onnx]', optional) with the activation ranges
of --calibration, a set written by `latticewatch calibrate int8-set` for this profile. The
TensorRT backend then prefers it over fp16.

Plan cache: --cache, else $LATTICEWATCH_PLAN_CACHE, else $XDG_CACHE_HOME/latticewatch/plans,
else ~/.cache/latticewatch/plans.

Exit codes: 0 plans built; 2 an error (named on stderr); 3 the TensorRT builder is not available
here: the fp16 ONNX files were written and checked, no plan was built.
"""


def shapes_option(text: str) -> tuple[int, ...]:
    """``MIN:MAX`` or ``MIN:OPT:MAX`` frame sides in pixels at the model's sampling (``--shapes``).

    >>> shapes_option("512:4096"), shapes_option("256:1024:4096")
    ((512, 4096), (256, 1024, 4096))
    """
    parts = text.split(":")
    try:
        sides = tuple(int(p) for p in parts)
    except ValueError:
        sides = ()
    if len(sides) not in (2, 3) or min(sides) < 1 or list(sides) != sorted(sides):
        raise argparse.ArgumentTypeError(f"expected MIN:MAX or MIN:OPT:MAX frame sides in pixels, ascending, "
                                         f"got {text!r}")
    return sides


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compile", help="build TensorRT plans of a profile's networks for this GPU",
                       description=_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_profile(p)
    p.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=True,
                   help="half-precision plans from a float16 copy of the ONNX (--no-fp16: float32) (default: fp16)")
    p.add_argument("--shapes", type=shapes_option, default=(64, 1024, 4096), metavar="MIN:MAX",
                   help="frame sides the segmentation plan accepts, at the model's sampling; MIN:OPT:MAX also "
                   "names the side it is tuned for (default: 64:1024:4096)")
    p.add_argument("--max-batch", type=positive_int, default=4, metavar="N",
                   help="most frames segmented in one call ([runtime] max_batch) (default: %(default)s)")
    p.add_argument("--version-compatible", action="store_true",
                   help="plans that later TensorRT releases of this major version (and the lean runtime) can run")
    p.add_argument("--exclude-lean-runtime", action="store_true",
                   help="with --version-compatible: leave TensorRT's lean runtime out of the plan (smaller; the "
                   "machine that runs it needs the lean runtime of the building version)")
    p.add_argument("--int8", action="store_true",
                   help="also an INT8 plan of the segmentation net (needs --calibration)")
    p.add_argument("--calibration", type=Path, default=None, metavar="FILE.npz",
                   help="the set of `latticewatch calibrate int8-set` for --int8")
    p.add_argument("--cache", type=Path, default=None, metavar="DIR",
                   help="plan cache (default: $LATTICEWATCH_PLAN_CACHE, else ~/.cache/latticewatch/plans)")
    p.set_defaults(func=cmd_compile)


def _check_fp16(fp32: Path, fp16: Path, role: str, manifest) -> str:
    """fp16 vs fp32 on ONNX Runtime, on a simulated frame prepared like the analyser's (segmentation) or on
    the crops of its particles (classifier); raises `ModelError` when a probability moves by more than
    `FP16_TOLERANCE` allows. Mask agreement is reported, not checked: a simulated nanoparticle frame is
    outside the graphene net's domain, and its many near-threshold pixels flip on rounding alone (the mask
    tolerance is tested on real frames, ``tests/models/test_precision.py``)."""
    from latticewatch.models.backends.onnxruntime import OnnxRuntimeBackend
    from latticewatch.models.precision import FP16_TOLERANCE, agreement
    from latticewatch.stages.crops import classifier_input
    from latticewatch.stages.preprocess import preprocess
    from latticewatch.testing.synthetic.frames import generate_frame

    seg = manifest.segmentation
    px = seg.pixel_size_nm or 0.05
    frame = generate_frame(np.random.default_rng(0), shape=(512, 512), pixel_size_nm=px)
    image = preprocess(frame.image, px, normalisation=seg.normalisation, model_pixel_size_nm=px).image
    if role == "segmentation":
        batch, what = image[None, None], "a simulated 512² frame"
    else:
        regions = [frame.instances == k for k in np.unique(frame.instances) if k]
        batch = np.stack([classifier_input(image, r, tuple(np.argwhere(r).mean(axis=0)), manifest.classifier.input)
                          for r in regions])
        what = f"the {len(regions)} particle crops of a simulated frame"
    reference = OnnxRuntimeBackend(fp32).predict(batch)
    candidate = OnnxRuntimeBackend(fp16).predict(batch)
    if role == "segmentation":
        result = agreement(reference, candidate, seg.threshold)
    else:
        same = reference.argmax(1) == candidate.argmax(1)
        result = f"max |Δp| {np.abs(reference - candidate).max():.2e}, {int(same.sum())}/{len(same)} labels equal"
    if np.abs(reference - candidate).max() > FP16_TOLERANCE.max_abs_diff:
        raise ModelError(f"{fp16}: the float16 copy differs from {fp32.name} beyond tolerance on {what}: {result}")
    return f"{result} on {what}"


def cmd_compile(args: argparse.Namespace) -> int:
    from latticewatch.models.backends import model_files
    from latticewatch.models.backends.plans import PlanCache, Shapes, default_plan_cache, default_shapes
    from latticewatch.models.backends.tensorrt import EXIT_NO_BUILDER, builder_unavailable, compile_plan
    from latticewatch.models.manifest import sha256_of
    from latticewatch.runtime.plugins import resolve_profile

    if args.int8 and args.calibration is None:
        raise ModelError("--int8 needs --calibration FILE.npz (made by `latticewatch calibrate int8-set`)")
    if args.exclude_lean_runtime and not args.version_compatible:
        raise ModelError("--exclude-lean-runtime only applies with --version-compatible")
    directory, manifest = resolve_profile(args.profile)
    cache = PlanCache(args.cache or default_plan_cache())
    roles = ["segmentation"] + (["classifier"] if manifest.classifier and manifest.classifier.kind == "cnn" else [])
    nets = [model_files(directory, manifest, role) for role in roles]
    low, *opt, high = args.shapes
    seg_shapes = Shapes(min_side=low, opt_side=opt[0] if opt else min(max(1024, low), high), max_side=high,
                        max_batch=args.max_batch)
    int8_onnx = calibration_sha = None
    with needs_extra("latticewatch compile", extra="train", package="onnx"):
        from latticewatch.models.precision import quantize_int8, write_fp16

        if args.int8:  # first: it fails fastest (Model Optimizer missing, a set made for another model)
            int8_onnx = cache.onnx_path(nets[0].onnx, sha256_of(nets[0].onnx), "int8")
            calibration_sha = quantize_int8(nets[0].onnx, args.calibration, int8_onnx)
            print(f"INT8 Q/DQ ONNX of {nets[0].onnx.name}: {int8_onnx} (calibrated on {args.calibration})")
        if args.fp16:
            for net in nets:
                half = write_fp16(net.onnx, cache.onnx_path(net.onnx, sha256_of(net.onnx), "fp16"))
                check = _check_fp16(net.onnx, half, net.role, manifest)
                print(f"fp16 ONNX of {net.onnx.name}: {half} ({check})")
    reason = builder_unavailable()
    if reason:
        print(f"TensorRT builder not available here ({reason}); no plan built. The fp16 ONNX files are in "
              f"{cache.root / 'onnx'}. Build the plans on a machine with the TensorRT builder and this GPU model: "
              f"latticewatch compile --profile {args.profile} --cache DIR", file=sys.stderr)
        return EXIT_NO_BUILDER
    options = {"version_compatible": args.version_compatible, "exclude_lean_runtime": args.exclude_lean_runtime}
    builds = [(net, "fp16" if args.fp16 else "fp32", None) for net in nets]
    if args.int8:
        builds.append((nets[0], "int8", int8_onnx))
    for net, precision, quantised in builds:
        shapes = seg_shapes if net.role == "segmentation" else default_shapes(net.role)
        start = time.perf_counter()
        entry = compile_plan(net, cache, precision=precision, shapes=shapes, int8_onnx=quantised,
                             calibration_sha256=calibration_sha if precision == "int8" else None, **options)
        print(f"{precision} plan of {net.onnx.name} for {entry.key.gpu} (sm {entry.key.compute_capability}, TensorRT "
              f"{entry.key.tensorrt}, shapes {entry.key.shapes}): {entry.path} ({entry.sidecar['plan_bytes']} bytes, "
              f"{time.perf_counter() - start:.1f} s)")
    return EXIT_OK
