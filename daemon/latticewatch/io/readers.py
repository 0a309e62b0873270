"""Read micrograph files into `Frame` objects: MRC, TIFF, DM3/DM4, SER, Berkeley EMD and PNG.

Every format is decoded by its established library (mrcfile, tifffile with a Pillow fallback,
ncempy, Pillow); this module only maps what they return onto `Frame`, checks it, and turns every
failure into one `ReadError` that names the file, the section and the problem.

Rules shared by all formats
---------------------------
* One `Frame` per 2-D image: a stack (MRC ``nz > 1``, multi-page TIFF, DM/EMD 3-D data, a SER
  series) gives one frame per section, in file order. ``frame_id`` is ``<path>#<section>``
  (0-based) when the file declares more than one section and ``<path>`` otherwise; ``<path>`` is
  the path exactly as the caller gave it.
* Pixels keep the file's dtype (only the byte order is made native). Colour images are refused
  unless ``permissive``; then they are converted to grey (Rec. 601 luma, rounded back to the
  original dtype) and a warning is added to ``meta["warnings"]``.
* Declared sizes are checked before any pixel is read: more than ``max_pixels`` or a side shorter
  than `MIN_SIDE_PX` is refused in both modes. (SER is the exception: ncempy gives the shape only
  together with the pixels, and the read is bounded by the file's real size.)
* Float frames with NaN/±Inf pixels: strict raises, naming how many; permissive replaces them by
  the median of the finite pixels and records ``meta["nonfinite_pixels"]``. A frame with no
  finite pixel is refused in both modes.
* ``pixel_size_nm`` comes from the file only (calibration files are the pipeline's business) and
  is ``None`` when the file does not say or says something implausible (outside
  `PLAUSIBLE_PIXEL_NM`); ``meta["pixel_size_source"]`` or ``meta["pixel_size_note"]`` tells why.

  - MRC: ``voxel_size.x`` (Å) / 10. A voxel size of 0 is "unset" (MRC2014). Exactly 1.0 Å (cell
    edge == sample count) is IMOD's default when no pixel size was given, so it is also treated
    as unknown: a real calibration is never exactly 1.000 Å, while taking the default at face
    value would silently give wrong nm-sizes instead of falling back to the calibration files.
  - TIFF: FEI/Thermo ``[Scan] PixelWidth`` (m), then ImageJ ``unit`` + XResolution, then
    XResolution with ResolutionUnit cm/inch only when that gives a pixel below 1 µm (anything
    coarser is a print/display DPI such as 72 dpi, not a sampling).
  - DM3/DM4, SER, EMD: ncempy's per-axis scale and unit (Å, nm, µm, m … converted to nm).
  - PNG: always ``None``.
* ``acquired_at``: timezone-aware (UTC) when the format says UTC (DM "Acquisition Time (OS)",
  SER tag time), naive local time when the format stores local time (TIFF DateTime, TIA's EMI),
  ``None`` otherwise (MRC, PNG, EMD).
* Strict by default. ``permissive=True`` lets mrcfile guess through header inconsistencies, reads
  the complete sections of a truncated MRC stack, converts colour and replaces non-finite pixels;
  every guess is logged on ``latticewatch.io.readers`` and listed in ``meta["warnings"]``.
* Filesystem errors (missing file, permission, EIO) propagate as `OSError` so the caller can retry;
  everything about the *content* is a `ReadError`.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from functools import cache, partial
from typing import Any

import numpy as np

from latticewatch.frame import Frame
from latticewatch.errors import InputError

log = logging.getLogger("latticewatch.io.readers")

#: Frames with a side shorter than this are refused: nothing can be segmented in them, and tiny
#: declared sizes are a classic sign of a corrupt header.
MIN_SIDE_PX = 16
#: Default for ``max_pixels``: a 16k × 16k frame is larger than any current detector.
DEFAULT_MAX_PIXELS = 16384**2
#: Pixel sizes (nm) outside this range are treated as unknown: they are header garbage or a
#: reciprocal-space calibration (diffraction) mislabelled as real space.
PLAUSIBLE_PIXEL_NM = (1e-4, 1e5)

MRC_SUFFIXES = (".mrc", ".mrcs", ".st", ".ali", ".map", ".rec")
TIFF_SUFFIXES = (".tif", ".tiff")
DM_SUFFIXES = (".dm3", ".dm4")
SER_SUFFIXES = (".ser",)
EMD_SUFFIXES = (".emd",)
PNG_SUFFIXES = (".png",)
SUPPORTED_SUFFIXES: tuple[str, ...] = (
    MRC_SUFFIXES + TIFF_SUFFIXES + DM_SUFFIXES + SER_SUFFIXES + EMD_SUFFIXES + PNG_SUFFIXES
)

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
    """

    def __init__(self, path: str, problem: str, section: int | None = None) -> None:
        # all three in args so the exception pickles across process boundaries
        super().__init__(path, problem, section)
        self.path = path
        self.problem = problem
        self.section = section

    def __str__(self) -> str:
        where = self.path if self.section is None else f"{self.path}#{self.section}"
        return f"{where}: {self.problem}"


# --------------------------------------------------------------------------------------------
# shared machinery


@dataclass
class _Plane:
    """One 2-D image a format found, described before its pixels are read."""

    shape: tuple[int, int] | None  # (rows, cols) declared by the header; None if unknown
    load: Callable[[_Plane], np.ndarray]  # -> (Y, X) or (Y, X, S); may fill in fields below
    meta: dict[str, Any] = field(default_factory=dict)
    pixel_size_nm: float | None = None
    acquired_at: datetime | None = None
    colour: bool = True  # whether a samples axis is colour (RGB) rather than extra channels
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Ctx:
    path: str
    permissive: bool
    max_pixels: int
    kind: str = ""
    meta: dict[str, Any] = field(default_factory=dict)  # file-level, copied into every frame
    warnings: list[str] = field(default_factory=list)  # file-level
    n_declared: int = 0  # sections the file declares (decides the frame_id form)
    section: int | None = None  # section being read, for error messages

    def error(self, problem: str, section: int | None = None) -> ReadError:
        return ReadError(self.path, problem, section if section is not None else self.section)

    def warn(self, message: str, plane: _Plane | None = None) -> None:
        where = self.path if self.section is None else f"{self.path}#{self.section}"
        log.warning("%s: %s", where, message)
        (plane.warnings if plane is not None else self.warnings).append(message)

    def problem(self, message: str, plane: _Plane | None = None) -> None:
        """A header inconsistency: fatal when strict, a logged guess when permissive."""
        if not self.permissive:
            raise self.error(message)
        self.warn(message, plane)


@contextmanager
def _translated(ctx: _Ctx) -> Iterator[None]:
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


@contextmanager
def _recorded_warnings(ctx: _Ctx) -> Iterator[None]:
    """Route Python warnings from a library (mrcfile warns in permissive mode) into the log/meta.

    `warnings.catch_warnings` is process-global; a warning raised by another thread in the same
    instant may be attributed to this file. It is only ever extra text in ``meta["warnings"]``.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        ctx.warn(f"{w.category.__name__}: {w.message}")


def _check_shape(ctx: _Ctx, rows: int, cols: int, section: int | None = None) -> None:
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


def _nm_per_unit(unit: Any) -> float | None:
    """nm per `unit`, for the spellings the formats use; None for pixels, 1/nm, '' and the like."""
    if isinstance(unit, bytes):
        unit = unit.decode("latin-1")
    u = str(unit).strip().lower()
    # Berkeley EMD writes units as "[n_m]"; ImageJ escapes µ as "\u00B5"
    u = u.strip("[]").replace("_", "").replace(" ", "")
    u = u.replace("\\u00b5", "u").replace("µ", "u").replace("μ", "u").replace("å", "a")
    return _NM_PER_UNIT.get(u)


def _set_pixel_size(
    ctx: _Ctx, plane: _Plane, value: float | None, unit: Any, source: str, value_y: float | None = None
) -> None:
    """Store a pixel size given in `unit` on `plane` if it is usable, else say why not in meta."""
    if value is None:
        return
    factor = _nm_per_unit(unit)
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


def _jsonable(value: Any, depth: int = 0) -> Any:
    """A JSON-safe copy of header/tag values (numpy scalars, bytes, small arrays, nested dicts)."""
    if depth > 8:
        return str(value)
    if isinstance(value, enum.Enum):  # tifffile's COMPRESSION, PHOTOMETRIC … (IntEnum is an int)
        return value.name
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, np.generic):
        return _jsonable(value.item(), depth + 1)
    if isinstance(value, bytes):
        return value.rstrip(b"\0").decode("latin-1")
    if isinstance(value, np.ndarray):
        if value.size > 64:
            return f"<array {value.shape} {value.dtype}>"
        return _jsonable(value.tolist(), depth + 1)
    if isinstance(value, dict):
        return {str(k): _jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, depth + 1) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def _parse_datetime(text: Any, formats: tuple[str, ...]) -> datetime | None:
    if not isinstance(text, str):
        return None
    text = " ".join(text.strip().split())
    for fmt in formats:
        try:
            return datetime.strptime(text, fmt)
        except ValueError:
            continue
    return None


# --------------------------------------------------------------------------------------------
# MRC (mrcfile)


@contextmanager
def _mrc_planes(ctx: _Ctx) -> Iterator[list[_Plane]]:
    import mrcfile
    from mrcfile import utils as mrc_utils

    with _recorded_warnings(ctx):
        try:
            with mrcfile.open(ctx.path, mode="r", permissive=ctx.permissive, header_only=True) as mrc:
                header = mrc.header.copy()
                voxel = mrc.voxel_size.copy()
                labels = [label.strip() for label in mrc.get_labels()]
        except ValueError as exc:  # mrcfile's way of saying "this is not a valid MRC header"
            raise ctx.error(f"not a valid MRC file: {exc}") from exc

    mode = int(header.mode)
    if mode not in SUPPORTED_MRC_MODES:
        raise ctx.error(
            f"unsupported MRC mode {mode} ({MRC_MODE_NAMES.get(mode, 'unknown')}); "
            f"supported: {', '.join(map(str, SUPPORTED_MRC_MODES))}"
        )
    nx, ny, nz = int(header.nx), int(header.ny), int(header.nz)
    if min(nx, ny, nz) <= 0:
        raise ctx.error(f"invalid dimensions in header: nx={nx}, ny={ny}, nz={nz}")
    _check_shape(ctx, ny, nx)
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
    section_bytes = nx * ny * dtype.itemsize
    expected = data_start + n_sections * section_bytes
    actual = os.path.getsize(ctx.path)
    available = n_sections
    if actual < expected:
        complete = max(0, (actual - data_start) // section_bytes)
        msg = (
            f"truncated: the header declares {n_sections} section(s) of {nx}×{ny} "
            f"{dtype.name} ({expected} bytes) but the file has {actual} bytes"
        )
        if not ctx.permissive:
            raise ctx.error(msg + "; permissive=True reads the complete sections")
        if complete == 0:
            raise ctx.error(msg + "; not one section is complete")
        ctx.warn(f"{msg}; reading the {complete} complete section(s)")
        available = complete
    elif actual > expected:
        ctx.warn(f"file is {actual - expected} bytes longer than the header declares")

    ctx.n_declared = nz
    ctx.meta.update(
        format="mrc",
        mode=mode,
        dtype=np.dtype(dtype).newbyteorder("=").name,
        nx=nx,
        ny=ny,
        nz=nz,
        mx=int(header.mx),
        my=int(header.my),
        mz=int(header.mz),
        ispg=int(header.ispg),
        voxel_size_angstrom=[float(voxel.x), float(voxel.y), float(voxel.z)],
        cella_angstrom=_jsonable(header.cella.tolist()),
        labels=[label for label in labels if label],
        exttyp=_jsonable(bytes(header.exttyp)),
        nsymbt=nsymbt,
        nversion=int(header.nversion),
        dmin=_jsonable(float(header.dmin)),
        dmax=_jsonable(float(header.dmax)),
        dmean=_jsonable(float(header.dmean)),
        rms=_jsonable(float(header.rms)),
    )

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
            data = np.memmap(
                ctx.path, dtype=dtype, mode="r", offset=data_start, shape=(available, ny, nx)
            )

        # one header, one pixel size: work it out (and log about it) once, not per section
        first = _Plane(shape=(ny, nx), load=partial(_copy_section, data, 0))
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


def _copy_section(data: np.ndarray, k: int, _plane: _Plane) -> np.ndarray:
    return np.array(data[k])  # a copy: the memory map closes with the file


def _mrc_pixel_size(ctx: _Ctx, plane: _Plane, voxel: np.recarray) -> None:
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
        _set_pixel_size(ctx, plane, vx, "angstrom", "mrc voxel_size", value_y=vy)


# --------------------------------------------------------------------------------------------
# TIFF (tifffile; Pillow decodes what tifffile needs imagecodecs for)


_TIFF_DATETIME_FORMATS = ("%Y:%m:%d %H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S")
_TIFF_TAGS_IN_META = (
    "ImageWidth",
    "ImageLength",
    "BitsPerSample",
    "SamplesPerPixel",
    "SampleFormat",
    "Compression",
    "Photometric",
    "PlanarConfiguration",
    "Make",
    "Model",
    "Software",
    "Artist",
    "DateTime",
    "XResolution",
    "YResolution",
    "ResolutionUnit",
)


@contextmanager
def _tiff_planes(ctx: _Ctx) -> Iterator[list[_Plane]]:
    import tifffile

    with tifffile.TiffFile(ctx.path) as tif:
        ctx.meta["format"] = "tiff"
        if tif.is_imagej:
            keys = ("unit", "spacing", "images", "slices", "frames", "channels", "finterval")
            imagej = tif.imagej_metadata or {}
            ctx.meta["imagej"] = _jsonable({k: v for k, v in imagej.items() if k in keys})
        if tif.is_fei:
            ctx.meta["fei"] = _jsonable(tif.fei_metadata)

        planes: list[_Plane] = []
        for s_index, series in enumerate(tif.series):
            axes, shape = series.axes, tuple(series.shape)
            if "Y" not in axes or "X" not in axes:
                raise ctx.error(f"series {s_index} has axes {axes!r}; expected an image with Y and X")
            rows, cols = shape[axes.index("Y")], shape[axes.index("X")]
            n_planes = math.prod(n for n, a in zip(shape, axes) if a not in "YXS")
            pages = list(series.pages)
            if len(pages) == n_planes and all(page is not None for page in pages):
                loads = [partial(_tiff_page_pixels, ctx, page) for page in pages]
            else:
                # ImageJ "truncated" stacks keep one IFD for every image; SGI depth puts several
                # images in one page: index into the series instead
                whole = _TiffSeries(ctx, series, s_index)
                loads = [partial(whole.plane, k) for k in range(n_planes)]
                pages = [series.keyframe] * n_planes
            for page, load in zip(pages, loads):
                meta = {"tiff_series": s_index, "tiff_axes": axes}
                plane = _Plane(shape=(rows, cols), load=load, meta=meta)
                _tiff_describe(ctx, tif, page, plane)
                planes.append(plane)
        if not planes:
            raise ctx.error("TIFF file holds no image")
        ctx.n_declared = len(planes)
        yield planes


class _TiffSeries:
    """2-D planes of one series, mapped into memory when contiguous, else decoded once."""

    def __init__(self, ctx: _Ctx, series: Any, s_index: int) -> None:
        self.ctx, self.series, self.s_index = ctx, series, s_index
        self.array: np.ndarray | None = None

    def plane(self, k: int, _plane: _Plane) -> np.ndarray:
        import tifffile

        if self.array is None:
            if self.series.dataoffset is not None:
                self.array = tifffile.memmap(self.ctx.path, series=self.s_index, mode="r")
            else:
                self.array = self.series.asarray()
        axes = self.series.axes
        others = [i for i, a in enumerate(axes) if a not in "YXS"]
        index = np.unravel_index(k, [self.array.shape[i] for i in others]) if others else ()
        key: list[Any] = [slice(None)] * len(axes)
        for axis, i in zip(others, index):
            key[axis] = int(i)
        plane_axes = "".join(a for a in axes if a in "YXS")
        return _normalise_axes(np.array(self.array[tuple(key)]), plane_axes)


def _normalise_axes(arr: np.ndarray, axes: str) -> np.ndarray:
    """An array with tifffile axes (e.g. ``SYX``, ``YXS``, ``ZYX`` with Z=1) → (Y, X) or (Y, X, S)."""
    if arr.ndim != len(axes) or "Y" not in axes or "X" not in axes:
        raise ValueError(f"array of shape {arr.shape} does not match TIFF axes {axes!r}")
    keep = [axes.index("Y"), axes.index("X")] + ([axes.index("S")] if "S" in axes else [])
    other = [i for i in range(arr.ndim) if i not in keep]
    if any(arr.shape[i] != 1 for i in other):
        raise ValueError(f"TIFF page with axes {axes!r} and shape {arr.shape} is not one 2-D image")
    return np.transpose(arr, other + keep).reshape([arr.shape[i] for i in keep])


def _tiff_page_pixels(ctx: _Ctx, page: Any, _plane: _Plane) -> np.ndarray:
    try:
        arr = page.asarray()
    except (ValueError, KeyError) as exc:
        if "imagecodecs" not in str(exc):
            raise
        # tifffile needs the optional imagecodecs package for LZW, JPEG …; Pillow's libtiff
        # decodes the common ones, so a plain install still reads LZW micrographs
        arr = _pillow_tiff_page(ctx, page, exc)
    return _normalise_axes(arr, page.axes)


def _pillow_tiff_page(ctx: _Ctx, page: Any, original: Exception) -> np.ndarray:
    from PIL import Image

    with Image.open(ctx.path, formats=["TIFF"]) as img:
        img.seek(page.index)
        arr = np.asarray(img)
    want = tuple(page.shape)
    if arr.shape != want and arr.shape != tuple(d for d in want if d != 1):
        raise ctx.error(f"cannot decode {page.compression.name} TIFF page {page.index}: {original}")
    # Pillow widens some types (int16 → int32); the page's own dtype is the truth
    return arr.astype(page.dtype, copy=False).reshape(want)


def _tiff_describe(ctx: _Ctx, tif: Any, page: Any, plane: _Plane) -> None:
    plane.meta["tiff_page"] = _jsonable(page.index)
    page = page if hasattr(page, "tags") else page.keyframe  # TiffFrame: tags live on the keyframe
    tags = page.tags
    plane.meta["tiff_tags"] = {
        name: _jsonable(tags[name].value) for name in _TIFF_TAGS_IN_META if name in tags
    }
    description = tags["ImageDescription"].value if "ImageDescription" in tags else None
    if isinstance(description, str) and description.strip():
        plane.meta["tiff_tags"]["ImageDescription"] = description[:2000]
    photometric = getattr(page.photometric, "name", str(page.photometric))
    plane.colour = photometric in ("RGB", "YCBCR", "PALETTE", "CIELAB", "SEPARATED")
    if photometric == "PALETTE":
        plane.load = partial(_palette_pixels, ctx, page, plane.load)
    plane.acquired_at = _parse_datetime(
        tags["DateTime"].value if "DateTime" in tags else None, _TIFF_DATETIME_FORMATS
    )
    _tiff_pixel_size(ctx, tif, page, plane)


def _palette_pixels(
    ctx: _Ctx, page: Any, load: Callable[[_Plane], np.ndarray], plane: _Plane
) -> np.ndarray:
    # palette indices are not intensities: map them through the colour table, then treat as RGB
    if not ctx.permissive:
        raise ctx.error("palette-colour TIFF; expected greyscale (permissive=True converts)")
    indices = load(plane)
    return np.moveaxis(np.asarray(page.colormap)[:, indices], 0, -1)


def _tiff_pixel_size(ctx: _Ctx, tif: Any, page: Any, plane: _Plane) -> None:
    import tifffile

    if tif.is_fei:
        scan = (tif.fei_metadata or {}).get("Scan", {})
        if scan.get("PixelWidth"):
            source = "FEI [Scan] PixelWidth"
            _set_pixel_size(ctx, plane, scan["PixelWidth"], "m", source, scan.get("PixelHeight"))
            return
    if "XResolution" not in page.tags:
        return
    xres, yres = page.get_resolution()
    if not xres or not yres:
        return
    if tif.is_imagej:
        unit = (tif.imagej_metadata or {}).get("unit")
        if unit is not None and _nm_per_unit(unit) is not None:
            _set_pixel_size(ctx, plane, 1.0 / xres, unit, "ImageJ unit + XResolution", 1.0 / yres)
            return
    resunit = page.resolutionunit
    unit = {tifffile.RESUNIT.CENTIMETER: "cm", tifffile.RESUNIT.INCH: "inch"}.get(resunit)
    if unit is None:
        return
    nm_per_unit = 2.54e7 if unit == "inch" else 1e7
    nm = nm_per_unit / xres
    if nm >= 1000:
        # a print/display resolution (72 dpi, 300 dpi …), not how finely the specimen was sampled
        plane.meta["pixel_size_note"] = f"TIFF resolution {xres:g} px/{unit} is a display DPI, ignored"
        return
    _set_pixel_size(ctx, plane, nm, "nm", f"TIFF XResolution ({unit})", nm_per_unit / yres)


# --------------------------------------------------------------------------------------------
# DM3 / DM4 (ncempy.io.dm)


_DM_DATE_FORMATS = (
    "%m/%d/%Y %I:%M:%S %p",  # GMS default on an en-US system
    "%m/%d/%y %I:%M:%S %p",
    "%Y-%m-%d %H:%M:%S",
    "%d.%m.%Y %H:%M:%S",  # unambiguous thanks to the dots
)


@cache
def _file_dm_class() -> type:
    from ncempy.io import dm

    class FileDM(dm.fileDM):
        """ncempy's fileDM whose destructor tolerates numpy views still pointing into its map."""

        __slots__ = ()

        def __del__(self) -> None:
            # After a failed parse, views into the memory map live on in the traceback, so closing
            # the map raises BufferError (or, if __init__ failed early, there is no map at all).
            # The map goes with the last view; an "Exception ignored in __del__" during garbage
            # collection only adds noise (and under pytest on CPython 3.11.7 it broke unrelated
            # AST compilation, python/cpython#106905).
            try:
                super().__del__()
            except (BufferError, AttributeError):
                pass

    return FileDM


@contextmanager
def _dm_planes(ctx: _Ctx) -> Iterator[list[_Plane]]:
    # on_memory maps the file for the tag parse: ~4× faster than file reads on a real tag tree
    with _file_dm_class()(ctx.path, on_memory=True) as f:
        ctx.meta["format"] = os.path.splitext(ctx.path)[1].lower().lstrip(".")
        # ncempy's getDataset/getSlice convention: with more than one object the first is the
        # thumbnail and dataset i is object i + 1
        n_objects = int(f.numObjects)
        n_datasets = n_objects - 1 if n_objects > 1 else n_objects
        planes: list[_Plane] = []
        skipped = []
        for index in range(n_datasets):
            obj = index + 1 if n_objects > 1 else index
            ndim = int(f.dataShape[obj])
            rows, cols, depth = int(f.ySize[obj]), int(f.xSize[obj]), int(f.zSize[obj])
            if ndim not in (2, 3):
                skipped.append({"dataset": index, "ndim": ndim})
                continue
            try:
                tags = f.getMetadata(index)
            except Exception:  # metadata is a nice-to-have; the pixels are what matter
                tags = {}
            acquired = _dm_acquired_at(tags)
            for z in range(depth if ndim == 3 else 1):
                plane = _Plane(shape=(rows, cols), load=partial(_dm_slice, ctx, f, index, z))
                plane.meta.update(
                    dm_dataset=index, dm_data_type=int(f.dataType[obj]), dm_tags=_jsonable(tags)
                )
                plane.acquired_at = acquired
                planes.append(plane)
        if skipped:
            ctx.meta["skipped_datasets"] = skipped
        if not planes:
            raise ctx.error(f"no 2-D image in the DM file (datasets: {skipped or 'none'})")
        ctx.n_declared = len(planes)
        yield planes


def _dm_slice(ctx: _Ctx, f: Any, index: int, z: int, plane: _Plane) -> np.ndarray:
    out = f.getSlice(index, z)
    units, sizes = out.get("pixelUnit", []), out.get("pixelSize", [])
    if len(sizes) >= 2 and len(units) >= 2:
        _set_pixel_size(ctx, plane, sizes[-1], units[-1], "DM calibration", value_y=sizes[-2])
    return out["data"]


def _dm_acquired_at(tags: dict[str, Any]) -> datetime | None:
    filetime = tags.get("DataBar Acquisition Time (OS)")
    # a Windows FILETIME (100 ns ticks since 1601, UTC), stored as a double; sane range only
    if isinstance(filetime, (int, float, np.number)) and 1e17 < float(filetime) < 3e18:
        return datetime(1601, 1, 1, tzinfo=timezone.utc) + timedelta(microseconds=float(filetime) / 10)
    date, time = tags.get("DataBar Acquisition Date"), tags.get("DataBar Acquisition Time")
    if isinstance(date, str) and isinstance(time, str):
        return _parse_datetime(f"{date} {time}", _DM_DATE_FORMATS)
    return None


# --------------------------------------------------------------------------------------------
# SER (ncempy.io.ser, FEI/Thermo TIA)


@contextmanager
def _ser_planes(ctx: _Ctx) -> Iterator[list[_Plane]]:
    from ncempy.io import ser

    with ser.fileSER(ctx.path) as f:
        types = getattr(f, "_dictDataType", None)
        if isinstance(types, dict) and types.get(1) == " <u1":
            # ncempy ≤ 1.16 spells uint8 " <u1", which numpy rejects; fix it for this file only
            f._dictDataType = {**types, 1: "<u1"}
        head = f.head
        if int(head["DataTypeID"]) != 0x4122:
            raise ctx.error("SER file holds 1-D spectra, not images")
        n = int(head["ValidNumberElements"])
        if n <= 0:
            raise ctx.error("SER file holds no image (ValidNumberElements = 0)")
        extra = f.getMetadata()
        ctx.meta.update(
            format="ser",
            # the offset tables are as long as the series: file internals, not metadata
            ser_header=_jsonable(
                {k: v for k, v in extra.items() if k not in ("DataOffsetArray", "TagOffsetArray")}
            ),
        )
        emi_time = _parse_datetime(extra.get("AcquireDate"), ("%a %b %d %H:%M:%S %Y",))
        planes = [
            _Plane(shape=None, load=partial(_ser_element, ctx, f, i), acquired_at=emi_time)
            for i in range(n)
        ]
        ctx.n_declared = n
        yield planes


def _ser_element(ctx: _Ctx, f: Any, index: int, plane: _Plane) -> np.ndarray:
    try:
        data, element = f.getDataset(index)
    except ValueError as exc:  # np.fromfile came up short, so the reshape failed
        raise ctx.error(f"truncated or corrupt SER element {index}: {exc}") from exc
    calibration = element.get("Calibration", ())
    if len(calibration) >= 2:
        # TIA calibrates in SI units: metres per pixel for images
        _set_pixel_size(
            ctx,
            plane,
            calibration[0]["CalibrationDelta"],
            "m",
            "SER calibration",
            value_y=calibration[1]["CalibrationDelta"],
        )
    plane.meta["ser_element"] = _jsonable(element)
    get_tag = getattr(f, "_getTag", None)  # per-element time; private in ncempy, hence guarded
    if get_tag is not None:
        try:
            seconds = int(get_tag(index).get("Time", 0))
        except Exception:
            seconds = 0
        if seconds > 0:
            plane.acquired_at = datetime.fromtimestamp(seconds, tz=timezone.utc)
    return data


# --------------------------------------------------------------------------------------------
# Berkeley EMD (ncempy.io.emd on HDF5)


@contextmanager
def _emd_planes(ctx: _Ctx) -> Iterator[list[_Plane]]:
    import h5py
    from ncempy.io import emd

    if not h5py.is_hdf5(ctx.path):
        raise ctx.error("not an EMD file (not HDF5)")
    try:
        f = emd.fileEMD(ctx.path, readonly=True)
    except emd.NoEmdDataSets:
        raise ctx.error(
            "no Berkeley EMD data group in the file (Thermo Fisher Velox .emd is not supported)"
        ) from None
    with f:
        ctx.meta.update(format="emd", emd_metadata=_jsonable(dict(f.getMetadata(0))))
        planes: list[_Plane] = []
        skipped = []
        for group in f.list_emds:
            dset = group["data"]
            if dset.ndim not in (2, 3):
                skipped.append({"group": group.name, "shape": list(dset.shape)})
                continue
            rows, cols = int(dset.shape[-2]), int(dset.shape[-1])
            dims = f.get_emddims(group)
            # C order: the last axis is x; a 3-D group is taken as a stack along its first axis
            steps = [float(d[0][1] - d[0][0]) if len(d[0]) > 1 else None for d in dims]
            for k in range(dset.shape[0] if dset.ndim == 3 else 1):
                plane = _Plane(
                    shape=(rows, cols),
                    load=partial(_h5_plane, dset, k),
                )
                plane.meta.update(
                    emd_group=group.name,
                    emd_shape=list(dset.shape),
                    emd_dims=[{"name": _jsonable(d[1]), "units": _jsonable(d[2])} for d in dims],
                )
                _set_pixel_size(ctx, plane, steps[-1], dims[-1][2], "EMD dim vector", value_y=steps[-2])
                planes.append(plane)
        if skipped:
            ctx.meta["skipped_datasets"] = skipped
        if not planes:
            raise ctx.error(f"no 2-D image in the EMD file (groups: {skipped})")
        ctx.n_declared = len(planes)
        yield planes


def _h5_plane(dset: Any, k: int, _plane: _Plane) -> np.ndarray:
    return np.asarray(dset[k] if dset.ndim == 3 else dset[()])  # h5py reads just this slice


# --------------------------------------------------------------------------------------------
# PNG (Pillow)


@contextmanager
def _png_planes(ctx: _Ctx) -> Iterator[list[_Plane]]:
    from PIL import Image

    try:
        # formats= keeps Pillow from trying every plugin on a mislabelled file (EPS would run
        # Ghostscript): a .png must be a PNG
        img = Image.open(ctx.path, formats=["PNG"])
    except Image.DecompressionBombError as exc:
        raise ctx.error(f"image too large for Pillow's decompression-bomb guard: {exc}") from exc
    with img:
        cols, rows = img.size
        n = int(getattr(img, "n_frames", 1))
        ctx.meta.update(
            format="png",
            png_mode=img.mode,
            png_info=_jsonable(
                {k: v for k, v in img.info.items() if isinstance(v, (str, int, float, tuple))}
            ),
        )

        def load(k: int, plane: _Plane) -> np.ndarray:
            img.seek(k)
            frame = img
            if img.mode in ("P", "PA"):
                if not ctx.permissive:
                    raise ctx.error("palette-colour PNG; expected greyscale (permissive=True converts)")
                frame = img.convert("RGBA" if "transparency" in img.info or img.mode == "PA" else "RGB")
            return np.array(frame)

        planes = [_Plane(shape=(rows, cols), load=partial(load, k)) for k in range(n)]
        ctx.n_declared = n
        yield planes


# --------------------------------------------------------------------------------------------
# per-frame checks and the public API


_FORMATS: tuple[tuple[tuple[str, ...], str, Callable[[_Ctx], Any]], ...] = (
    (MRC_SUFFIXES, "MRC", _mrc_planes),
    (TIFF_SUFFIXES, "TIFF", _tiff_planes),
    (DM_SUFFIXES, "DM3/DM4", _dm_planes),
    (SER_SUFFIXES, "SER", _ser_planes),
    (EMD_SUFFIXES, "EMD", _emd_planes),
    (PNG_SUFFIXES, "PNG", _png_planes),
)
_OPENERS = {suffix: (kind, opener) for suffixes, kind, opener in _FORMATS for suffix in suffixes}


def _context(
    path: str | os.PathLike[str], permissive: bool, max_pixels: int
) -> tuple[_Ctx, Callable[[_Ctx], Any]]:
    ctx = _Ctx(path=os.fspath(path), permissive=permissive, max_pixels=int(max_pixels))
    suffix = os.path.splitext(ctx.path)[1].lower()
    if suffix not in _OPENERS:
        supported = ", ".join(SUPPORTED_SUFFIXES)
        raise ctx.error(f"unsupported file type {suffix or '(no suffix)'!r}; supported: {supported}")
    ctx.kind, opener = _OPENERS[suffix]
    # os.stat's OSError (missing, no permission) is deliberately not a ReadError
    if os.stat(ctx.path).st_size == 0:
        raise ctx.error("empty file (0 bytes)")
    return ctx, opener


def _to_grey(ctx: _Ctx, plane: _Plane, arr: np.ndarray) -> np.ndarray:
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


def _finish_pixels(ctx: _Ctx, plane: _Plane, arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3:
        arr = _to_grey(ctx, plane, arr)
    if arr.ndim != 2:
        raise ctx.error(f"expected a 2-D image, got an array of shape {arr.shape}")
    if plane.shape is None:
        _check_shape(ctx, *arr.shape)
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
            if n_bad == arr.size:
                raise ctx.error(msg + "; no finite pixel left")
            if not ctx.permissive:
                raise ctx.error(msg + "; permissive=True replaces them by the median")
            fill = np.median(arr[finite])
            arr = np.where(finite, arr, fill).astype(arr.dtype)
            ctx.warn(f"{msg}; replaced by the median of the finite pixels ({float(fill):g})", plane)
            plane.meta["nonfinite_pixels"] = n_bad
    # an owned, C-contiguous array: never a view into a memory map that is about to close
    if type(arr) is np.ndarray and arr.flags.owndata and arr.flags.c_contiguous:
        return arr
    return np.array(arr, order="C")


def _frame(ctx: _Ctx, plane: _Plane, section: int) -> Frame:
    stack = ctx.n_declared > 1
    ctx.section = section if stack else None
    if plane.shape is not None:
        _check_shape(ctx, *plane.shape)
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
    >>> import mrcfile, numpy as np, tempfile, os
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
                frame = _frame(ctx, planes[section], section)
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
    >>> import tifffile, numpy as np, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "pages.tif")
    >>> tifffile.imwrite(path, np.zeros((3, 32, 32), np.uint16), photometric="minisblack")
    >>> count_sections(path)
    3
    """
    ctx, opener = _context(path, permissive, max_pixels)
    with _translated(ctx), opener(ctx) as planes:
        return len(planes)
