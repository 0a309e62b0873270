"""The archive's HDF5 layout (format ``latticewatch.archive``, version 2): one frame <-> HDF5 groups.

Every archive file — a one-frame segment or a consolidated volume — holds ``/frames/<key>/…``
(the reduced arrays, metadata, analysis and provenance of one frame) plus an ``/index`` table
with one row per frame, so a reader never has to care which kind it opened. The README section
"HDF5 layout" documents every group, dataset and attribute written here; changing any of them
means a new `FORMAT_VERSION`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from latticewatch import __version__
from latticewatch.frame import Analysis, Frame
from latticewatch.io.jsonio import dumps
from latticewatch.sinks.archive.bitpack import join_bytes, split_bytes
from latticewatch.sinks.archive.codec import Codec, load_filter_plugins
from latticewatch.sinks.archive.reduce import Policy, ReducedFrame, restore_mask, restore_pixels

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "INDEX_DTYPE",
    "ArchivedFrame",
    "attr_str",
    "decode_frame_file",
    "encode_frame_file",
    "frame_key",
    "read_frame_group",
    "read_index",
    "read_reduced",
    "write_frame_group",
    "write_volume",
]

log = logging.getLogger(__name__)

FORMAT = "latticewatch.archive"
FORMAT_VERSION = 2  # 2: integer exact pixels split into low bytes + packed high bits
# HDF5 1.10 object formats: groups keep their links in the object header and single-chunk datasets need no
# chunk B-tree. The 1.6-compatible defaults cost ~2 KiB per group and per chunked dataset, which on a
# small lossless frame was more than its compression saved. Files written either way read the same.
_LIBVER = ("v110", "v110")
_STR = h5py.string_dtype()

#: One row of ``/index`` per frame.
INDEX_DTYPE = np.dtype(
    [
        ("key", _STR),
        ("frame_id", _STR),
        ("archived_ns", np.int64),
        ("acquired_at", _STR),
        ("rows", np.int64),
        ("cols", np.int64),
        ("dtype", _STR),
        ("policy", _STR),
        ("lossless", np.uint8),
        ("raw_bytes", np.int64),
        ("exact_fraction", np.float64),
        ("coverage", np.float64),
        ("n_regions", np.int64),
    ]
)

_REGION_DTYPE = np.dtype(
    [
        ("region_id", np.int64),
        ("row0", np.int64),
        ("col0", np.int64),
        ("row1", np.int64),
        ("col1", np.int64),
        ("centroid_row", np.float64),
        ("centroid_col", np.float64),
        ("centroid_row_nm", np.float64),
        ("centroid_col_nm", np.float64),
        ("area_px", np.int64),
        ("area_nm2", np.float64),
        ("equivalent_diameter_nm", np.float64),
        ("eccentricity", np.float64),
        ("solidity", np.float64),
        ("touches_edge", np.uint8),
        ("agglomerate_suspect", np.uint8),
        ("label", _STR),
        ("probabilities", _STR),  # JSON object
        ("features", _STR),  # JSON object
    ]
)


def frame_key(frame_id: str) -> str:
    """The HDF5-safe, deterministic key of a frame id (16 hex digits of its SHA-1).

    Deterministic so that archiving the same frame again (after a crash, before the ledger
    heard of it) replaces it instead of adding a second copy.

    Examples
    --------
    >>> frame_key("a.mrc")
    '7746dcbdef20a216'
    """
    return hashlib.sha1(frame_id.encode("utf-8")).hexdigest()[:16]


def attr_str(value: Any) -> str:
    """An HDF5 string attribute or field as `str` (h5py returns some as `bytes`).

    Examples
    --------
    >>> attr_str(b"drop"), attr_str("mean")
    ('drop', 'mean')
    """
    return value.decode() if isinstance(value, bytes) else str(value)


def _json(value: Any) -> str:
    # Sorted keys: the same value is always stored as the same text.
    return dumps(value, sort_keys=True)


def _nan_if_none(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def _none_if_nan(value: Any) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


# ------------------------------------------------------------------------------------ writing


def _write_root(f: h5py.File, session: str) -> None:
    f.attrs["format"] = FORMAT
    f.attrs["format_version"] = FORMAT_VERSION
    f.attrs["session"] = session
    f.attrs["created_at"] = datetime.now(timezone.utc).isoformat()
    f.attrs["latticewatch_version"] = __version__


def _group(parent: h5py.Group, name: str) -> h5py.Group:
    """A new group whose attributes stay in its object header: HDF5 moves more than 8 into a fractal heap
    with its own B-tree and free-space manager (~1.5 KiB), and a frame group has 13."""
    gcpl = h5py.h5p.create(h5py.h5p.GROUP_CREATE)
    gcpl.set_attr_phase_change(32, 24)
    return h5py.Group(h5py.h5g.create(parent.id, name.encode("utf-8"), gcpl=gcpl))


def _put(group: h5py.Group, name: str, data: np.ndarray, codec: Codec) -> None:
    group.create_dataset(name, data=data, **codec.dataset_kwargs(data))


def _put_json(group: h5py.Group, name: str, value: Any) -> None:
    # Fixed-length UTF-8, not variable-length: stored inline (no global heap), so its size is
    # counted by archive-stats and a plain ``json.loads(ds[()])`` reads it.
    data = _json(value).encode("utf-8")
    group.create_dataset(name, data=np.bytes_(data), dtype=h5py.string_dtype("utf-8", len(data)))


def _index_row(
    key: str, frame: Frame, reduced: ReducedFrame, analysis: Analysis | None, archived_ns: int
) -> np.ndarray:
    row = np.zeros(1, INDEX_DTYPE)
    row["key"] = key
    row["frame_id"] = frame.frame_id
    row["archived_ns"] = archived_ns
    row["acquired_at"] = frame.acquired_at.isoformat() if frame.acquired_at else ""
    row["rows"], row["cols"] = reduced.shape
    row["dtype"] = reduced.dtype
    row["policy"] = "lossless" if reduced.lossless else str(reduced.policy)
    row["lossless"] = reduced.lossless
    row["raw_bytes"] = reduced.raw_nbytes
    row["exact_fraction"] = reduced.n_exact / reduced.n_pixels
    row["coverage"] = analysis.coverage if analysis is not None else float("nan")
    row["n_regions"] = len(analysis.regions) if analysis is not None else -1
    return row


def _regions_table(analysis: Analysis) -> np.ndarray:
    table = np.zeros(len(analysis.regions), _REGION_DTYPE)
    for row, region in zip(table, analysis.regions, strict=True):
        cr, cc = region.centroid_nm if region.centroid_nm is not None else (None, None)
        row["region_id"] = region.region_id
        row["row0"], row["col0"], row["row1"], row["col1"] = region.bbox
        row["centroid_row"], row["centroid_col"] = region.centroid_px
        row["centroid_row_nm"], row["centroid_col_nm"] = _nan_if_none(cr), _nan_if_none(cc)
        row["area_px"] = region.area_px
        row["area_nm2"] = _nan_if_none(region.area_nm2)
        row["equivalent_diameter_nm"] = _nan_if_none(region.equivalent_diameter_nm)
        row["eccentricity"] = region.eccentricity
        row["solidity"] = region.solidity
        row["touches_edge"] = region.touches_edge
        row["agglomerate_suspect"] = region.agglomerate_suspect
        row["label"] = region.label
        row["probabilities"] = _json(region.probabilities)
        row["features"] = _json(region.features)
    return table


def _write_frame_attrs(g: h5py.Group, reduced: ReducedFrame, frame: Frame, codec: Codec, archived_ns: int) -> None:
    a = g.attrs
    a["frame_id"] = frame.frame_id
    a["origin"] = frame.origin
    a["shape"] = np.asarray(reduced.shape, np.int64)
    a["dtype"] = reduced.dtype
    a["pixel_size_nm"] = _nan_if_none(frame.pixel_size_nm)
    a["acquired_at"] = frame.acquired_at.isoformat() if frame.acquired_at else ""
    a["archived_ns"] = archived_ns
    a["lossless"] = reduced.lossless
    a["lossless_reason"] = reduced.lossless_reason
    a["policy"] = str(reduced.policy)
    a["low_value_class"] = reduced.low_value_class
    a["margin_px"] = reduced.margin_px
    a["codec"] = str(codec)


def _write_exact(g: h5py.Group, reduced: ReducedFrame, codec: Codec) -> None:
    e = g.create_group("exact")
    _put(e, "runs", reduced.exact_runs, codec)
    split = split_bytes(reduced.exact_pixels) if codec.name == "auto" else None
    if split is None:
        e.attrs["encoding"] = "plain"
        _put(e, "pixels", reduced.exact_pixels, codec)
    else:
        # Integer counts split into byte planes: minimum bits, and the codec's entropy coder sees the noisy
        # low bytes apart from the smooth high byte (what lets it beat zstd of the raw frame).
        low_bytes, high_bits, attrs = split
        e.attrs.update(attrs)
        _put(e, "low_bytes", low_bytes, codec)
        if high_bits is not None:
            _put(e, "high_bits", high_bits, codec)


def _write_low(g: h5py.Group, reduced: ReducedFrame, codec: Codec) -> None:
    low = g.create_group("low")
    low.attrs["policy"] = str(reduced.policy)
    for name, value in reduced.low_attrs.items():
        low.attrs[name] = value
    if reduced.low_values is not None:
        # Codes packed several to a byte use every bit; a codec would only cost time.
        packed = reduced.low_attrs.get("container", 8) < 8
        _put(low, "values", reduced.low_values, Codec("none") if packed else codec)
    if reduced.low_lengths is not None:
        _put(low, "lengths", reduced.low_lengths, codec)


def _write_analysis(g: h5py.Group, analysis: Analysis) -> None:
    an = g.create_group("analysis")
    an.attrs["profile"] = analysis.profile
    an.attrs["mean_confidence"] = float(analysis.mean_confidence)
    an.attrs["coverage"] = analysis.coverage
    an.attrs["pixel_size_nm"] = _nan_if_none(analysis.pixel_size_nm)
    an.attrs["model_ids"] = _json(analysis.model_ids)
    an.attrs["timings_s"] = _json(analysis.timings_s)
    an.attrs["warnings"] = _json(list(analysis.warnings))
    an.create_dataset("regions", data=_regions_table(analysis))


def write_frame_group(
    parent: h5py.Group,
    key: str,
    reduced: ReducedFrame,
    frame: Frame,
    analysis: Analysis | None,
    provenance: Mapping[str, Any],
    codec: Codec,
    archived_ns: int,
) -> h5py.Group:
    """Store one reduced frame under ``parent[key]`` in the documented layout.

    Examples
    --------
    >>> from latticewatch.sinks.archive.reduce import reduce_frame
    >>> fr = Frame("f1", np.zeros((4, 4), np.int16))
    >>> with h5py.File(io.BytesIO(), "w") as f:
    ...     g = write_frame_group(f, "k", reduce_frame(fr.pixels, None, lossless=True), fr, None, {}, Codec(), 0)
    ...     sorted(g)
    ['exact', 'low', 'meta', 'provenance']
    """
    g = _group(parent, key)
    _write_frame_attrs(g, reduced, frame, codec, archived_ns)
    if reduced.mask_values is not None:
        m = g.create_group("mask")
        _put(m, "values", reduced.mask_values, codec)
        _put(m, "lengths", reduced.mask_lengths, codec)
    _write_exact(g, reduced, codec)
    _write_low(g, reduced, codec)
    _put_json(g, "meta", frame.meta)
    _put_json(g, "provenance", provenance)
    if analysis is not None:
        _write_analysis(g, analysis)
    return g


def encode_frame_file(
    reduced: ReducedFrame,
    frame: Frame,
    analysis: Analysis | None = None,
    provenance: Mapping[str, Any] | None = None,
    *,
    session: str = "",
    codec: str | Codec = "auto",
    archived_ns: int | None = None,
) -> memoryview:
    """A complete one-frame archive file (a *segment*) as bytes, built in memory.

    Building in memory keeps HDF5 away from the disk: the only I/O is one ``write`` of finished
    bytes, whose failure (``ENOSPC``…) we can clean up exactly.

    Examples
    --------
    >>> from latticewatch.sinks.archive.reduce import reduce_frame
    >>> fr = Frame("f1", np.zeros((4, 4), np.int16))
    >>> data = encode_frame_file(reduce_frame(fr.pixels, None, lossless=True), fr)
    >>> bytes(data[:4])
    b'\\x89HDF'
    """
    codec = Codec.parse(codec)
    archived_ns = time.time_ns() if archived_ns is None else archived_ns
    key = frame_key(frame.frame_id)
    buffer = io.BytesIO()
    with h5py.File(buffer, "w", libver=_LIBVER) as f:
        _write_root(f, session)
        frames = f.create_group("frames")
        write_frame_group(frames, key, reduced, frame, analysis, provenance or {}, codec, archived_ns)
        f.create_dataset("index", data=_index_row(key, frame, reduced, analysis, archived_ns))
    return buffer.getbuffer()


def write_volume(path: Path, session: str, segments: Sequence[Path]) -> None:
    """Write the frames of several archive files (segments) into one new file at ``path``.

    The frames' groups are copied as they are (HDF5 moves the compressed chunks, no
    re-encoding) and their index rows concatenated. ``path`` should be a temporary name:
    see `latticewatch.io.atomic.atomic_path`.
    """
    load_filter_plugins()
    rows = []
    with h5py.File(path, "w", libver=_LIBVER) as out:
        _write_root(out, session)
        frames = out.create_group("frames")
        for segment in segments:
            with h5py.File(segment, "r") as seg:
                for key in seg["frames"]:
                    seg.copy(seg["frames"][key], frames, name=key)
                rows.append(seg["index"][...])
        index = np.concatenate(rows) if rows else np.zeros(0, INDEX_DTYPE)
        out.create_dataset("index", data=index.astype(INDEX_DTYPE), maxshape=(None,))


# ------------------------------------------------------------------------------------ reading


def read_index(path: Path) -> np.ndarray:
    """The ``/index`` rows of an archive file; none (and a warning) when it is not a readable one."""
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != FORMAT or "index" not in f:
                return np.zeros(0, INDEX_DTYPE)
            return f["index"][...]
    except OSError as exc:
        log.warning("archive: cannot read index of %s: %s", path, exc)
        return np.zeros(0, INDEX_DTYPE)


def _read_array(group: h5py.Group, name: str) -> np.ndarray | None:
    return group[name][...] if name in group else None


def _read_exact_pixels(e: h5py.Group, dtype: np.dtype) -> np.ndarray:
    if attr_str(e.attrs.get("encoding", "plain")) == "split":
        return join_bytes(e["low_bytes"][...], _read_array(e, "high_bits"), e.attrs, dtype)
    return e["pixels"][...]


def read_reduced(g: h5py.Group) -> ReducedFrame:
    """Load the :class:`ReducedFrame` stored in one ``/frames/<key>`` group."""
    a = g.attrs
    low = g["low"]
    mask = g.get("mask")
    return ReducedFrame(
        shape=tuple(int(v) for v in a["shape"]),
        dtype=attr_str(a["dtype"]),
        policy=Policy.parse(attr_str(a["policy"])),
        exact_runs=g["exact/runs"][...],
        exact_pixels=_read_exact_pixels(g["exact"], np.dtype(attr_str(a["dtype"]))),
        mask_values=None if mask is None else mask["values"][...],
        mask_lengths=None if mask is None else mask["lengths"][...],
        low_values=_read_array(low, "values"),
        low_lengths=_read_array(low, "lengths"),
        low_attrs={k: v for k, v in low.attrs.items() if k != "policy"},
        lossless=bool(a["lossless"]),
        lossless_reason=attr_str(a["lossless_reason"]),
        low_value_class=int(a["low_value_class"]),
        margin_px=int(a["margin_px"]),
    )


@dataclass(frozen=True)
class ArchivedFrame:
    """One frame as read back from the archive."""

    key: str
    frame_id: str
    reduced: ReducedFrame
    pixel_size_nm: float | None
    acquired_at: str
    origin: str
    meta: dict[str, Any]
    provenance: dict[str, Any]
    analysis: dict[str, Any] | None
    path: Path

    def pixels(self) -> np.ndarray:
        """The restored frame (see :func:`~latticewatch.sinks.archive.reduce.restore_pixels`)."""
        return restore_pixels(self.reduced)

    def mask(self) -> np.ndarray | None:
        """The class mask, or ``None`` when the frame was archived without an analysis."""
        return restore_mask(self.reduced)


def _read_analysis(an: h5py.Group) -> dict[str, Any]:
    regions = []
    for row in an["regions"][...]:
        d = {name: row[name] for name in _REGION_DTYPE.names}
        d = {k: (v.decode() if isinstance(v, bytes) else v.item() if hasattr(v, "item") else v) for k, v in d.items()}
        d["probabilities"] = json.loads(d["probabilities"])
        d["features"] = json.loads(d["features"])
        regions.append(d)
    return {
        "profile": attr_str(an.attrs["profile"]),
        "mean_confidence": float(an.attrs["mean_confidence"]),
        "coverage": float(an.attrs["coverage"]),
        "pixel_size_nm": _none_if_nan(an.attrs["pixel_size_nm"]),
        "model_ids": json.loads(an.attrs["model_ids"]),
        "timings_s": json.loads(an.attrs["timings_s"]),
        "warnings": json.loads(an.attrs["warnings"]),
        "regions": regions,
    }


def read_frame_group(g: h5py.Group, path: Path | str = "") -> ArchivedFrame:
    """Load one ``/frames/<key>`` group; ``path`` is the file it came from, for the record."""
    a = g.attrs
    return ArchivedFrame(
        key=g.name.rsplit("/", 1)[-1],
        frame_id=attr_str(a["frame_id"]),
        reduced=read_reduced(g),
        pixel_size_nm=_none_if_nan(a["pixel_size_nm"]),
        acquired_at=attr_str(a["acquired_at"]),
        origin=attr_str(a["origin"]),
        meta=json.loads(g["meta"][()]),
        provenance=json.loads(g["provenance"][()]),
        analysis=_read_analysis(g["analysis"]) if "analysis" in g else None,
        path=Path(path),
    )


def decode_frame_file(data: bytes | memoryview) -> ArchivedFrame:
    """Read a one-frame archive file from bytes (the inverse of :func:`encode_frame_file`).

    Examples
    --------
    >>> from latticewatch.sinks.archive.reduce import reduce_frame
    >>> fr = Frame("f1", np.arange(16, dtype=np.int16).reshape(4, 4))
    >>> decode_frame_file(encode_frame_file(reduce_frame(fr.pixels, None, lossless=True), fr)).frame_id
    'f1'
    """
    load_filter_plugins()
    with h5py.File(io.BytesIO(data), "r") as f:
        (key,) = list(f["frames"])
        return read_frame_group(f["frames"][key])
