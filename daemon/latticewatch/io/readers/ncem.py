"""Gatan DM3/DM4, FEI/Thermo TIA SER and Berkeley EMD files, all decoded by ncempy.

Each gives one frame per 2-D image it holds (3-D data sets and SER series section by section),
with ncempy's per-axis calibration as the pixel size.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from functools import cache, partial
from typing import Any

import numpy as np

from latticewatch.io.readers.core import Plane, ReadContext, header_time, jsonable, set_pixel_size

DM_SUFFIXES = (".dm3", ".dm4")
SER_SUFFIXES = (".ser",)
EMD_SUFFIXES = (".emd",)


def _declare_images(ctx: ReadContext, planes: list[Plane], skipped: list[dict[str, Any]], where: str) -> None:
    """Note the data sets that are not 2-D/3-D images; refuse a file that holds no image at all."""
    if skipped:
        ctx.meta["skipped_datasets"] = skipped
    if not planes:
        raise ctx.error(f"no 2-D image in the {where}")
    ctx.n_declared = len(planes)


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
def dm_planes(ctx: ReadContext) -> Iterator[list[Plane]]:
    """The 2-D images of a DM3/DM4 file (3-D data sets slice by slice), thumbnail left out.

    No package writes DM files, so there is no example here; ``tests/io/readers/test_ncem.py`` builds
    minimal ones byte by byte.
    """
    # on_memory maps the file for the tag parse: ~4× faster than file reads on a real tag tree
    with _file_dm_class()(ctx.path, on_memory=True) as f:
        ctx.meta["format"] = os.path.splitext(ctx.path)[1].lower().lstrip(".")
        # ncempy's getDataset/getSlice convention: with more than one object the first is the
        # thumbnail and dataset i is object i + 1
        n_objects = int(f.numObjects)
        n_datasets = n_objects - 1 if n_objects > 1 else n_objects
        planes: list[Plane] = []
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
                plane = Plane(shape=(rows, cols), load=partial(_dm_slice, ctx, f, index, z))
                plane.meta.update(
                    dm_dataset=index, dm_data_type=int(f.dataType[obj]), dm_tags=jsonable(tags)
                )
                plane.acquired_at = acquired
                planes.append(plane)
        _declare_images(ctx, planes, skipped, f"DM file (datasets: {skipped or 'none'})")
        yield planes


def _dm_slice(ctx: ReadContext, f: Any, index: int, z: int, plane: Plane) -> np.ndarray:
    out = f.getSlice(index, z)
    units, sizes = out.get("pixelUnit", []), out.get("pixelSize", [])
    if len(sizes) >= 2 and len(units) >= 2:
        set_pixel_size(ctx, plane, sizes[-1], units[-1], "DM calibration", value_y=sizes[-2])
    return out["data"]


def _dm_acquired_at(tags: dict[str, Any]) -> datetime | None:
    filetime = tags.get("DataBar Acquisition Time (OS)")
    # a Windows FILETIME (100 ns ticks since 1601, UTC), stored as a double; sane range only
    if isinstance(filetime, (int, float, np.number)) and 1e17 < float(filetime) < 3e18:
        return datetime(1601, 1, 1, tzinfo=timezone.utc) + timedelta(microseconds=float(filetime) / 10)
    date, time = tags.get("DataBar Acquisition Date"), tags.get("DataBar Acquisition Time")
    if isinstance(date, str) and isinstance(time, str):
        return header_time(f"{date} {time}", _DM_DATE_FORMATS)
    return None


# --------------------------------------------------------------------------------------------
# SER (ncempy.io.ser, FEI/Thermo TIA)


@contextmanager
def ser_planes(ctx: ReadContext) -> Iterator[list[Plane]]:
    """The images of a TIA SER series; sizes are known only once each element is read.

    No package writes SER files, so there is no example here; ``tests/io/readers/test_ncem.py`` builds
    minimal ones byte by byte.
    """
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
            ser_header=jsonable(
                {k: v for k, v in extra.items() if k not in ("DataOffsetArray", "TagOffsetArray")}
            ),
        )
        emi_time = header_time(extra.get("AcquireDate"), ("%a %b %d %H:%M:%S %Y",))
        planes = [
            Plane(shape=None, load=partial(_ser_element, ctx, f, i), acquired_at=emi_time)
            for i in range(n)
        ]
        ctx.n_declared = n
        yield planes


def _ser_element(ctx: ReadContext, f: Any, index: int, plane: Plane) -> np.ndarray:
    try:
        data, element = f.getDataset(index)
    except ValueError as exc:  # np.fromfile came up short, so the reshape failed
        raise ctx.error(f"truncated or corrupt SER element {index}: {exc}") from exc
    calibration = element.get("Calibration", ())
    if len(calibration) >= 2:
        # TIA calibrates in SI units: metres per pixel for images
        set_pixel_size(
            ctx,
            plane,
            calibration[0]["CalibrationDelta"],
            "m",
            "SER calibration",
            value_y=calibration[1]["CalibrationDelta"],
        )
    plane.meta["ser_element"] = jsonable(element)
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
def emd_planes(ctx: ReadContext) -> Iterator[list[Plane]]:
    """The 2-D images of every data group of a Berkeley EMD file (3-D groups as stacks).

    Examples
    --------
    >>> import os, tempfile
    >>> from ncempy.io import emd
    >>> from latticewatch.io.readers.core import DEFAULT_MAX_PIXELS
    >>> path = os.path.join(tempfile.mkdtemp(), "a.emd")
    >>> emd.emdWriter(path, np.zeros((32, 48), np.float32), pixel_size=(0.1, 0.1))
    >>> with emd_planes(ReadContext(path, permissive=False, max_pixels=DEFAULT_MAX_PIXELS)) as planes:
    ...     planes[0].shape
    (32, 48)
    """
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
        ctx.meta.update(format="emd", emd_metadata=jsonable(dict(f.getMetadata(0))))
        planes: list[Plane] = []
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
                plane = Plane(
                    shape=(rows, cols),
                    load=partial(_h5_plane, dset, k),
                )
                plane.meta.update(
                    emd_group=group.name,
                    emd_shape=list(dset.shape),
                    emd_dims=[{"name": jsonable(d[1]), "units": jsonable(d[2])} for d in dims],
                )
                set_pixel_size(ctx, plane, steps[-1], dims[-1][2], "EMD dim vector", value_y=steps[-2])
                planes.append(plane)
        _declare_images(ctx, planes, skipped, f"EMD file (groups: {skipped})")
        yield planes


def _h5_plane(dset: Any, k: int, _plane: Plane) -> np.ndarray:
    return np.asarray(dset[k] if dset.ndim == 3 else dset[()])  # h5py reads just this slice
