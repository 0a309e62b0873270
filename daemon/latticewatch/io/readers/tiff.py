"""TIFF files (tifffile; Pillow decodes the compressions tifffile needs imagecodecs for).

Multi-page files, ImageJ hyperstacks and multi-series files give one frame per 2-D plane. The pixel
size comes from FEI/Thermo metadata, ImageJ's unit, or a resolution tag fine enough to be a sampling.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import numpy as np

from latticewatch.io.readers.core import Plane, ReadContext, header_time, jsonable, nm_per_unit, set_pixel_size

TIFF_SUFFIXES = (".tif", ".tiff")
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
def tiff_planes(ctx: ReadContext) -> Iterator[list[Plane]]:
    """The 2-D planes of every series of a TIFF file, each with its tags, time and pixel size.

    Examples
    --------
    >>> import os, tempfile, tifffile
    >>> from latticewatch.io.readers.core import DEFAULT_MAX_PIXELS
    >>> path = os.path.join(tempfile.mkdtemp(), "pages.tif")
    >>> tifffile.imwrite(path, np.zeros((3, 32, 32), np.uint16), photometric="minisblack")
    >>> with tiff_planes(ReadContext(path, permissive=False, max_pixels=DEFAULT_MAX_PIXELS)) as planes:
    ...     len(planes), planes[0].shape
    (3, (32, 32))
    """
    import tifffile

    with tifffile.TiffFile(ctx.path) as tif:
        ctx.meta["format"] = "tiff"
        if tif.is_imagej:
            keys = ("unit", "spacing", "images", "slices", "frames", "channels", "finterval")
            imagej = tif.imagej_metadata or {}
            ctx.meta["imagej"] = jsonable({k: v for k, v in imagej.items() if k in keys})
        if tif.is_fei:
            ctx.meta["fei"] = jsonable(tif.fei_metadata)

        planes: list[Plane] = []
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
                plane = Plane(shape=(rows, cols), load=load, meta=meta)
                _tiff_describe(ctx, tif, page, plane)
                planes.append(plane)
        if not planes:
            raise ctx.error("TIFF file holds no image")
        ctx.n_declared = len(planes)
        yield planes


class _TiffSeries:
    """2-D planes of one series, mapped into memory when contiguous, else decoded once."""

    def __init__(self, ctx: ReadContext, series: Any, s_index: int) -> None:
        self.ctx, self.series, self.s_index = ctx, series, s_index
        self.array: np.ndarray | None = None

    def plane(self, k: int, _plane: Plane) -> np.ndarray:
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


def _tiff_page_pixels(ctx: ReadContext, page: Any, _plane: Plane) -> np.ndarray:
    try:
        arr = page.asarray()
    except (ValueError, KeyError) as exc:
        if "imagecodecs" not in str(exc):
            raise
        # tifffile needs the optional imagecodecs package for LZW, JPEG …; Pillow's libtiff
        # decodes the common ones, so a plain install still reads LZW micrographs
        arr = _pillow_tiff_page(ctx, page, exc)
    return _normalise_axes(arr, page.axes)


def _pillow_tiff_page(ctx: ReadContext, page: Any, original: Exception) -> np.ndarray:
    from PIL import Image

    with Image.open(ctx.path, formats=["TIFF"]) as img:
        img.seek(page.index)
        arr = np.asarray(img)
    want = tuple(page.shape)
    if arr.shape != want and arr.shape != tuple(d for d in want if d != 1):
        raise ctx.error(f"cannot decode {page.compression.name} TIFF page {page.index}: {original}")
    # Pillow widens some types (int16 → int32); the page's own dtype is the truth
    return arr.astype(page.dtype, copy=False).reshape(want)


def _tiff_describe(ctx: ReadContext, tif: Any, page: Any, plane: Plane) -> None:
    plane.meta["tiff_page"] = jsonable(page.index)
    page = page if hasattr(page, "tags") else page.keyframe  # TiffFrame: tags live on the keyframe
    tags = page.tags
    plane.meta["tiff_tags"] = {
        name: jsonable(tags[name].value) for name in _TIFF_TAGS_IN_META if name in tags
    }
    description = tags["ImageDescription"].value if "ImageDescription" in tags else None
    if isinstance(description, str) and description.strip():
        plane.meta["tiff_tags"]["ImageDescription"] = description[:2000]
    photometric = getattr(page.photometric, "name", str(page.photometric))
    plane.colour = photometric in ("RGB", "YCBCR", "PALETTE", "CIELAB", "SEPARATED")
    if photometric == "PALETTE":
        plane.load = partial(_palette_pixels, ctx, page, plane.load)
    plane.acquired_at = header_time(
        tags["DateTime"].value if "DateTime" in tags else None, _TIFF_DATETIME_FORMATS
    )
    _tiff_pixel_size(ctx, tif, page, plane)


def _palette_pixels(
    ctx: ReadContext, page: Any, load: Callable[[Plane], np.ndarray], plane: Plane
) -> np.ndarray:
    # palette indices are not intensities: map them through the colour table, then treat as RGB
    if not ctx.permissive:
        raise ctx.error("palette-colour TIFF; expected greyscale (permissive=True converts)")
    indices = load(plane)
    return np.moveaxis(np.asarray(page.colormap)[:, indices], 0, -1)


def _tiff_pixel_size(ctx: ReadContext, tif: Any, page: Any, plane: Plane) -> None:
    import tifffile

    if tif.is_fei:
        scan = (tif.fei_metadata or {}).get("Scan", {})
        if scan.get("PixelWidth"):
            source = "FEI [Scan] PixelWidth"
            set_pixel_size(ctx, plane, scan["PixelWidth"], "m", source, scan.get("PixelHeight"))
            return
    if "XResolution" not in page.tags:
        return
    xres, yres = page.get_resolution()
    if not xres or not yres:
        return
    if tif.is_imagej:
        unit = (tif.imagej_metadata or {}).get("unit")
        if unit is not None and nm_per_unit(unit) is not None:
            set_pixel_size(ctx, plane, 1.0 / xres, unit, "ImageJ unit + XResolution", 1.0 / yres)
            return
    resunit = page.resolutionunit
    unit = {tifffile.RESUNIT.CENTIMETER: "cm", tifffile.RESUNIT.INCH: "inch"}.get(resunit)
    if unit is None:
        return
    nm_per_resunit = 2.54e7 if unit == "inch" else 1e7
    nm = nm_per_resunit / xres
    if nm >= 1000:
        # a print/display resolution (72 dpi, 300 dpi …), not how finely the specimen was sampled
        plane.meta["pixel_size_note"] = f"TIFF resolution {xres:g} px/{unit} is a display DPI, ignored"
        return
    set_pixel_size(ctx, plane, nm, "nm", f"TIFF XResolution ({unit})", nm_per_resunit / yres)
