"""The ``latticewatch`` command line. Every command is ``main([...]) -> exit code``."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

from latticewatch import __version__

log = logging.getLogger("latticewatch.cli")

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2


def _progress_enabled() -> bool:
    return sys.stderr.isatty()


def _readable_frames(path: Path, permissive: bool, failures: list[dict]):
    """Frames of one file; a bad file or section is recorded in ``failures`` and the rest still read."""
    from latticewatch.io.readers import ReadError, read_frames

    start = 0
    while True:
        try:
            yield from read_frames(path, permissive=permissive, start=start)
            return
        except (ReadError, OSError) as err:
            section = getattr(err, "section", None)
            failures.append({"file": str(path), "frame_id": None if section is None else f"{path}#{section}", "error": str(err)})
            print(f"error: {err}", file=sys.stderr)
            if section is None:
                return
            start = section + 1  # skip the bad section of a stack, keep the others


def cmd_process(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from latticewatch.models.manifest import ManifestError
    from latticewatch.errors import FrameError
    from latticewatch.runtime.analyser import Analyser
    from latticewatch.sinks.reports import summary, write_reports

    from latticewatch.calibration import CalibrationError, apply_calibration, load_calibration

    try:
        analyser = Analyser(args.profile, threads=args.threads)
        calibration = load_calibration(args.calibration) if args.calibration else None
    except (ManifestError, CalibrationError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    archive = None
    if args.archive:
        from latticewatch.runtime.archiving import open_session_writer

        archive = open_session_writer(args.archive, "process", analyser.manifest.archive, policy=args.archive_policy,
                                      margin_nm=args.archive_margin_nm, reduce=not args.lossless)
    rows: list[dict] = []
    failures: list[dict] = []
    for path in tqdm(args.files, desc="files", unit="file", disable=not _progress_enabled() or len(args.files) < 2):
        for frame in _readable_frames(path, args.permissive, failures):
            if calibration is not None:
                frame = apply_calibration(frame, calibration, args.calibration.name)
            try:
                analysis = analyser.analyse(frame, keep_probability=args.save_probabilities)
            except FrameError as err:
                failures.append({"file": str(path), "frame_id": frame.frame_id, "error": str(err)})
                print(f"error: {err}", file=sys.stderr)
                continue
            write_reports(frame, analysis, args.out, save_probability=args.save_probabilities)
            rows.append(summary(frame, analysis))
            if archive is not None:
                _archive_frame(archive, frame, analysis, failures)
    if archive is not None:
        archive.close()
    if args.json:
        json.dump({"frames": rows, "failures": failures, "out": str(args.out)}, sys.stdout, indent=2)
        print()
    else:
        _print_table(rows, classified=analyser.manifest.classifier is not None)
        print(f"{len(rows)} frame(s) analysed, {len(failures)} failed; results in {args.out}")
    return EXIT_SOME_FAILED if failures else EXIT_OK


def _archive_frame(archive, frame, analysis, failures: list[dict]) -> None:
    from latticewatch.sinks.archive import ArchiveUnavailable

    try:
        archive.write(frame, analysis, {"written_by": "latticewatch process"})
    except ArchiveUnavailable as err:
        # reports are written; only the archive copy is missing, and the source file is untouched
        failures.append({"file": frame.origin, "frame_id": frame.frame_id, "error": f"not archived: {err}"})
        print(f"error: {frame.frame_id}: not archived: {err}", file=sys.stderr)


def _print_table(rows: list[dict], *, classified: bool = True) -> None:
    """The run summary; a profile without a classifier (e.g. graphene) gets regions and content ratio
    instead of the five class columns, which would all read 0."""
    if not rows:
        return
    if classified:
        head = ["frame", "px (nm)", "particles", "cover", "SF", "noSF", "mis", "aggl", "empty", "defect frac", "ms"]
    else:
        head = ["frame", "px (nm)", "regions", "cover", "content ratio", "ms"]
    table = [head]
    for r in rows:
        start = [r["name"], f"{r['pixel_size_nm']:.4f}" if r["pixel_size_nm"] else "?", str(r["particles"]), f"{r['coverage']:.1%}"]
        if classified:
            c = r["class_counts"]
            middle = [str(c["stacking_fault"]), str(c["no_stacking_fault"]), str(c["misoriented"]), str(c["agglomeration"]), str(c["empty"]),
                      "–" if r["defect_fraction"] is None else f"{r['defect_fraction']:.2f}"]
        else:
            middle = [f"{r['content_ratio']:.1%}"]
        table.append(start + middle + [f"{1000 * r['seconds']:.0f}"])
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        print("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))))


def cmd_train(args: argparse.Namespace) -> int:
    from latticewatch.cli import train as train_cli

    if args.images is None and (args.labels or args.val_images or args.val_labels):
        print("error: --labels/--val-images/--val-labels need --images", file=sys.stderr)
        return EXIT_USAGE
    if args.images is not None and (args.labels is None or args.synthetic is not None):
        print("error: --images needs --labels and excludes --synthetic", file=sys.stderr)
        return EXIT_USAGE
    if (args.val_images is None) != (args.val_labels is None):
        print("error: give both --val-images and --val-labels", file=sys.stderr)
        return EXIT_USAGE
    try:
        from latticewatch.training.fit.profile import build_labelled_profile, build_synthetic_profile

        config = train_cli.training_config(args, augment="dihedral" if args.images is None else "rotate")
    except ImportError as err:
        print(f"error: {train_cli.TORCH_HINT}: {err}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as err:  # widths that do not fit the architecture
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    command = "latticewatch " + shlex.join(args.argv)
    progress = _progress_enabled()
    if args.images is None:
        if args.pixel_size_nm == "none" or (args.normalisation or "max") != "max":
            print("error: --synthetic profiles use max normalisation at a known pixel size", file=sys.stderr)
            return EXIT_USAGE
        manifest = build_synthetic_profile(
            args.out, name=args.name, n_frames=args.synthetic or 300, n_regions_per_class=args.regions_per_class,
            pixel_size_nm=args.pixel_size_nm or 0.05, config=config, progress=progress, command=command,
        )
        seg, clf = manifest.training["segmentation"].metrics, manifest.training["classifier"].metrics
        print(f"profile {manifest.name} written to {args.out}: validation Dice {seg['val_dice']:.3f}, "
              f"forest balanced accuracy {clf['balanced_accuracy']:.3f}")
        return EXIT_OK

    from latticewatch.training.data.labelled import LabelledDataError
    from latticewatch.training.fit.unet import CheckpointError

    try:
        isolation = json.loads(args.isolation) if args.isolation else None
        cvs = [train_cli.load_cross_validation(path) for path in args.cross_validation]
        manifest = build_labelled_profile(
            args.out, name=args.name, images_dir=args.images, labels_dir=args.labels, config=config,
            normalisation=args.normalisation or "max", pixel_size_nm=args.pixel_size_nm, command=command,
            val_fraction=args.val_fraction, val_dirs=(args.val_images, args.val_labels) if args.val_images else None,
            foreground=args.foreground, description=args.description, isolation=isolation,
            archive=None if args.low_value_class is None else {"low_value_class": args.low_value_class},
            cross_validation=cvs, resume=args.resume, progress=progress,
        )
    except (LabelledDataError, CheckpointError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    metrics = manifest.training["segmentation"].metrics
    scores = metrics.get("validation")
    summary_line = (f"validation Dice {scores['dice']:.3f}, Jaccard {scores['jaccard']:.3f} on {scores['n_images']} images"
                    if scores else f"{metrics['steps']} steps on all {metrics['n_train_images']} images, no validation split")
    print(f"profile {manifest.name} ({config.architecture}) written to {args.out}: {summary_line}")
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    if args.archive:
        from latticewatch.sinks.archive.bench import format_bench_table, run_archive_bench

        results = run_archive_bench(repeats=args.repeats)
        print(json.dumps(results, indent=2) if args.json else format_bench_table(results))
        return EXIT_OK
    from latticewatch.runtime.bench import format_results, run_pipeline_bench

    results = run_pipeline_bench(args.profile, sizes=args.sizes, repeats=args.repeats, naive=not args.no_naive, threads=args.threads)
    print(json.dumps(results, indent=2) if args.json else format_results(results))
    return EXIT_OK


def cmd_models_list(args: argparse.Namespace) -> int:
    from latticewatch.runtime.plugins import discover_profiles

    profiles = discover_profiles(verify=True)
    if args.json:
        json.dump({name: {"directory": str(e.directory) if e.directory else None, "version": e.manifest.version if e.manifest else None,
                          "error": e.error} for name, e in profiles.items()}, sys.stdout, indent=2)
        print()
        return EXIT_OK
    for name, entry in sorted(profiles.items()):
        if entry.manifest:
            seg = entry.manifest.segmentation
            print(f"{name:16s} {entry.manifest.version:8s} ok      {seg.pixel_size_nm} nm/px, {seg.normalisation} normalisation — {entry.directory}")
        else:
            print(f"{name:16s} {'?':8s} BROKEN  {entry.error}")
    return EXIT_OK


def cmd_models_import_keras(args: argparse.Namespace) -> int:
    try:
        from latticewatch.models.keras_import import KerasImportError, import_keras_profile
    except ImportError as err:  # torch is needed to write the ONNX file
        print(f"error: importing needs the [train] extra (torch): {err}", file=sys.stderr)
        return EXIT_USAGE
    out = args.out or Path("profiles") / args.name
    try:
        import_keras_profile(args.file, out, name=args.name, command="latticewatch " + shlex.join(args.argv))
    except (KerasImportError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    print(f"profile {args.name} written to {out}; use it with --profile {out}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="latticewatch",
        description="Live analysis of HRTEM micrographs of nanoparticles: U-Net segmentation of crystalline "
        "particles, region measurement in nm, stacking-fault classification, archive.",
    )
    parser.add_argument("--version", action="version", version=f"latticewatch {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "process",
        help="analyse micrograph files and write per-frame reports",
        description="Analyse HRTEM micrographs (MRC incl. stacks, TIFF, DM3/DM4, SER, EMD, PNG): median filter, "
        "normalise, resample to the model's pixel size, U-Net segmentation, region isolation and measurement, "
        "5-class random-forest classification. Writes DIR/<name>.json, DIR/<name>_particles.csv and "
        "DIR/<name>_overlay.png per frame. Exit code 1 if any file or frame failed (the others are still done).",
    )
    p.add_argument("files", nargs="+", type=Path, metavar="FILE", help="micrograph files")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory (created if needed)")
    p.add_argument("--profile", default="nanoparticles", help="installed profile name or profile directory (default: %(default)s)")
    p.add_argument("--save-probabilities", action="store_true", help="also write DIR/<name>_probability.npy (float32, frame size)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    p.add_argument("--permissive", action="store_true", help="warn and guess on inconsistent headers instead of failing")
    p.add_argument("--threads", type=int, default=None, help="inference threads (default: all usable cores)")
    p.add_argument("--calibration", type=Path, metavar="TOML",
                   help="instrument calibration (magnification → pixel size) for frames whose files carry no pixel size")
    p.add_argument("--archive", type=Path, metavar="ROOT", help="also archive each frame (HDF5, see README 'Archive') under ROOT")
    p.add_argument("--archive-policy", default="drop", metavar="POLICY",
                   help="low-value pixels: drop[:FILL], mean or quantize:N (default: %(default)s)")
    p.add_argument("--archive-margin-nm", type=float, default=0.5, help="exact margin around particles in nm (default: %(default)s)")
    p.add_argument("--lossless", action="store_true", help="archive every frame whole and lossless (reduce = false)")
    p.set_defaults(func=cmd_process)

    p = sub.add_parser(
        "train",
        help="train a profile: on labelled images (--images/--labels) or on synthetic frames",
        description="With --images/--labels: train a segmentation net on labelled micrographs (any readable format; "
        "masks non-zero = foreground), preprocessed exactly as the analyser will (resampling to --pixel-size-nm, "
        "3×3 median, --normalisation), with random rotations (0–360°) and flips, cross-entropy + Dice loss, Adam, "
        "early stopping on a validation split that holds out whole series; writes a segmentation-only profile. "
        "Without: generate analytic HRTEM frames and train the U-Net and the 500-tree stacking-fault forest. "
        "Either way: ONNX + safetensors (+ skops) and a manifest with the metrics and this command. "
        "Needs the [train] extra (torch).",
    )
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="profile directory to write")
    p.add_argument("--name", default="nanoparticles", help="profile name (default: %(default)s)")
    g = p.add_argument_group("labelled data")
    g.add_argument("--images", type=Path, metavar="DIR", help="training images")
    g.add_argument("--labels", type=Path, metavar="DIR", help="masks with the same file stems")
    g.add_argument("--val-images", type=Path, metavar="DIR", help="separate validation images (instead of --val-fraction)")
    g.add_argument("--val-labels", type=Path, metavar="DIR", help="masks of --val-images")
    g.add_argument("--foreground", default="particle", help="what the foreground class is (default: %(default)s)")
    g.add_argument("--description", default="", help="profile description for the manifest")
    g.add_argument("--isolation", metavar="JSON", help='isolation rules for the manifest, e.g. \'{"min_area_nm2": 0.5}\'')
    g.add_argument("--low-value-class", type=int, choices=(0, 1), default=None,
                   help="class-mask value the archive may reduce (default: 0, the background)")
    g.add_argument("--cross-validation", type=Path, nargs="+", default=[], metavar="CV.json",
                   help="record these cross-validate results in the manifest (this architecture's, and variants compared)")
    g.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.safetensors of an interrupted run")
    g = p.add_argument_group("synthetic data")
    g.add_argument("--synthetic", type=int, default=None, metavar="N", help="training frames to generate (default: 300)")
    g.add_argument("--regions-per-class", type=int, default=300, help="forest training regions per class (default: %(default)s)")
    from latticewatch.cli import train as train_cli

    train_cli.add_training_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "bench",
        help="measure per-stage speed (or the archive's) and print medians",
        description="Time every stage on synthetic uint16 frames and, in the same run, a naive pipeline "
        "(eager torch per 512² tile, per-particle Python loops) for the ratio. --archive measures the archive "
        "encoder/decoder instead.",
    )
    p.add_argument("--profile", default="nanoparticles")
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096], help="frame sides in pixels (default: 1024 4096)")
    p.add_argument("--repeats", type=int, default=7, help="timed repetitions per measurement (default: %(default)s)")
    p.add_argument("--no-naive", action="store_true", help="skip the naive reference pipeline")
    p.add_argument("--archive", action="store_true", help="benchmark the archive encoder/decoder instead")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("models", help="list installed profiles, import Keras weights", description="Model profiles (plugins).")
    models_sub = p.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    q = models_sub.add_parser("list", help="installed profiles, verified, with the reason a broken one is unusable")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_models_list)
    q = models_sub.add_parser(
        "import-keras",
        help="turn published pyNanoFind Keras weights (.h5) into a profile",
        description="Convert the pyNanoFind U-Net weights (Keras 2.2 HDF5) into a latticewatch profile directory "
        "(ONNX + safetensors + manifest; segmentation only, max normalisation, pixel size unset). Needs torch.",
    )
    q.add_argument("file", type=Path, metavar="FILE.h5")
    q.add_argument("--name", required=True, help="profile name")
    q.add_argument("--out", type=Path, metavar="DIR", help="profile directory (default: profiles/NAME)")
    q.set_defaults(func=cmd_models_import_keras)

    from latticewatch.cli import archive as archive_cli

    archive_cli.register(sub)
    from latticewatch.cli import simulate; simulate.register(sub)  # noqa: E702  simulate (abTEM imported lazily)
    train_cli.register(sub)  # cross-validate
    from latticewatch.cli import sort; sort.register(sub)  # noqa: E702
    from latticewatch.cli import daemon; daemon.register(sub)  # noqa: E702  run | demo | check-config | replay
    from latticewatch.cli import evaluate; evaluate.register(sub)  # noqa: E702  evaluate
    from latticewatch.cli import calibrate; calibrate.register(sub)  # noqa: E702  calibrate …
    from latticewatch.cli import train_classifier; train_classifier.register(sub)  # noqa: E702  train-classifier
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in trained models' manifests
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
                        format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)

