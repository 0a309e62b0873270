"""MRC files and stacks (mrcfile): header checks, strict/permissive rules, truncated stacks.

The header is read and checked on its own before any pixel is mapped, so a truncated or absurd
file is diagnosed precisely. Strict mode refuses every inconsistency; permissive mode lets mrcfile
guess, reads the complete sections of a truncated stack and lists each guess in the warnings.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial

import numpy as np

from latticewatch.io.readers.core import (
    DEFAULT_MAX_PIXELS,
    Plane,
    ReadContext,
    check_shape,
    jsonable,
    set_pixel_size,
)

log = logging.getLogger(__name__)

MRC_SUFFIXES = (".mrc", ".mrcs", ".st", ".ali", ".map", ".rec")

#: MRC modes (MRC2014 + IMOD's 101) and what they hold, for error messages.
MRC_MODE_NAMES = {
    0: "int8",
    1: "int16",
    2: "float32",
    3: "complex int16",
    4: "complex float32",
    6: "uint16",
    12: "float16",
    101: "4-bit packed",
}
SUPPORTED_MRC_MODES = (0, 1, 2, 6, 12)


@contextmanager
def _recorded_warnings(ctx: ReadContext) -> Iterator[None]:
    """Route Python warnings from mrcfile (it warns in permissive mode) into the log and the meta.

    `warnings.catch_warnings` is process-global; a warning raised by another thread in the same
    instant may be attributed to this file. It is only ever extra text in ``meta["warnings"]``.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        ctx.warn(f"{w.category.__name__}: {w.message}")


#: Declared data blocks above this are header garbage, whatever the file's size (nz = 2³¹−1 …).
MAX_DECLARED_BYTES = 2**40


@dataclass(frozen=True)
class MrcLayout:
    """What an MRC header declares, compared with the file's size (`mrc_layout`)."""

    nz: int
    complete_sections: int  # sections whose bytes are all in the file
    problem: str | None = None  # the header cannot describe this file (or any file): refuse it


def _raw_header(raw: bytes) -> np.ndarray | None:
    """The header's fields in the byte order its machine stamp (or, failing that, its sizes) says."""
    from mrcfile.dtypes import HEADER_DTYPE
    from mrcfile.utils import byte_order_from_machine_stamp

    little = np.frombuffer(raw, HEADER_DTYPE.newbyteorder("<"))[0]
    try:
        order = byte_order_from_machine_stamp(little["machst"])
    except ValueError:  # no usable stamp: take the order in which the sizes are sane
        order = "<" if 0 <= int(little["nx"]) < 2**24 and 0 <= int(little["mode"]) < 2**16 else ">"
    return little if order == "<" else np.frombuffer(raw, HEADER_DTYPE.newbyteorder(">"))[0]


def mrc_layout(path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> MrcLayout | None:
    """nz and how many sections the file holds, from its first 1024 bytes alone; None if not parseable (yet).

    mrcfile reads the extended header even for a header-only open, allocating ``nsymbt`` bytes, so
    a header declaring ``nsymbt = 2³¹−1`` costs 2 GB per look; this reads 1024 bytes whatever the
    header says. ``problem`` is set when the declared extended header is larger than the file, a
    section larger than ``max_pixels`` (no reader would ever accept it: waiting for its bytes would
    be waiting forever) or the declared data larger than `MAX_DECLARED_BYTES`.

    Examples
    --------
    >>> import mrcfile, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "a.mrc")
    >>> with mrcfile.new(path) as mrc:
    ...     mrc.set_data(np.zeros((2, 32, 32), np.int16))
    >>> mrc_layout(path)
    MrcLayout(nz=2, complete_sections=2, problem=None)
    """
    from mrcfile.utils import dtype_from_mode

    with open(path, "rb") as fh:
        raw = fh.read(1024)
        size = os.fstat(fh.fileno()).st_size
    if len(raw) < 1024:
        return None
    header = _raw_header(raw)
    nx, ny, nz, nsymbt = (int(header[k]) for k in ("nx", "ny", "nz", "nsymbt"))
    try:
        itemsize = dtype_from_mode(int(header["mode"])).itemsize
    except ValueError:
        return None
    if min(nx, ny) <= 0 or nz < 0:
        return None
    section_bytes = nx * ny * itemsize
    problem = None
    if nsymbt < 0 or 1024 + nsymbt > size:
        problem = f"the header declares an extended header of {nsymbt} bytes but the file has only {size} bytes"
    elif nx * ny > max_pixels:
        problem = f"declared size {nx}×{ny} = {nx * ny} pixels exceeds max_pixels={max_pixels}"
    elif nz * section_bytes > MAX_DECLARED_BYTES:
        problem = (f"the header declares {nz} section(s) of {nx}×{ny} ({nz * section_bytes} bytes), "
                   f"above the {MAX_DECLARED_BYTES} bytes any stack may hold")
    complete = max(0, (size - 1024 - max(nsymbt, 0)) // section_bytes)
    return MrcLayout(nz, min(complete, nz), problem)


def _read_header(ctx: ReadContext) -> tuple[np.recarray, np.recarray, list[str]]:
    """The header, voxel size and labels, from a header-only open (no pixel is mapped).

    The declared sizes are checked against the file first (`mrc_layout`): an absurd extended
    header is refused before mrcfile allocates it.
    """
    import mrcfile

    layout = mrc_layout(ctx.path, ctx.max_pixels)
    if layout is not None and layout.problem is not None:
        raise ctx.error(layout.problem)
    with _recorded_warnings(ctx):
        try:
            with mrcfile.open(ctx.path, mode="r", permissive=ctx.permissive, header_only=True) as mrc:
                return mrc.header.copy(), mrc.voxel_size.copy(), [label.strip() for label in mrc.get_labels()]
        except ValueError as exc:  # mrcfile's way of saying "this is not a valid MRC header"
            raise ctx.error(f"not a valid MRC file: {exc}") from exc


def _available_sections(ctx: ReadContext, data_start: int, n_sections: int, section_bytes: int, what: str) -> int:
    """How many sections the file really holds: all declared, or (permissive) the complete ones."""
    expected = data_start + n_sections * section_bytes
    actual = os.path.getsize(ctx.path)
    if actual > expected:
        ctx.warn(f"file is {actual - expected} bytes longer than the header declares")
    if actual >= expected:
        return n_sections
    complete = max(0, (actual - data_start) // section_bytes)
    msg = (
        f"truncated: the header declares {n_sections} section(s) of {what} "
        f"({expected} bytes) but the file has {actual} bytes"
    )
    if not ctx.permissive:
        raise ctx.error(msg + "; permissive=True reads the complete sections")
    if complete == 0:
        raise ctx.error(msg + "; not one section is complete")
    ctx.warn(f"{msg}; reading the {complete} complete section(s)")
    return complete


def _header_meta(header: np.recarray, voxel: np.recarray, labels: list[str], dtype: np.dtype) -> dict:
    return dict(
        format="mrc",
        mode=int(header.mode),
        dtype=np.dtype(dtype).newbyteorder("=").name,
        nx=int(header.nx),
        ny=int(header.ny),
        nz=int(header.nz),
        mx=int(header.mx),
        my=int(header.my),
        mz=int(header.mz),
        ispg=int(header.ispg),
        voxel_size_angstrom=[float(voxel.x), float(voxel.y), float(voxel.z)],
        cella_angstrom=jsonable(header.cella.tolist()),
        labels=[label for label in labels if label],
        exttyp=jsonable(bytes(header.exttyp)),
        nsymbt=int(header.nsymbt),
        nversion=int(header.nversion),
        dmin=jsonable(float(header.dmin)),
        dmax=jsonable(float(header.dmax)),
        dmean=jsonable(float(header.dmean)),
        rms=jsonable(float(header.rms)),
    )


@contextmanager
def mrc_planes(ctx: ReadContext) -> Iterator[list[Plane]]:
    """The sections of an MRC file or stack, checked from the header and memory-mapped.

    Examples
    --------
    >>> import mrcfile, tempfile
    >>> from latticewatch.io.readers.core import DEFAULT_MAX_PIXELS
    >>> path = os.path.join(tempfile.mkdtemp(), "stack.mrcs")
    >>> with mrcfile.new(path) as mrc:
    ...     mrc.set_data(np.zeros((3, 32, 32), np.int16))
    >>> with mrc_planes(ReadContext(path, permissive=False, max_pixels=DEFAULT_MAX_PIXELS)) as planes:
    ...     len(planes), planes[0].shape
    (3, (32, 32))
    """
    import mrcfile
    from mrcfile import utils as mrc_utils

    header, voxel, labels = _read_header(ctx)
    mode = int(header.mode)
    if mode not in SUPPORTED_MRC_MODES:
        raise ctx.error(
            f"unsupported MRC mode {mode} ({MRC_MODE_NAMES.get(mode, 'unknown')}); "
            f"supported: {', '.join(map(str, SUPPORTED_MRC_MODES))}"
        )
    nx, ny, nz = int(header.nx), int(header.ny), int(header.nz)
    if min(nx, ny, nz) <= 0:
        raise ctx.error(f"invalid dimensions in header: nx={nx}, ny={ny}, nz={nz}")
    check_shape(ctx, ny, nx)
    try:
        shape = mrc_utils.data_shape_from_header(header)
    except ZeroDivisionError:
        raise ctx.error(f"volume stack (ispg={int(header.ispg)}) with mz=0") from None
    n_sections = math.prod(shape[:-2]) if len(shape) > 2 else 1
    if n_sections != nz:
        ctx.problem(f"nz={nz} is not a whole number of volumes of mz={int(header.mz)} sections")
    dtype = mrc_utils.data_dtype_from_header(header)
    nsymbt = int(header.nsymbt)
    if nsymbt < 0:
        raise ctx.error(f"negative extended header size nsymbt={nsymbt}")

    # Size check from the header alone, so a truncated or absurd file is diagnosed precisely
    # (mrcfile would say "mmap length is greater than file size") and nothing is mapped first.
    data_start = header.nbytes + nsymbt
    what = f"{nx}×{ny} {dtype.name}"
    available = _available_sections(ctx, data_start, n_sections, nx * ny * dtype.itemsize, what)
    ctx.n_declared = nz
    ctx.meta.update(_header_meta(header, voxel, labels, dtype))

    with ExitStack() as stack:
        if available == n_sections:
            with warnings.catch_warnings():
                # the header-only read above already reported everything mrcfile could warn about
                warnings.simplefilter("ignore", RuntimeWarning)
                mrc = stack.enter_context(mrcfile.mmap(ctx.path, mode="r", permissive=ctx.permissive))
            if mrc.data is None:
                raise ctx.error("mrcfile could not map the data block")
            data = mrc.data.reshape(-1, mrc.header.ny, mrc.header.nx)
        else:
            # mrcfile maps all or nothing; map just the complete sections the same way it would
            data = np.memmap(ctx.path, dtype=dtype, mode="r", offset=data_start, shape=(available, ny, nx))

        # one header, one pixel size: work it out (and log about it) once, not per section
        first = Plane(shape=(ny, nx), load=partial(_copy_section, data, 0))
        _mrc_pixel_size(ctx, first, voxel)
        planes = [first] + [
            dataclasses.replace(
                first,
                load=partial(_copy_section, data, k),
                meta=dict(first.meta),
                warnings=list(first.warnings),
            )
            for k in range(1, available)
        ]
        yield planes


def _copy_section(data: np.ndarray, k: int, _plane: Plane) -> np.ndarray:
    return np.array(data[k])  # a copy: the memory map closes with the file


def _mrc_pixel_size(ctx: ReadContext, plane: Plane, voxel: np.recarray) -> None:
    vx, vy = float(voxel.x), float(voxel.y)
    if not (math.isfinite(vx) and math.isfinite(vy)) or vx < 0 or vy < 0:
        ctx.problem(f"invalid voxel size {vx} × {vy} Å; pixel size unknown", plane)
        plane.meta["pixel_size_note"] = "invalid voxel size in the MRC header"
    elif vx == 0:
        plane.meta["pixel_size_note"] = "MRC voxel size is 0 (unset)"
    elif vx == 1.0 and vy in (0.0, 1.0):
        plane.meta["pixel_size_note"] = (
            "MRC voxel size is exactly 1.0 Å (cell size == sampling), IMOD's default for 'not set'"
        )
        log.info("%s: %s; treating the pixel size as unknown", ctx.path, plane.meta["pixel_size_note"])
    else:
        set_pixel_size(ctx, plane, vx, "angstrom", "mrc voxel_size", value_y=vy)
