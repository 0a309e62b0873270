"""``latticewatch sort``: rank the frames of a folder by their content ratio.

The content ratio is the fraction of a frame's pixels *not* in the profile's foreground class
(``Analysis.content_ratio``). With the graphene profile, whose foreground is surface
contamination, it is the clean-graphene fraction: Sadre et al. (2021, Fig. 6) sort their frames
by it to pick the ones worth a lattice analysis.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from latticewatch.cli.common import add_backend, add_batch_options, add_profile, exit_code, open_batch

if TYPE_CHECKING:  # the parser is built for every command; the analyser is imported only to sort
    from latticewatch.runtime.analyser import Analyser
    from latticewatch.runtime.batch import Batch


@dataclass(frozen=True)
class RankedFrame:
    file: str
    frame_id: str
    content_ratio: float
    coverage: float


def rank_frames(files: Sequence[Path], analyser: Analyser, batch: Batch, *,
                descending: bool = False) -> list[RankedFrame]:
    """Analyse every frame of ``files`` on the batch path and return them ordered by content ratio.

    Ties keep file order, so the ranking is deterministic. Files or frames that cannot be read
    or analysed are left out; ``batch.failures`` lists them.

    Examples
    --------
    >>> from latticewatch.runtime.batch import Batch, micrograph_files
    >>> batch = Batch()
    >>> files = micrograph_files(Path("session"))  # doctest: +SKIP
    >>> ranked = rank_frames(files, Analyser("graphene"), batch, descending=True)  # doctest: +SKIP
    >>> ranked[0].file, round(ranked[0].content_ratio, 2)  # doctest: +SKIP
    ('session/clean_area.mrc', 0.98)
    """
    ranked = [RankedFrame(frame.origin, frame.frame_id, analysis.content_ratio, analysis.coverage)
              for frame, analysis in batch.run(files, analyser.analyse)]
    return sorted(ranked, key=lambda r: -r.content_ratio if descending else r.content_ratio)


def cmd_sort(args: argparse.Namespace) -> int:
    from latticewatch.runtime.batch import micrograph_files

    files = micrograph_files(args.directory)
    analyser, batch = open_batch(args, "sort")
    ranked = rank_frames(files, analyser, batch, descending=args.descending)
    foreground = analyser.manifest.segmentation.foreground
    if args.json:
        json.dump({
            "profile": analyser.model_ids["profile"], "directory": str(args.directory), "foreground": foreground,
            "order": "descending" if args.descending else "ascending",
            "frames": [{"rank": i, "file": r.file, "frame_id": r.frame_id, "content_ratio": round(r.content_ratio, 5),
                        "coverage": round(r.coverage, 5)} for i, r in enumerate(ranked, start=1)],
            "failures": [f.as_dict() for f in batch.failures],
        }, sys.stdout, indent=2)
        print()
    else:
        rows = [("rank", "file", "clean fraction")]
        rows += [(str(i), r.frame_id, f"{r.content_ratio:.3f}") for i, r in enumerate(ranked, start=1)]
        widths = [max(len(row[k]) for row in rows) for k in range(3)]
        for row in rows:
            print(f"{row[0].rjust(widths[0])}  {row[1].ljust(widths[1])}  {row[2].rjust(widths[2])}")
        print(f"{len(ranked)} frame(s) ranked by clean fraction (pixels not {foreground}), "
              f"{'highest' if args.descending else 'lowest'} first; {len(batch.failures)} failed")
    return exit_code(batch.failures)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``sort`` to the top-level command parser."""
    p = sub.add_parser(
        "sort",
        help="rank the frames of a folder by clean fraction (pixels not in the foreground class)",
        description="Analyse every micrograph in DIR (MRC incl. stacks, TIFF, DM3/DM4, SER, EMD, PNG) with a profile "
        "and rank the frames by content ratio: the fraction of pixels not segmented as the profile's foreground. With "
        "--profile graphene this is the clean-graphene fraction (1 − contamination coverage). Prints rank, frame and "
        "clean fraction, lowest first unless --descending. A file or stack section that cannot be read or analysed "
        "is named on stderr and left out; exit code 1 if any failed.",
    )
    p.add_argument("directory", type=Path, metavar="DIR", help="folder of micrographs (not recursive)")
    add_profile(p)
    p.add_argument("--descending", action="store_true", help="cleanest frames first")
    p.add_argument("--json", action="store_true", help="print the ranking as JSON")
    add_batch_options(p)
    add_backend(p)
    p.set_defaults(func=cmd_sort)
