"""Command-line side of the archive: ``latticewatch restore`` and ``archive-stats``.

:func:`register` adds the two subcommands to the main parser.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from latticewatch.cli.common import EXIT_OK
from latticewatch.errors import ConfigError, InputError
from latticewatch.io.atomic import atomic_path
from latticewatch.sinks.archive import ArchivedFrame, ArchiveReader, archive_stats

__all__ = ["archive_stats_command", "register", "restore_command"]

_RESTORE_HELP = """\
Rebuild frames from an archive into an MRC or TIFF file.

The high-value class and its margin come back bit-exact, in the frame's own dtype. The
low-value class comes back as its policy left it: one fill value (drop), the mean of each run
(mean) or N-bit levels (quantize:N). Frames archived lossless (reduce = false, the safety valve
for uncertain segmentations, frames without an analysis) come back bit-exact everywhere.

Several frames are written as a stack (they must share shape and dtype). MRC keeps the pixel
size (voxel size in Å); TIFF keeps it as resolution and in the description, together with
the frame ids.
"""

_STATS_HELP = """\
Report the compression ratio of an archive and its bytes by component: class mask (RLE),
exact pixels and their runs, the low-value class (per policy), metadata (frame metadata,
analysis, provenance), the frame index and the HDF5 overhead.

The ratio is raw frame bytes (shape x itemsize of the original dtype) over bytes on disk.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``restore`` and ``archive-stats`` to the ``latticewatch`` command.

    Examples
    --------
    >>> parser = argparse.ArgumentParser(prog="latticewatch")
    >>> register(parser.add_subparsers(dest="command"))
    >>> parser.parse_args(["restore", "a.h5", "--out", "x.mrc"]).func.__name__
    'restore_command'
    """
    fmt = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser(
        "restore", help="rebuild archived frames as .mrc or .tif", description=_RESTORE_HELP, formatter_class=fmt
    )
    p.add_argument("archive", type=Path, help="an archive file (.h5), a session directory or an archive root")
    p.add_argument(
        "--frame",
        action="append",
        metavar="ID",
        help="frame id, frame key (see archive-stats --frames) or file name; repeat for several (default: all)",
    )
    p.add_argument("--out", required=True, type=Path, metavar="FILE", help="output file: .mrc, .tif or .tiff")
    p.add_argument("--mask", type=Path, metavar="FILE", help="also write the class masks (uint8) to this .mrc/.tif")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.set_defaults(func=restore_command)

    s = subparsers.add_parser(
        "archive-stats",
        help="compression ratio and bytes by component of an archive",
        description=_STATS_HELP,
        formatter_class=fmt,
    )
    s.add_argument("archive", type=Path, help="an archive file (.h5), a session directory or an archive root")
    s.add_argument("--json", action="store_true", help="print machine-readable JSON")
    s.add_argument("--frames", action="store_true", help="also list every frame (id, key, policy, ratio)")
    s.set_defaults(func=archive_stats_command)


# ------------------------------------------------------------------------------------ restore


def _write_image(path: Path, data: np.ndarray, frames: list[ArchivedFrame], *, force: bool) -> None:
    """Write ``data`` (2-D or a 3-D stack) atomically, keeping the pixel size."""
    suffix = path.suffix.lower()
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists (use --force to overwrite)")
    if suffix not in (".mrc", ".tif", ".tiff"):
        raise ConfigError(f"cannot write {path.name}: use .mrc, .tif or .tiff")
    pixel_sizes = {f.pixel_size_nm for f in frames}
    pixel_size = pixel_sizes.pop() if len(pixel_sizes) == 1 else None
    data = data.astype(data.dtype.newbyteorder("="), copy=False)  # same values, native byte order
    with atomic_path(path) as tmp:
        if suffix == ".mrc":
            _write_mrc(tmp, data, frames, pixel_size)
        else:
            _write_tiff(tmp, data, frames, pixel_size)


def _write_mrc(path: Path, data: np.ndarray, frames: list[ArchivedFrame], pixel_size: float | None) -> None:
    import mrcfile  # noqa: PLC0415

    try:
        mrcfile.utils.mode_from_dtype(data.dtype)
    except ValueError:
        raise ConfigError(f"MRC cannot hold {data.dtype} bit-exactly; restore to .tif instead") from None
    with mrcfile.new(path) as mrc:
        mrc.set_data(data)
        if pixel_size is not None:
            mrc.voxel_size = pixel_size * 10.0  # Å
        label = f"latticewatch restore: {frames[0].frame_id}"
        mrc.add_label(label[:80])
        if any(not f.reduced.exact_everywhere for f in frames):
            mrc.add_label(f"low-value pixels reduced: {frames[0].reduced.policy}"[:80])


def _write_tiff(path: Path, data: np.ndarray, frames: list[ArchivedFrame], pixel_size: float | None) -> None:
    import tifffile  # noqa: PLC0415

    description = json.dumps(
        {
            "frame_ids": [f.frame_id for f in frames],
            "pixel_size_nm": pixel_size,
            "policies": ["lossless" if f.reduced.exact_everywhere else str(f.reduced.policy) for f in frames],
        }
    )
    # grey pages, one per frame: a stack of three must never be read as one RGB image
    kwargs: dict[str, Any] = {"description": description, "metadata": None, "photometric": "minisblack"}
    if pixel_size:
        per_cm = 1e7 / pixel_size
        kwargs.update(resolution=(per_cm, per_cm), resolutionunit="CENTIMETER")
    tifffile.imwrite(path, data, **kwargs)


def restore_command(args: argparse.Namespace) -> int:
    """``latticewatch restore``: write archived frames to ``--out``; returns the exit code."""
    reader = ArchiveReader(args.archive)
    try:
        entries = [reader.find(f) for f in args.frame] if args.frame else reader.entries()
    except KeyError as exc:  # the reader's "no frame …" / "matches N frames"
        raise InputError(exc.args[0]) from None
    if not entries:
        raise InputError(f"no archived frames in {args.archive}")
    frames = [reader.read(e) for e in entries]
    pixels = [f.pixels() for f in frames]
    if len({(p.shape, p.dtype) for p in pixels}) > 1:
        raise ConfigError("the selected frames differ in shape or dtype; restore them one at a time with --frame")
    data = pixels[0] if len(pixels) == 1 else np.stack(pixels)
    _write_image(args.out, data, frames, force=args.force)
    if args.mask is not None:
        masks = [f.mask() for f in frames]
        if any(m is None for m in masks):
            print("note: some frames were archived without a mask; --mask skipped", file=sys.stderr)
        else:
            _write_image(args.mask, masks[0] if len(masks) == 1 else np.stack(masks), frames, force=args.force)
    lossy = [f for f in frames if not f.reduced.exact_everywhere]
    print(f"restored {len(frames)} frame(s) to {args.out}")
    if lossy:
        policies = sorted({str(f.reduced.policy) for f in lossy})
        exact = sum(f.reduced.n_exact for f in lossy) / sum(f.reduced.n_pixels for f in lossy)
        print(
            f"note: {len(lossy)} frame(s) are exact only on the high-value class and its margin "
            f"({exact:.1%} of their pixels); the rest is as the policy left it ({', '.join(policies)})"
        )
    return EXIT_OK


# -------------------------------------------------------------------------------------- stats


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n}"  # pragma: no cover


def archive_stats_command(args: argparse.Namespace) -> int:
    """``latticewatch archive-stats``: print ratio and bytes by component; returns the exit code."""
    stats = archive_stats(args.archive, per_frame=args.frames)
    if args.json:
        print(json.dumps(stats, indent=2))
        return EXIT_OK
    ratio = f"{stats['ratio']:.2f}x" if stats["ratio"] else "n/a"
    print(f"archive   {stats['path']}")
    print(f"files     {stats['files']}    frames {stats['frames']}    lossless {stats['lossless_frames']}")
    print(f"raw       {_human(stats['raw_bytes'])}    stored {_human(stats['stored_bytes'])}    ratio {ratio}")
    print("policies  " + ", ".join(f"{k} {v}" for k, v in sorted(stats["policies"].items())))
    total = max(stats["stored_bytes"], 1)
    print(f"{'component':<16}{'bytes':>14}{'share':>9}")
    for name, nbytes in stats["components"].items():
        print(f"{name:<16}{nbytes:>14}{nbytes / total:>9.1%}")
    for row in stats.get("frame_list", []):
        print(f"{row['key']}  {row['policy']:<12} {row['ratio']:7.2f}x  {row['frame_id']}")
    return EXIT_OK
