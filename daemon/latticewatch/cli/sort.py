"""``latticewatch sort``: rank the frames of a folder by their content ratio.

The content ratio is the fraction of a frame's pixels *not* in the profile's foreground class
(``Analysis.content_ratio``). With the graphene profile, whose foreground is surface
contamination, it is the clean-graphene fraction: Sadre et al. (2021, Fig. 6) sort their frames
by it to pick the ones worth a lattice analysis.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the parser is built for every command; the analyser is imported only to sort
    from latticewatch.runtime.analyser import Analyser

log = logging.getLogger("latticewatch.cli.sort")

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2


@dataclass(frozen=True)
class RankedFrame:
    file: str
    frame_id: str
    content_ratio: float
    coverage: float


def micrograph_files(directory: Path) -> list[Path]:
    """Readable micrographs directly in ``directory`` (by suffix), sorted by name; dotfiles skipped."""
    from latticewatch.io.readers import SUPPORTED_SUFFIXES

    return sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in SUPPORTED_SUFFIXES)


def rank_frames(files: Iterable[Path], analyser: Analyser, *, descending: bool = False,
                failures: list[dict] | None = None, permissive: bool = False) -> list[RankedFrame]:
    """Analyse every frame of ``files`` and return them ordered by content ratio.

    Ties keep file order, so the ranking is deterministic. Files or frames that cannot be read
    or analysed are appended to ``failures`` (file, frame id, error) and left out.

    Examples
    --------
    >>> ranked = rank_frames(micrograph_files(Path("session")), Analyser("graphene"), descending=True)  # doctest: +SKIP
    >>> ranked[0].file, round(ranked[0].content_ratio, 2)  # doctest: +SKIP
    ('session/clean_area.mrc', 0.98)
    """
    from latticewatch.errors import FrameError
    from latticewatch.io.readers import ReadError, read_frames

    failures = [] if failures is None else failures
    ranked = []
    for path in files:
        try:
            for frame in read_frames(path, permissive=permissive):
                try:
                    analysis = analyser.analyse(frame)
                except FrameError as err:
                    failures.append({"file": str(path), "frame_id": frame.frame_id, "error": str(err)})
                    continue
                ranked.append(RankedFrame(str(path), frame.frame_id, analysis.content_ratio, analysis.coverage))
        except (ReadError, OSError) as err:
            failures.append({"file": str(path), "frame_id": getattr(err, "section", None), "error": str(err)})
    return sorted(ranked, key=lambda r: -r.content_ratio if descending else r.content_ratio)


def cmd_sort(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from latticewatch.models.manifest import ManifestError
    from latticewatch.runtime.analyser import Analyser

    if not args.directory.is_dir():
        print(f"error: {args.directory}: not a directory", file=sys.stderr)
        return EXIT_USAGE
    try:
        analyser = Analyser(args.profile, threads=args.threads)
    except (ManifestError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    files = micrograph_files(args.directory)
    failures: list[dict] = []
    ranked = rank_frames(tqdm(files, desc="frames", unit="file", disable=not sys.stderr.isatty() or len(files) < 2),
                         analyser, descending=args.descending, failures=failures, permissive=args.permissive)
    for failure in failures:
        print(f"error: {failure['error']}", file=sys.stderr)
    foreground = analyser.manifest.segmentation.foreground
    if args.json:
        json.dump({
            "profile": analyser.model_ids["profile"], "directory": str(args.directory), "foreground": foreground,
            "order": "descending" if args.descending else "ascending",
            "frames": [{"rank": i, "file": r.file, "frame_id": r.frame_id, "content_ratio": round(r.content_ratio, 5),
                        "coverage": round(r.coverage, 5)} for i, r in enumerate(ranked, start=1)],
            "failures": failures,
        }, sys.stdout, indent=2)
        print()
    else:
        rows = [("rank", "file", "clean fraction")] + [(str(i), r.frame_id, f"{r.content_ratio:.3f}") for i, r in enumerate(ranked, start=1)]
        widths = [max(len(row[k]) for row in rows) for k in range(3)]
        for row in rows:
            print(f"{row[0].rjust(widths[0])}  {row[1].ljust(widths[1])}  {row[2].rjust(widths[2])}")
        print(f"{len(ranked)} frame(s) ranked by clean fraction (pixels not {foreground}), "
              f"{'highest' if args.descending else 'lowest'} first; {len(failures)} failed")
    return EXIT_SOME_FAILED if failures else EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``sort`` to the top-level command parser."""
    p = sub.add_parser(
        "sort",
        help="rank the frames of a folder by clean fraction (pixels not in the foreground class)",
        description="Analyse every micrograph in DIR (MRC incl. stacks, TIFF, DM3/DM4, SER, EMD, PNG) with a profile and "
        "rank the frames by content ratio: the fraction of pixels not segmented as the profile's foreground. With the "
        "graphene profile this is the clean-graphene fraction (1 − contamination coverage). Prints rank, frame and "
        "clean fraction, lowest first unless --descending. Exit code 1 if any file or frame failed.",
    )
    p.add_argument("directory", type=Path, metavar="DIR", help="folder of micrographs (not recursive)")
    p.add_argument("--profile", default="graphene", help="installed profile name or profile directory (default: %(default)s)")
    p.add_argument("--descending", action="store_true", help="cleanest frames first")
    p.add_argument("--json", action="store_true", help="print the ranking as JSON")
    p.add_argument("--permissive", action="store_true", help="warn and guess on inconsistent headers instead of failing")
    p.add_argument("--threads", type=int, default=None, help="inference threads (default: all usable cores)")
    p.set_defaults(func=cmd_sort)
