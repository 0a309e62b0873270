"""What the reader tests share: random images, MRC files written by mrcfile, and the checks on a read."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from latticewatch.io.readers import ReadError, read_frames

#: The readers' parent logger; each module logs on a child of it.
LOGGER = "latticewatch.io.readers"
RNG = np.random.default_rng(1234)


def random_image(shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """Random pixels of ``dtype`` (within ±1000 for integers), from the readers' shared generator."""
    dt = np.dtype(dtype)
    if dt.kind == "f":
        return RNG.normal(100, 10, size=shape).astype(dt)
    info = np.iinfo(dt)
    return RNG.integers(max(info.min, -1000), min(info.max, 1000), size=shape, endpoint=True).astype(dt)


def read_one(path, **kwargs):
    """The one frame of a single-image file."""
    frames = list(read_frames(path, **kwargs))
    assert len(frames) == 1
    return frames[0]


def json_ok(meta: dict) -> None:
    """A frame's metadata is strict JSON (no NaN, only JSON types)."""
    json.dumps(meta, allow_nan=False)


def raises_read_error(path, match: str, **kwargs) -> ReadError:
    """Reading `path` raises a ReadError that names the file and matches `match`."""
    with pytest.raises(ReadError, match=match) as info:
        list(read_frames(path, **kwargs))
    err = info.value
    assert str(path) in str(err)
    assert err.path == str(path)
    return err


def write_mrc(path: Path, data: np.ndarray, voxel_size=None) -> Path:
    """An MRC file as mrcfile writes it (``voxel_size`` in Å); NaN pixels are allowed."""
    with warnings.catch_warnings(), mrcfile.new(path, overwrite=True) as mrc:
        warnings.filterwarnings("ignore", "Data array contains", RuntimeWarning)  # NaN fixtures
        mrc.set_data(data)
        if voxel_size is not None:
            mrc.voxel_size = voxel_size
    return path


def patch_mrc_header(path: Path, **fields) -> None:
    """Edit header fields in place through mrcfile (as a broken writer would have left them)."""
    original = path.read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # permissive mrcfile warns about the very fields we break
        with mrcfile.open(path, mode="r+", header_only=True, permissive=True) as mrc:
            for name, value in fields.items():
                mrc.header[name] = value
    # a header-only rewrite truncates the file after the header: put the data block back
    path.write_bytes(path.read_bytes()[:1024] + original[1024:])
