"""``latticewatch process``: analyse micrograph files and write a report per frame."""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from latticewatch.cli.common import (
    add_backend,
    add_batch_options,
    add_profile,
    add_report_options,
    exit_code,
    open_batch,
)
from latticewatch.errors import ConfigError
from latticewatch.frame import CLASSES, Analysis, Frame

if TYPE_CHECKING:  # the parser is built for every command; the pipeline is imported only to process
    from latticewatch.runtime.batch import Batch
    from latticewatch.sinks.archive import ArchiveWriter

_HELP = (
    "Analyse HRTEM micrographs (MRC incl. stacks, TIFF, DM3/DM4, SER, EMD, PNG): median filter, normalise, resample "
    "to the model's pixel size, U-Net segmentation, region isolation and measurement, a domain check, and "
    "classification into 5 classes by the profile's classifier (random forest or CNN; 'uncertain' below its "
    "confidence threshold). Writes DIR/<name>.json, DIR/<name>_particles.csv and DIR/<name>_overlay.png per frame and "
    "prints a summary table. Analysis warnings (unknown pixel size, a frame outside the model's domain) are printed "
    "on stderr; a frame outside the model's domain is marked '!' in the table. The defect fraction is stacking faults "
    "among stacking_fault + no_stacking_fault particles, corrected for the classifier's measured confusion, with its "
    "95 % interval: 0.31 [0.18–0.47]. A file or stack section that cannot be read or analysed is named on stderr "
    "and the others are still done; exit code 1 if any failed."
)


def archive_policy(text: str) -> str:
    """``--archive-policy``: checked while parsing, so a typo fails before any frame is analysed."""
    from latticewatch.sinks.archive.reduce import Policy

    try:
        return str(Policy.parse(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``process`` to the top-level command parser."""
    p = sub.add_parser("process", help="analyse micrograph files and write per-frame reports", description=_HELP)
    p.add_argument("files", nargs="+", type=Path, metavar="FILE", help="micrograph files")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory (created if needed)")
    add_profile(p)
    add_report_options(p)
    add_batch_options(p)
    add_backend(p)
    p.add_argument("--archive", type=Path, metavar="ROOT",
                   help="also archive each frame (HDF5, see README 'Archive') under ROOT")
    p.add_argument("--archive-policy", type=archive_policy, default="drop", metavar="POLICY",
                   help="low-value pixels: drop[:FILL], mean or quantize:N (default: %(default)s)")
    p.add_argument("--archive-margin-nm", type=float, default=0.5, metavar="NM",
                   help="exact margin around particles in nm (default: %(default)s)")
    p.add_argument("--lossless", action="store_true", help="archive every frame whole and lossless (reduce = false)")
    p.set_defaults(func=cmd_process)


def cmd_process(args: argparse.Namespace) -> int:
    from latticewatch.sinks.reports import summary, write_reports

    if args.archive_margin_nm < 0:
        raise ConfigError(f"--archive-margin-nm must be >= 0, got {args.archive_margin_nm}")
    analyser, batch = open_batch(args)
    archive = None
    if args.archive:
        from latticewatch.runtime.archiving import open_session_writer

        archive = open_session_writer(args.archive, "process", analyser.manifest.archive, policy=args.archive_policy,
                                      margin_nm=args.archive_margin_nm, reduce=not args.lossless)
    rows: list[dict] = []
    try:
        analyse = functools.partial(analyser.analyse, keep_probability=args.save_probabilities)
        for frame, analysis in batch.run(args.files, analyse):
            write_reports(frame, analysis, args.out, save_probability=args.save_probabilities)
            _warn(frame, analysis)
            rows.append(summary(frame, analysis))
            if archive is not None:
                _archive_frame(archive, frame, analysis, batch)
    finally:
        if archive is not None:
            archive.close()
    if args.json:
        json.dump({"frames": rows, "failures": [f.as_dict() for f in batch.failures], "out": str(args.out)},
                  sys.stdout, indent=2)
        print()
    else:
        _print_table(rows, classified=analyser.manifest.classifier is not None)
        print(f"{len(rows)} frame(s) analysed, {len(batch.failures)} failed; results in {args.out}")
    return exit_code(batch.failures)


def _warn(frame: Frame, analysis: Analysis) -> None:
    """Every warning of the analysis on stderr, as it happens: the JSON alone is too easy to miss."""
    for text in analysis.warnings:
        print(f"warning: {frame.frame_id}: {text}", file=sys.stderr)
    if analysis.out_of_domain:
        print(f"warning: {frame.frame_id}: model_out_of_domain: {'; '.join(analysis.out_of_domain)}; its particles, "
              "sizes and defect fraction are not reliable", file=sys.stderr)


def _archive_frame(archive: ArchiveWriter, frame: Frame, analysis: Analysis, batch: Batch) -> None:
    """Archive one analysed frame; a full or read-only archive is that frame's failure, not the run's."""
    from latticewatch.sinks.archive import ArchiveUnavailable

    try:
        archive.write(frame, analysis, {"written_by": "latticewatch process"})
    except ArchiveUnavailable as err:
        # reports are written; only the archive copy is missing, and the source file is untouched
        batch.fail(frame.origin, frame.frame_id, f"{frame.frame_id}: not archived: {err}")


def _defect(row: dict) -> str:
    """``0.31 [0.18–0.47]``: a summary row's defect fraction and its interval; ``–`` when nothing was counted."""
    if row["defect_fraction"] is None:
        return "–"
    return f"{row['defect_fraction']:.2f} [{row['defect_fraction_lower']:.2f}–{row['defect_fraction_upper']:.2f}]"


def _print_table(rows: list[dict], *, classified: bool = True) -> None:
    """The run summary; a profile without a classifier (e.g. graphene) gets regions and content ratio
    instead of the five class columns, which would all read 0. A frame outside the model's domain is
    marked ``!`` and gets no defect fraction; the others get the estimate and its 95 % interval."""
    if not rows:
        return
    if classified:
        head = ["frame", "px (nm)", "particles", "cover", "SF", "noSF", "mis", "aggl", "empty", "defect frac [95 %]",
                "ms"]
    else:
        head = ["frame", "px (nm)", "regions", "cover", "content ratio", "ms"]
    table = [head]
    for r in rows:
        doubtful = bool(r["out_of_domain"])
        start = [r["name"] + (" !" if doubtful else ""), f"{r['pixel_size_nm']:.4f}" if r["pixel_size_nm"] else "?",
                 str(r["particles"]), f"{r['coverage']:.1%}"]
        if classified:
            c = r["class_counts"]
            middle = [str(c[label]) for label in CLASSES]  # the columns SF … empty, in this order
            middle += ["ood" if doubtful else _defect(r)]
        else:
            middle = [f"{r['content_ratio']:.1%}"]
        table.append(start + middle + [f"{1000 * r['seconds']:.0f}"])
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        print("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    if any(r["out_of_domain"] for r in rows):
        print("! model out of domain: the frame is unlike what the model was trained on; its results are not "
              "reliable (reasons on stderr)")
