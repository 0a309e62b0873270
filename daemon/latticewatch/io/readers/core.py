"""What every format reader shares: `ReadError`, the limits, and the checks every frame passes.

A format module describes what a file holds as a list of `Plane` objects (the header's shape and
a ``load`` that reads the pixels only when asked) and records file-level metadata on a
`ReadContext`; `finish_frame` then loads one plane, checks it and turns it into a `Frame`. The
rules these checks enforce are listed in the package docstring (`latticewatch.io.readers`).
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from latticewatch.errors import InputError
from latticewatch.frame import MIN_SIDE_PX, Frame
from latticewatch.io.jsonio import parse_timestamp
from latticewatch.io.pixel_size import PLAUSIBLE_PIXEL_NM

log = logging.getLogger(__name__)

#: Default for ``max_pixels``: a 16k × 16k frame is larger than any current detector.
DEFAULT_MAX_PIXELS = 16384**2


class ReadError(InputError):
    """The file (or one section of it) cannot be turned into a valid frame.

    ``str(err)`` reads ``<path>: <problem>`` or ``<path>#<section>: <problem>``, e.g.
    ``bad.mrc: unsupported MRC mode 3 (complex int16); supported: 0, 1, 2, 6, 12``.

    Attributes
    ----------
    path
        The file, as the caller named it.
    problem
        What is wrong, phrased for a person (and, where there is one, the fix).
    section
        0-based section of a stack when the problem is confined to it, else ``None``. Reading can
        resume after it with ``read_frames(path, start=section + 1)``.

    Examples
    --------
    >>> str(ReadError("stack.mrc", "truncated", section=3))
    'stack.mrc#3: truncated'
    """

    def __init__(self, path: str, problem: str, section: int | None = None) -> None:
        # all three in args so the exception pickles across process boundaries
        super().__init__(path, problem, section)
        self.path = path
        self.problem = problem
        self.section = section
        #: The decoded pixels when only their values are refused (non-finite, strict): a daemon archives them whole.
        self.pixels: np.ndarray | None = None

    def __str__(self) -> str:
        where = self.path if self.section is None else f"{self.path}#{self.section}"
        return f"{where}: {self.problem}"


@dataclass
class Plane:
    """One 2-D image a format found, described before its pixels are read."""

    shape: tuple[int, int] | None  # (rows, cols) declared by the header; None if unknown
    load: Callable[[Plane], np.ndarray]  # -> (Y, X) or (Y, X, S); may fill in fields below
    meta: dict[str, Any] = field(default_factory=dict)
    pixel_size_nm: float | None = None
    acquired_at: datetime | None = None
    colour: bool = True  # whether a samples axis is colour (RGB) rather than extra channels
    warnings: list[str] = field(default_factory=list)


@dataclass
class ReadContext:
    """One file being read: the caller's options, file-level metadata and where errors point."""

    path: str
    permissive: bool
    max_pixels: int
    kind: str = ""
    meta: dict[str, Any] = field(default_factory=dict)  # file-level, copied into every frame
    warnings: list[str] = field(default_factory=list)  # file-level
    n_declared: int = 0  # sections the file declares (decides the frame_id form)
    section: int | None = None  # section being read, for error messages

    def error(self, problem: str, section: int | None = None) -> ReadError:
        """A `ReadError` for this file (and the current section unless `section` is given)."""
        return ReadError(self.path, problem, section if section is not None else self.section)

    def warn(self, message: str, plane: Plane | None = None) -> None:
        """Log a guess and list it in the frame's ``meta["warnings"]`` (file-level without `plane`)."""
        where = self.path if self.section is None else f"{self.path}#{self.section}"
        log.warning("%s: %s", where, message)
        (plane.warnings if plane is not None else self.warnings).append(message)

    def problem(self, message: str, plane: Plane | None = None) -> None:
        """A header inconsistency: fatal when strict, a logged guess when permissive."""
        if not self.permissive:
            raise self.error(message)
        self.warn(message, plane)


def check_shape(ctx: ReadContext, rows: int, cols: int, section: int | None = None) -> None:
    """Refuse a declared size that is empty, above ``ctx.max_pixels`` or below `MIN_SIDE_PX`."""
    rows, cols = int(rows), int(cols)  # Python ints: a numpy int32 product can overflow
    if rows <= 0 or cols <= 0:
        raise ctx.error(f"invalid image size {cols}×{rows}", section)
    if rows * cols > ctx.max_pixels:
        raise ctx.error(
            f"declared size {cols}×{rows} = {rows * cols} pixels exceeds max_pixels={ctx.max_pixels}",
            section,
        )
    if rows < MIN_SIDE_PX or cols < MIN_SIDE_PX:
        raise ctx.error(
            f"image is only {cols}×{rows} pixels; the minimum is {MIN_SIDE_PX}×{MIN_SIDE_PX}", section
        )


_NM_PER_UNIT = {
    "pm": 1e-3,
    "a": 0.1,
    "angstrom": 0.1,
    "angstroms": 0.1,
    "nm": 1.0,
    "nanometer": 1.0,
    "nanometers": 1.0,
    "um": 1e3,
    "micron": 1e3,
    "microns": 1e3,
    "micrometer": 1e3,
    "micrometers": 1e3,
    "mm": 1e6,
    "cm": 1e7,
    "m": 1e9,
}


def nm_per_unit(unit: Any) -> float | None:
    """nm per `unit`, for the spellings the formats use; None for pixels, 1/nm, '' and the like.

    Examples
    --------
    >>> nm_per_unit("Å"), nm_per_unit(b"[n_m]"), nm_per_unit("1/nm")
    (0.1, 1.0, None)
    """
    if isinstance(unit, bytes):
        unit = unit.decode("latin-1")
    u = str(unit).strip().lower()
    # Berkeley EMD writes units as "[n_m]"; ImageJ escapes µ as "\u00B5"
    u = u.strip("[]").replace("_", "").replace(" ", "")
    u = u.replace("\\u00b5", "u").replace("µ", "u").replace("μ", "u").replace("å", "a")
    return _NM_PER_UNIT.get(u)


def set_pixel_size(
    ctx: ReadContext, plane: Plane, value: float | None, unit: Any, source: str, value_y: float | None = None
) -> None:
    """Store a pixel size given in `unit` on `plane` if it is usable, else say why not in its meta.

    Examples
    --------
    >>> ctx = ReadContext("a.dm4", permissive=False, max_pixels=DEFAULT_MAX_PIXELS)
    >>> plane = Plane(shape=(64, 64), load=lambda p: None)
    >>> set_pixel_size(ctx, plane, 2.5, "Å", "DM calibration")
    >>> plane.pixel_size_nm, plane.meta["pixel_size_source"]
    (0.25, 'DM calibration')
    """
    if value is None:
        return
    factor = nm_per_unit(unit)
    if factor is None:
        plane.meta["pixel_size_note"] = f"{source}: unit {str(unit)!r} is not a length"
        return
    nm = float(value) * factor
    if not math.isfinite(nm) or nm == 0:
        plane.meta["pixel_size_note"] = f"{source}: {value!r} {unit} is not set"
        return
    nm = abs(nm)  # some writers use a negative scale for a flipped axis
    if not PLAUSIBLE_PIXEL_NM[0] <= nm <= PLAUSIBLE_PIXEL_NM[1]:
        plane.meta["pixel_size_note"] = f"{source}: {nm:g} nm per pixel is implausible, ignored"
        log.info("%s: %s", ctx.path, plane.meta["pixel_size_note"])
        return
    if value_y is not None and value_y != 0 and math.isfinite(value_y):
        nm_y = abs(float(value_y) * factor)
        if not math.isclose(nm, nm_y, rel_tol=0.01):
            ctx.problem(f"non-square pixels ({nm:g} nm × {nm_y:g} nm); using the x size", plane)
    plane.pixel_size_nm = nm
    plane.meta["pixel_size_source"] = source


def jsonable(value: Any, depth: int = 0) -> Any:
    """A JSON-safe copy of header/tag values (numpy scalars, bytes, small arrays, nested dicts).

    Examples
    --------
    >>> jsonable({"n": np.int16(3), "label": b"SerialEM\\0\\0", "x": float("nan")})
    {'n': 3, 'label': 'SerialEM', 'x': None}
    """
    if depth > 8:
        return str(value)
    if isinstance(value, enum.Enum):  # tifffile's COMPRESSION, PHOTOMETRIC … (IntEnum is an int)
        return value.name
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, np.generic):
        return jsonable(value.item(), depth + 1)
    if isinstance(value, bytes):
        return value.rstrip(b"\0").decode("latin-1")
    if isinstance(value, np.ndarray):
        if value.size > 64:
            return f"<array {value.shape} {value.dtype}>"
        return jsonable(value.tolist(), depth + 1)
    if isinstance(value, dict):
        return {str(k): jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, depth + 1) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def header_time(text: Any, formats: Sequence[str]) -> datetime | None:
    """A header's date/time string in one of `formats`, or None when absent or unreadable.

    An unreadable date is not worth refusing a frame for: the frame simply has no time.

    Examples
    --------
    >>> header_time("2024:06:01 10:38:23", ("%Y:%m:%d %H:%M:%S",)).isoformat()
    '2024-06-01T10:38:23'
    >>> header_time(b"\\x00", ("%Y:%m:%d %H:%M:%S",)) is None
    True
    """
    try:
        return parse_timestamp(text, formats)
    except (TypeError, ValueError):
        return None


def _to_grey(ctx: ReadContext, plane: Plane, arr: np.ndarray) -> np.ndarray:
    samples = arr.shape[-1]
    if plane.colour and samples in (3, 4):
        what = "RGB" if samples == 3 else "RGBA"
    elif samples == 2:
        what = "grey + alpha"
    else:
        what = f"{samples}-channel"
    msg = f"{what} image ({samples} samples per pixel); expected a single greyscale channel"
    if not ctx.permissive:
        raise ctx.error(msg + " (permissive=True converts)")
    if plane.colour and samples in (3, 4):
        # Rec. 601 luma, computed in float and rounded back so the frame keeps the file's dtype
        grey = arr[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        if arr.dtype.kind in "iu":
            info = np.iinfo(arr.dtype)
            grey = np.clip(np.rint(grey), info.min, info.max)
        arr = grey.astype(arr.dtype)
        ctx.warn(msg + "; converted to grey (Rec. 601 luma)", plane)
    else:
        arr = np.ascontiguousarray(arr[..., 0])
        ctx.warn(msg + "; kept the first channel", plane)
    plane.meta["converted_from"] = what
    return arr


def _finish_pixels(ctx: ReadContext, plane: Plane, arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3:
        arr = _to_grey(ctx, plane, arr)
    if arr.ndim != 2:
        raise ctx.error(f"expected a 2-D image, got an array of shape {arr.shape}")
    if plane.shape is None:
        check_shape(ctx, *arr.shape)
    elif tuple(arr.shape) != tuple(plane.shape):
        raise ctx.error(f"decoded shape {arr.shape} differs from the declared {plane.shape}")

    kind = arr.dtype.kind
    if kind == "b":
        if not ctx.permissive:
            raise ctx.error("1-bit (boolean) image; expected grey levels (permissive=True converts)")
        ctx.warn("1-bit image converted to uint8 0/1", plane)
        arr = arr.astype(np.uint8)
    elif kind not in "iuf":
        raise ctx.error(f"unsupported pixel type {arr.dtype}; expected integer or float grey levels")
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))

    if kind == "f":
        finite = np.isfinite(arr)
        if not finite.all():
            n_bad = int(arr.size - np.count_nonzero(finite))
            n_nan = int(np.count_nonzero(np.isnan(arr)))
            msg = f"{n_bad} non-finite pixel(s) ({n_nan} NaN, {n_bad - n_nan} ±Inf) of {arr.size}"
            if n_bad == arr.size or not ctx.permissive:
                err = ctx.error(msg + ("; no finite pixel left" if n_bad == arr.size
                                       else "; permissive=True replaces them by the median"))
                err.pixels = np.array(arr, order="C")  # owned: the memory map closes with the file
                raise err
            fill = np.median(arr[finite])
            arr = np.where(finite, arr, fill).astype(arr.dtype)
            ctx.warn(f"{msg}; replaced by the median of the finite pixels ({float(fill):g})", plane)
            plane.meta["nonfinite_pixels"] = n_bad
    # an owned, C-contiguous array: never a view into a memory map that is about to close
    if type(arr) is np.ndarray and arr.flags.owndata and arr.flags.c_contiguous:
        return arr
    return np.array(arr, order="C")


def finish_frame(ctx: ReadContext, plane: Plane, section: int) -> Frame:
    """Load section `section`'s pixels, check them (size, type, colour, non-finite) and build its `Frame`.

    Examples
    --------
    >>> ctx = ReadContext("a.png", permissive=False, max_pixels=DEFAULT_MAX_PIXELS, n_declared=1)
    >>> plane = Plane(shape=(32, 32), load=lambda p: np.zeros((32, 32, 1), np.uint8))
    >>> frame = finish_frame(ctx, plane, 0)
    >>> frame.frame_id, frame.pixels.shape, frame.meta["n_sections"]
    ('a.png', (32, 32), 1)
    """
    stack = ctx.n_declared > 1
    ctx.section = section if stack else None
    if plane.shape is not None:
        check_shape(ctx, *plane.shape)
    pixels = _finish_pixels(ctx, plane, plane.load(plane))
    meta = {
        **ctx.meta,
        **plane.meta,
        "section": section,
        "n_sections": ctx.n_declared,
        "warnings": ctx.warnings + plane.warnings,
    }
    return Frame(
        frame_id=f"{ctx.path}#{section}" if stack else ctx.path,
        pixels=pixels,
        pixel_size_nm=plane.pixel_size_nm,
        acquired_at=plane.acquired_at,
        meta=meta,
        origin=ctx.path,
    )
