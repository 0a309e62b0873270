"""The suffix registry and the two entry points, `read_frames` and `count_sections`.

A file's suffix picks its format module; everything a format library raises about the content
becomes a `ReadError`, while real filesystem errors stay `OSError` so the caller can retry.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager

from latticewatch.frame import Frame
from latticewatch.io.readers.core import DEFAULT_MAX_PIXELS, Plane, ReadContext, ReadError, finish_frame
from latticewatch.io.readers.image import PNG_SUFFIXES, png_planes
from latticewatch.io.readers.mrc import MRC_SUFFIXES, mrc_planes
from latticewatch.io.readers.ncem import DM_SUFFIXES, EMD_SUFFIXES, SER_SUFFIXES, dm_planes, emd_planes, ser_planes
from latticewatch.io.readers.tiff import TIFF_SUFFIXES, tiff_planes

#: A format's opener: the file's planes, valid until the context exits.
Opener = Callable[[ReadContext], AbstractContextManager[list[Plane]]]

#: Each format: the suffixes it claims, its name in error messages, its opener.
FORMATS: tuple[tuple[tuple[str, ...], str, Opener], ...] = (
    (MRC_SUFFIXES, "MRC", mrc_planes),
    (TIFF_SUFFIXES, "TIFF", tiff_planes),
    (DM_SUFFIXES, "DM3/DM4", dm_planes),
    (SER_SUFFIXES, "SER", ser_planes),
    (EMD_SUFFIXES, "EMD", emd_planes),
    (PNG_SUFFIXES, "PNG", png_planes),
)
SUPPORTED_SUFFIXES: tuple[str, ...] = tuple(suffix for suffixes, _, _ in FORMATS for suffix in suffixes)
_OPENERS = {suffix: (kind, opener) for suffixes, kind, opener in FORMATS for suffix in suffixes}


@contextmanager
def _translated(ctx: ReadContext) -> Iterator[None]:
    """Turn whatever a format library raises into a `ReadError`; keep real I/O errors."""
    try:
        yield
    except ReadError:
        raise
    except OSError as exc:
        # Libraries raise bare OSError/IOError for bad content ("not a valid DM file", h5py's
        # "file signature not found"); those carry no errno. An errno means the filesystem
        # failed, which the caller may want to retry rather than quarantine.
        if exc.errno is not None:
            raise
        raise ctx.error(f"cannot read as {ctx.kind}: {exc}") from exc
    except MemoryError:
        raise
    except Exception as exc:
        raise ctx.error(f"cannot read as {ctx.kind}: {type(exc).__name__}: {exc}") from exc


def _context(path: str | os.PathLike[str], permissive: bool, max_pixels: int) -> tuple[ReadContext, Opener]:
    ctx = ReadContext(path=os.fspath(path), permissive=permissive, max_pixels=int(max_pixels))
    suffix = os.path.splitext(ctx.path)[1].lower()
    if suffix not in _OPENERS:
        supported = ", ".join(SUPPORTED_SUFFIXES)
        raise ctx.error(f"unsupported file type {suffix or '(no suffix)'!r}; supported: {supported}")
    ctx.kind, opener = _OPENERS[suffix]
    # os.stat's OSError (missing, no permission) is deliberately not a ReadError
    if os.stat(ctx.path).st_size == 0:
        raise ctx.error("empty file (0 bytes)")
    return ctx, opener


def read_frames(
    path: str | os.PathLike[str],
    *,
    permissive: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    start: int = 0,
) -> Iterator[Frame]:
    """Yield the 2-D frames of a micrograph file, one section at a time.

    The format is chosen by suffix (`SUPPORTED_SUFFIXES`). Stacks are read section by section
    (memory-mapped where the format allows), so a large stack never sits in memory at once.
    Errors are raised while iterating; frames already yielded are valid.

    Parameters
    ----------
    path
        The file. ``frame_id`` and ``origin`` use it exactly as given.
    permissive
        Warn and guess instead of raising on header inconsistencies, truncated MRC stacks
        (complete sections are read), colour images (converted to grey) and non-finite pixels
        (replaced by the median). Each guess is logged and listed in ``meta["warnings"]``.
    max_pixels
        Refuse frames whose declared ``rows * cols`` exceeds this, before reading them.
    start
        First section to yield, e.g. ``err.section + 1`` to go on after a bad section.

    Yields
    ------
    Frame
        ``pixels`` in the file's dtype (native byte order), ``pixel_size_nm`` from the file or
        ``None``, ``meta`` with JSON-serialisable header fields plus ``section``,
        ``n_sections`` and ``warnings``.

    Raises
    ------
    ReadError
        Unsupported suffix, empty or malformed file, unsupported MRC mode, truncated data,
        absurd or tiny sizes, colour or non-finite pixels when strict. ``err.section`` says
        which section of a stack failed.
    OSError
        The filesystem failed (missing file, permission); worth retrying.

    Examples
    --------
    >>> import mrcfile, numpy as np, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "stack.mrc")
    >>> with mrcfile.new(path) as mrc:
    ...     mrc.set_data(np.zeros((2, 64, 64), np.float32))
    ...     mrc.voxel_size = 0.8
    >>> [(f.frame_id.endswith("#1"), f.pixels.dtype.name, round(f.pixel_size_nm, 3))
    ...  for f in read_frames(path)][1]
    (True, 'float32', 0.08)
    """
    ctx, opener = _context(path, permissive, max_pixels)
    with ExitStack() as stack:
        with _translated(ctx):
            planes = stack.enter_context(opener(ctx))
        for section in range(max(0, start), len(planes)):
            with _translated(ctx):
                frame = finish_frame(ctx, planes[section], section)
            ctx.section = None
            yield frame


def count_sections(
    path: str | os.PathLike[str], *, permissive: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS
) -> int:
    """Number of 2-D frames `read_frames` would yield, from the headers alone.

    No pixel is read (tifffile parses IFDs, mrcfile reads the header, ncempy the tag tree). The
    same file-level checks as `read_frames` apply, so a bad file raises `ReadError` here already.
    With ``permissive=True`` a truncated MRC stack counts its complete sections.

    Examples
    --------
    >>> import tifffile, numpy as np, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "pages.tif")
    >>> tifffile.imwrite(path, np.zeros((3, 32, 32), np.uint16), photometric="minisblack")
    >>> count_sections(path)
    3
    """
    ctx, opener = _context(path, permissive, max_pixels)
    with _translated(ctx), opener(ctx) as planes:
        return len(planes)
