"""``latticewatch archive-stats``: compression ratio and bytes by component of an archive."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from latticewatch.sinks.archive.layout import attr_str, read_index
from latticewatch.sinks.archive.reader import archive_files

__all__ = ["archive_stats"]

_COMPONENTS = ("mask", "exact_pixels", "exact_runs", "low", "metadata", "index", "hdf5_overhead")


def _component(name: str) -> str:
    parts = name.strip("/").split("/")
    if parts[0] == "index":
        return "index"
    leaf = "/".join(parts[2:])
    if leaf.startswith("mask/"):
        return "mask"
    if leaf in ("exact/pixels", "exact/low_bytes", "exact/high_bits"):
        return "exact_pixels"
    if leaf == "exact/runs":
        return "exact_runs"
    if leaf.startswith("low/"):
        return "low"
    return "metadata"


def _dataset_bytes(file: Path) -> tuple[dict[str, int], dict[str, int]]:
    """Bytes the datasets of ``file`` take on disk, by component and by frame key."""
    components = dict.fromkeys(_COMPONENTS, 0)
    per_key: dict[str, int] = {}

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            nbytes = obj.id.get_storage_size()
            components[_component(name)] += nbytes
            parts = name.split("/")
            if parts[0] == "frames" and len(parts) > 1:
                per_key[parts[1]] = per_key.get(parts[1], 0) + nbytes

    with h5py.File(file, "r") as f:
        f.visititems(visit)
    return components, per_key


def _frame_rows(file: Path, index: np.ndarray, per_key: dict[str, int]) -> list[dict[str, Any]]:
    rows = []
    for row in index:
        key = attr_str(row["key"])
        rows.append(
            {
                "frame_id": attr_str(row["frame_id"]),
                "key": key,
                "path": str(file),
                "policy": attr_str(row["policy"]),
                "raw_bytes": int(row["raw_bytes"]),
                "data_bytes": per_key.get(key, 0),
                "exact_fraction": float(row["exact_fraction"]),
                "ratio": int(row["raw_bytes"]) / max(per_key.get(key, 0), 1),
            }
        )
    return rows


def archive_stats(path: str | os.PathLike[str], *, per_frame: bool = False) -> dict[str, Any]:
    """Compression ratio and bytes by component of an archive file, session or root.

    Components: ``mask`` (run-length coded class mask), ``exact_pixels`` and ``exact_runs``
    (the bit-exact part and where it goes), ``low`` (the low-value class under its policy),
    ``metadata`` (frame metadata, analysis, provenance), ``index`` and ``hdf5_overhead`` (the
    rest of the file: superblock, object headers, attributes).

    Examples
    --------
    >>> import tempfile
    >>> from latticewatch.frame import Frame
    >>> from latticewatch.sinks.archive.writer import ArchiveWriter
    >>> fr = Frame("a.mrc", np.zeros((64, 64), np.int16))
    >>> with tempfile.TemporaryDirectory() as d:
    ...     with ArchiveWriter(d, "s1", reduce=False) as w:
    ...         _ = w.write(fr, None)
    ...     archive_stats(d)["frames"]
    1
    """
    root = Path(path)
    components = dict.fromkeys(_COMPONENTS, 0)
    raw = stored = n_frames = n_lossless = 0
    policies: dict[str, int] = {}
    file_rows = []
    frame_rows = []
    for file in archive_files(root):
        size = file.stat().st_size
        index = read_index(file)
        if index.size == 0:
            continue
        file_components, per_key = _dataset_bytes(file)
        for name, nbytes in file_components.items():
            components[name] += nbytes
        components["hdf5_overhead"] += size - sum(file_components.values())
        file_raw = int(index["raw_bytes"].sum())
        raw += file_raw
        stored += size
        n_frames += index.size
        n_lossless += int(index["lossless"].sum())
        for p in index["policy"]:
            p = attr_str(p)
            policies[p] = policies.get(p, 0) + 1
        file_rows.append({"path": str(file), "frames": int(index.size), "raw_bytes": file_raw, "bytes": size})
        if per_frame:
            frame_rows.extend(_frame_rows(file, index, per_key))
    result: dict[str, Any] = {
        "path": str(root),
        "files": len(file_rows),
        "frames": n_frames,
        "lossless_frames": n_lossless,
        "policies": policies,
        "raw_bytes": raw,
        "stored_bytes": stored,
        "ratio": raw / stored if stored else None,
        "components": components,
        "file_list": file_rows,
    }
    if per_frame:
        result["frame_list"] = frame_rows
    return result
