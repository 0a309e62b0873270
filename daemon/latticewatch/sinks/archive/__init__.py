"""The archive sink: reduced frames in HDF5, written atomically, one session at a time.

Layout on disk (see ``docs/archive.md`` for the full description)::

    <root>/<session>/
        <session>-0001.h5        volumes: closed, consolidated, one per rotation
        <session>-0002.h5
        segments/<key>.h5        frames archived since the last rotation, one file each

Every ``.h5`` here — volume or segment — has the same layout (``/frames/<key>/…`` plus an
``/index`` table), so a reader never has to care which it holds.

Why segments and volumes: HDF5 cannot append crash-safely (a crash or a full disk in the middle
of an append can leave the whole file unreadable), and rewriting the session file for every
frame costs O(n²). So each frame is first written as its own small file — temporary name,
fsync, rename, fsync of the directory — and only then reported archived. When the pending
segments pass ``max_bytes`` or ``max_age_s`` (and on :meth:`ArchiveWriter.close`) they are
copied into the next volume the same way (temporary, fsync, rename) and deleted only after the
volume's rename is durable. A crash at any point leaves either the segments, or the volume, or
both (identical data, the reader de-duplicates); never a half-written file under a final name.
"""

from __future__ import annotations

import dataclasses
import errno as errno_mod
import fcntl
import hashlib
import io
import json
import logging
import math
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from latticewatch import __version__
from latticewatch.frame import Analysis, Frame
from latticewatch.errors import StateError
from latticewatch.sinks.archive.reduce import (
    Policy,
    ReducedFrame,
    _native,
    join_bytes,
    margin_to_pixels,
    reduce_frame,
    restore_mask,
    restore_pixels,
    split_bytes,
)

__all__ = [
    "ArchiveError",
    "ArchiveReader",
    "ArchiveReceipt",
    "ArchiveUnavailable",
    "ArchiveWriter",
    "ArchivedFrame",
    "Codec",
    "UncertaintyRule",
    "archive_stats",
    "decode_frame_file",
    "encode_frame_file",
    "frame_key",
]

log = logging.getLogger("latticewatch.sinks.archive")

FORMAT = "latticewatch.archive"
FORMAT_VERSION = 2  # 2: integer exact pixels split into low bytes + packed high bits
SEGMENTS_DIR = "segments"
_SESSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_VOLUME_RE = re.compile(r"^(?P<session>.+)-(?P<number>\d{4,})\.h5$")
_TMP_MARK = ".tmp-"
_CHUNK = 1 << 16  # elements: small chunks keep scale-offset's per-chunk range tight, and stay in cache
_SMALL = 4096  # arrays shorter than this are stored contiguous: chunk indexes would cost more
_STR = h5py.string_dtype()

_INDEX_DTYPE = np.dtype(
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


# ------------------------------------------------------------------------------------- errors


class ArchiveError(StateError):
    """The archive cannot be used as configured (bad session name, session locked, bad file)."""


class ArchiveUnavailable(ArchiveError):
    """Archiving is paused: no space, no permission, read-only or failing storage.

    Nothing partial was left behind. The pipeline should keep analysing and publishing, raise an
    error event and count it; the writer retries by itself on a later :meth:`ArchiveWriter.write`
    (after ``retry_in_s``) or when :meth:`ArchiveWriter.probe` succeeds.

    Attributes
    ----------
    reason
        ``"no_space"``, ``"permission"``, ``"read_only"`` or ``"io"``.
    errno
        The OS error number when there was one.
    path
        The path that failed.
    retry_in_s
        Seconds until the writer tries the disk again.
    """

    def __init__(self, message: str, *, reason: str, errno: int | None = None, path: str = "", retry_in_s: float = 0.0):
        super().__init__(message)
        self.reason = reason
        self.errno = errno
        self.path = path
        self.retry_in_s = retry_in_s


def _reason(exc: OSError) -> str:
    if exc.errno in (errno_mod.ENOSPC, errno_mod.EDQUOT):
        return "no_space"
    if exc.errno in (errno_mod.EACCES, errno_mod.EPERM):
        return "permission"
    if exc.errno == errno_mod.EROFS:
        return "read_only"
    return "io"


# -------------------------------------------------------------------------------------- codec


@dataclass(frozen=True)
class Codec:
    """Lossless HDF5 compression for the stored arrays.

    ``auto`` (default) uses HDF5's built-in *scale-offset* filter for integers — lossless at
    ``scaleoffset=0``, ~400 MB/s, readable by any HDF5 — and LZF + shuffle (built into h5py)
    for floats. ``gzip[:LEVEL]`` is the most portable and the slowest; ``zstd[:LEVEL]`` and
    ``bitshuffle`` (LZ4) are faster but need ``import hdf5plugin`` to read.

    Examples
    --------
    >>> Codec.parse("gzip:4").level
    4
    """

    name: str = "auto"
    level: int | None = None

    _NAMES = ("auto", "none", "scaleoffset", "gzip", "lzf", "zstd", "bitshuffle")

    def __post_init__(self) -> None:
        if self.name not in self._NAMES:
            raise ValueError(f"unknown archive codec {self.name!r}: use one of {', '.join(self._NAMES)}")

    @classmethod
    def parse(cls, text: str | Codec) -> Codec:
        if isinstance(text, Codec):
            return text
        name, _, level = str(text).strip().lower().partition(":")
        return cls(name, int(level) if level else None)

    def __str__(self) -> str:
        return self.name if self.level is None else f"{self.name}:{self.level}"

    def dataset_kwargs(self, data: np.ndarray) -> dict[str, Any]:
        """``create_dataset`` keyword arguments for one 1-D array."""
        if data.size < _SMALL or self.name == "none" or data.dtype.kind not in "iuf":
            return {}
        n_chunks = -(-data.size // _CHUNK)
        # Equal chunks: the last one is padded by fewer than n_chunks elements.
        kw: dict[str, Any] = {"chunks": (-(-data.size // n_chunks),)}
        name = self.name
        if name in ("auto", "scaleoffset"):
            name = "scaleoffset" if data.dtype.kind in "iu" else "lzf"
        if name == "scaleoffset":
            # scaleoffset=0 is HDF5's lossless mode for integers (minimum bits per chunk); the
            # fill value pads the last chunk, so make it a value the data has.
            kw.update(scaleoffset=0, fillvalue=data[-1])
        elif name == "lzf":
            kw.update(compression="lzf", shuffle=True)
        elif name == "gzip":
            kw.update(compression="gzip", compression_opts=self.level or 1, shuffle=True)
        else:
            import hdf5plugin  # noqa: PLC0415 - optional, only for these codecs

            if name == "zstd":
                kw.update(shuffle=True, **hdf5plugin.Zstd(clevel=self.level or 1))
            else:
                kw.update(**hdf5plugin.Bitshuffle(cname="lz4"))
        return kw


def _load_filter_plugins() -> None:
    """Make zstd / bitshuffle files readable when hdf5plugin is installed (it is optional)."""
    try:
        import hdf5plugin  # noqa: F401, PLC0415
    except ImportError:  # pragma: no cover - depends on the environment
        pass


# -------------------------------------------------------------------------- uncertainty rule


@dataclass(frozen=True)
class UncertaintyRule:
    """When to distrust a segmentation and archive the frame whole and lossless.

    The profile sets the thresholds; ``None`` switches a test off. A confidence that is not a
    finite number counts as uncertain: when in doubt, keep everything.

    Examples
    --------
    >>> rule = UncertaintyRule(min_mean_confidence=0.9)
    >>> rule.reason_for(None)
    'no analysis'
    """

    min_mean_confidence: float | None = 0.8
    max_uncertain_fraction: float | None = None
    uncertain_band: tuple[float, float] = (0.2, 0.8)
    on_warnings: bool = False

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> UncertaintyRule:
        """Build from a profile's ``[archive.uncertain]`` table (unknown keys are an error)."""
        data = dict(data or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown uncertainty rule keys {unknown}: allowed are {sorted(names)}")
        if "uncertain_band" in data:
            data["uncertain_band"] = tuple(data["uncertain_band"])
        return cls(**data)

    def reason_for(self, analysis: Analysis | None) -> str | None:
        """Why the frame must be kept whole, or ``None`` when it may be reduced."""
        if analysis is None:
            return "no analysis"
        if self.min_mean_confidence is not None:
            confidence = float(analysis.mean_confidence)
            if not math.isfinite(confidence) or confidence < self.min_mean_confidence:
                return f"uncertain segmentation: mean confidence {confidence:.3g} < {self.min_mean_confidence:g}"
        if self.max_uncertain_fraction is not None and analysis.probability is not None:
            lo, hi = self.uncertain_band
            p = analysis.probability
            fraction = float(np.count_nonzero((p > lo) & (p < hi))) / max(p.size, 1)
            if fraction > self.max_uncertain_fraction:
                return f"uncertain segmentation: {fraction:.1%} of pixels with p in ({lo:g}, {hi:g})"
        if self.on_warnings and analysis.warnings:
            return "analysis warnings: " + "; ".join(analysis.warnings)
        return None


# ------------------------------------------------------------------------ one frame <-> HDF5


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


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    return repr(value)


def _dumps(value: Any) -> str:
    return json.dumps(value, default=_json_default, sort_keys=True)


def _nan_if_none(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def _none_if_nan(value: Any) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


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
        row["probabilities"] = _dumps(region.probabilities)
        row["features"] = _dumps(region.features)
    return table


def _put(group: h5py.Group, name: str, data: np.ndarray, codec: Codec) -> None:
    group.create_dataset(name, data=data, **codec.dataset_kwargs(data))


def _put_json(group: h5py.Group, name: str, value: Any) -> None:
    # Fixed-length UTF-8, not variable-length: stored inline (no global heap), so its size is
    # counted by archive-stats and a plain ``json.loads(ds[()])`` reads it.
    data = _dumps(value).encode("utf-8")
    group.create_dataset(name, data=np.bytes_(data), dtype=h5py.string_dtype("utf-8", len(data)))


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


def _versions() -> dict[str, str]:
    return {
        "latticewatch": __version__,
        "numpy": np.__version__,
        "h5py": h5py.version.version,
        "hdf5": h5py.version.hdf5_version,
    }


def _write_root(f: h5py.File, session: str) -> None:
    f.attrs["format"] = FORMAT
    f.attrs["format_version"] = FORMAT_VERSION
    f.attrs["session"] = session
    f.attrs["created_at"] = _now_iso()
    f.attrs["latticewatch_version"] = __version__


def _index_row(
    key: str, frame: Frame, reduced: ReducedFrame, analysis: Analysis | None, archived_ns: int
) -> np.ndarray:
    row = np.zeros(1, _INDEX_DTYPE)
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
    """Store one reduced frame under ``parent[key]`` in the documented layout."""
    g = parent.create_group(key)
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

    if reduced.mask_values is not None:
        m = g.create_group("mask")
        _put(m, "values", reduced.mask_values, codec)
        _put(m, "lengths", reduced.mask_lengths, codec)
    e = g.create_group("exact")
    _put(e, "runs", reduced.exact_runs, codec)
    split = split_bytes(reduced.exact_pixels) if codec.name == "auto" else None
    if split is None:
        e.attrs["encoding"] = "plain"
        _put(e, "pixels", reduced.exact_pixels, codec)
    else:
        # integer counts: low bytes + packed high bits already use every bit; a filter would only cost time
        low_bytes, high_bits, attrs = split
        e.attrs.update(attrs)
        e.create_dataset("low_bytes", data=low_bytes)
        if high_bits is not None:
            e.create_dataset("high_bits", data=high_bits)
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

    _put_json(g, "meta", frame.meta)
    _put_json(g, "provenance", provenance)
    if analysis is not None:
        an = g.create_group("analysis")
        an.attrs["profile"] = analysis.profile
        an.attrs["mean_confidence"] = float(analysis.mean_confidence)
        an.attrs["coverage"] = analysis.coverage
        an.attrs["pixel_size_nm"] = _nan_if_none(analysis.pixel_size_nm)
        an.attrs["model_ids"] = _dumps(analysis.model_ids)
        an.attrs["timings_s"] = _dumps(analysis.timings_s)
        an.attrs["warnings"] = _dumps(list(analysis.warnings))
        an.create_dataset("regions", data=_regions_table(analysis))
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
    >>> fr = Frame("f1", np.zeros((4, 4), np.int16))
    >>> data = encode_frame_file(reduce_frame(fr.pixels, None, lossless=True), fr)
    >>> bytes(data[:4])
    b'\\x89HDF'
    """
    codec = Codec.parse(codec)
    archived_ns = time.time_ns() if archived_ns is None else archived_ns
    key = frame_key(frame.frame_id)
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        _write_root(f, session)
        frames = f.create_group("frames")
        write_frame_group(frames, key, reduced, frame, analysis, provenance or {}, codec, archived_ns)
        f.create_dataset("index", data=_index_row(key, frame, reduced, analysis, archived_ns))
    return buffer.getbuffer()


def _read_array(group: h5py.Group, name: str) -> np.ndarray | None:
    return group[name][...] if name in group else None


def _attr_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _read_exact_pixels(e: h5py.Group, dtype: np.dtype) -> np.ndarray:
    if _attr_str(e.attrs.get("encoding", "plain")) == "split":
        return join_bytes(e["low_bytes"][...], _read_array(e, "high_bits"), e.attrs, _native(dtype))
    return e["pixels"][...]


def read_reduced(g: h5py.Group) -> ReducedFrame:
    """Load the :class:`ReducedFrame` stored in one ``/frames/<key>`` group."""
    a = g.attrs
    low = g["low"]
    mask = g.get("mask")
    return ReducedFrame(
        shape=tuple(int(v) for v in a["shape"]),
        dtype=_attr_str(a["dtype"]),
        policy=Policy.parse(_attr_str(a["policy"])),
        exact_runs=g["exact/runs"][...],
        exact_pixels=_read_exact_pixels(g["exact"], np.dtype(_attr_str(a["dtype"]))),
        mask_values=None if mask is None else mask["values"][...],
        mask_lengths=None if mask is None else mask["lengths"][...],
        low_values=_read_array(low, "values"),
        low_lengths=_read_array(low, "lengths"),
        low_attrs={k: v for k, v in low.attrs.items() if k != "policy"},
        lossless=bool(a["lossless"]),
        lossless_reason=_attr_str(a["lossless_reason"]),
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


def _load_json(ds: h5py.Dataset) -> Any:
    return json.loads(ds[()])


def read_frame_group(g: h5py.Group, path: Path | str = "") -> ArchivedFrame:
    """Load one ``/frames/<key>`` group."""
    a = g.attrs
    analysis = None
    if "analysis" in g:
        an = g["analysis"]
        regions = []
        for row in an["regions"][...]:
            d = {name: row[name] for name in _REGION_DTYPE.names}
            d = {k: (v.decode() if isinstance(v, bytes) else v.item() if hasattr(v, "item") else v) for k, v in d.items()}
            d["probabilities"] = json.loads(d["probabilities"])
            d["features"] = json.loads(d["features"])
            regions.append(d)
        analysis = {
            "profile": _attr_str(an.attrs["profile"]),
            "mean_confidence": float(an.attrs["mean_confidence"]),
            "coverage": float(an.attrs["coverage"]),
            "pixel_size_nm": _none_if_nan(an.attrs["pixel_size_nm"]),
            "model_ids": json.loads(an.attrs["model_ids"]),
            "timings_s": json.loads(an.attrs["timings_s"]),
            "warnings": json.loads(an.attrs["warnings"]),
            "regions": regions,
        }
    return ArchivedFrame(
        key=g.name.rsplit("/", 1)[-1],
        frame_id=_attr_str(a["frame_id"]),
        reduced=read_reduced(g),
        pixel_size_nm=_none_if_nan(a["pixel_size_nm"]),
        acquired_at=_attr_str(a["acquired_at"]),
        origin=_attr_str(a["origin"]),
        meta=_load_json(g["meta"]),
        provenance=_load_json(g["provenance"]),
        analysis=analysis,
        path=Path(path),
    )


def decode_frame_file(data: bytes | memoryview) -> ArchivedFrame:
    """Read a one-frame archive file from bytes (the inverse of :func:`encode_frame_file`)."""
    _load_filter_plugins()
    with h5py.File(io.BytesIO(data), "r") as f:
        (key,) = list(f["frames"])
        return read_frame_group(f["frames"][key])


# ------------------------------------------------------------------------------ file helpers


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quiet(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:  # pragma: no cover - e.g. a read-only remount between create and unlink
        log.warning("could not remove temporary file %s: %s", path, exc)


def _tmp_name(final: Path) -> Path:
    # Hidden and marked, so folder watchers skip it and recovery knows it is ours to delete.
    return final.with_name(f".{final.name}{_TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")


def _atomic_write_bytes(final: Path, data: bytes | memoryview, *, fsync: bool = True) -> None:
    """Write ``data`` to ``final`` atomically: temporary name, fsync, rename, fsync directory.

    On any error the temporary file is removed and the error re-raised; ``final`` is either
    untouched or complete.
    """
    tmp = _tmp_name(final)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        try:
            view = memoryview(data).cast("B")
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)  # may raise too (deferred write errors on network filesystems)
        os.replace(tmp, final)
    except BaseException:
        _unlink_quiet(tmp)
        raise
    if fsync:
        _fsync_dir(final.parent)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_archive_file(path: Path) -> bool:
    return path.suffix == ".h5" and not path.name.startswith(".")


# ------------------------------------------------------------------------------------- writer


@dataclass(frozen=True)
class ArchiveReceipt:
    """Proof that a frame is durably archived (returned only after the rename is fsynced).

    The ledger should keep ``session_dir`` and ``key``: the frame moves from its segment file
    into a volume at the next rotation, and :class:`ArchiveReader` finds it either way.
    """

    frame_id: str
    key: str
    session_dir: Path
    path: Path
    lossless: bool
    lossless_reason: str
    raw_bytes: int
    stored_bytes: int
    warnings: tuple[str, ...] = ()


@dataclass
class ArchiveCounters:
    """Running totals for the metrics sink (read them, do not write them)."""

    frames_written: int = 0
    frames_lossless: int = 0
    raw_bytes: int = 0
    stored_bytes: int = 0
    failures: int = 0
    rotations: int = 0
    rotation_failures: int = 0


class ArchiveWriter:
    """Archive analysed frames of one acquisition session.

    Parameters
    ----------
    root
        The configured archive root; the session lives in ``root/<session>/``.
    session
        Session name (letters, digits, ``.``, ``_``, ``-``).
    policy
        What to do with the low-value class: ``drop[:FILL]``, ``mean`` or ``quantize:N``.
    margin_nm
        Margin around the high-value class kept exactly, in nm (in pixels when a frame has no
        pixel size; the provenance says so).
    reduce
        ``False`` archives every frame whole and lossless.
    low_value_class
        Class id that may be reduced (0 = background for nanoparticles; 1 = contamination for
        graphene). The profile says which.
    uncertainty
        Safety valve: frames whose segmentation it distrusts are archived whole and lossless.
    codec
        Lossless compression of the stored arrays (see :class:`Codec`).
    max_bytes, max_age_s
        Rotate — consolidate the pending segments into the next volume — when they pass this
        size or when the oldest is this old (checked after each write and on :meth:`close`).
    min_free_bytes
        Stop archiving before the filesystem is completely full, so that the ledger and logs on
        the same disk keep working.
    retry_after_s, retry_max_s
        After a failure, the writer waits this long (doubling up to the maximum) before it
        touches the disk again; writes in between fail fast with :class:`ArchiveUnavailable`.
    fsync
        Leave on in production; tests on tmpfs may switch it off for speed.

    Examples
    --------
    >>> import tempfile
    >>> fr = Frame("a.mrc", np.zeros((8, 8), np.int16), pixel_size_nm=0.1)
    >>> with tempfile.TemporaryDirectory() as d:
    ...     with ArchiveWriter(d, "s1", policy="mean", margin_nm=0.2, reduce=False) as w:
    ...         receipt = w.write(fr, None)
    ...     receipt.lossless
    True
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        session: str,
        policy: str | Policy = "drop",
        margin_nm: float = 0.5,
        *,
        reduce: bool = True,
        low_value_class: int = 0,
        uncertainty: UncertaintyRule | Callable[[Analysis | None], str | None] | None = None,
        codec: str | Codec = "auto",
        max_bytes: int = 2 * 2**30,
        max_age_s: float = 3600.0,
        min_free_bytes: int = 64 * 2**20,
        retry_after_s: float = 1.0,
        retry_max_s: float = 60.0,
        fsync: bool = True,
    ):
        if not _SESSION_RE.match(session):
            raise ArchiveError(f"bad session name {session!r}: use letters, digits, '.', '_' and '-' (max 128)")
        self.root = Path(root)
        self.session = session
        self.session_dir = self.root / session
        self.segments_dir = self.session_dir / SEGMENTS_DIR
        self.policy = Policy.parse(policy)
        if margin_nm < 0:
            raise ValueError(f"archive margin must be >= 0 nm, got {margin_nm}")
        self.margin_nm = float(margin_nm)
        self.reduce = bool(reduce)
        self.low_value_class = int(low_value_class)
        self.uncertainty = UncertaintyRule() if uncertainty is None else uncertainty
        self.codec = Codec.parse(codec)
        self.max_bytes = int(max_bytes)
        self.max_age_s = float(max_age_s)
        self.min_free_bytes = int(min_free_bytes)
        self.retry_after_s = float(retry_after_s)
        self.retry_max_s = float(retry_max_s)
        self.fsync = bool(fsync)
        self.counters = ArchiveCounters()

        self._lock = threading.RLock()
        self._lock_fd: int | None = None
        self._opened = False
        self._pending: dict[str, tuple[int, float]] = {}  # key -> (bytes, time written)
        self._next_volume = 1
        self._failure: ArchiveUnavailable | None = None
        self._unavailable_since: float | None = None
        self._retry_at = 0.0
        self._backoff = self.retry_after_s
        self._rotate_retry_at = 0.0
        self._last_size = 0

    # -- state ------------------------------------------------------------------------------

    @property
    def available(self) -> bool:
        """False while archiving is paused by a storage failure."""
        return self._failure is None

    @property
    def unavailable_since(self) -> float | None:
        """``time.time()`` of the first failure of the current outage, else ``None``."""
        return self._unavailable_since

    @property
    def pending_segments(self) -> int:
        return len(self._pending)

    def __enter__(self) -> ArchiveWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- public -----------------------------------------------------------------------------

    def write(
        self, frame: Frame, analysis: Analysis | None, provenance: Mapping[str, Any] | None = None
    ) -> ArchiveReceipt:
        """Reduce and archive one frame; return only once it is durably on disk.

        Raises
        ------
        ArchiveUnavailable
            Storage refused (no space, permission, read-only, I/O error) or the writer is
            still backing off from such a failure. Nothing partial is left behind.
        """
        with self._lock:
            self._check_backoff()
            self._ensure_open()
            reduced, archive_prov = self._reduce(frame, analysis)
            prov = {
                "profile": analysis.profile if analysis is not None else None,
                "model_ids": dict(analysis.model_ids) if analysis is not None else {},
                "versions": _versions(),
                "archive": archive_prov,
                **dict(provenance or {}),
            }
            key = frame_key(frame.frame_id)
            data = encode_frame_file(reduced, frame, analysis, prov, session=self.session, codec=self.codec)
            final = self.segments_dir / f"{key}.h5"
            self._last_size = len(data)
            try:
                self._check_space(len(data))
                _atomic_write_bytes(final, data, fsync=self.fsync)
            except OSError as exc:
                raise self._fail(exc, final) from exc
            self._recovered()
            self._pending[key] = (len(data), time.time())
            c = self.counters
            c.frames_written += 1
            c.frames_lossless += int(reduced.lossless)
            c.raw_bytes += reduced.raw_nbytes
            c.stored_bytes += len(data)
            warnings = self._maybe_rotate()
            return ArchiveReceipt(
                frame_id=frame.frame_id,
                key=key,
                session_dir=self.session_dir,
                path=final,
                lossless=reduced.lossless,
                lossless_reason=reduced.lossless_reason,
                raw_bytes=reduced.raw_nbytes,
                stored_bytes=len(data),
                warnings=warnings,
            )

    def probe(self) -> bool:
        """Check now whether the archive can be written (ignores the backoff); resume if so.

        "Can be written" means: the session directory is writable and has room for a frame the
        size of the last one.
        """
        with self._lock:
            try:
                self._ensure_open()
                self._check_space(max(self._last_size, 4096))
                _atomic_write_bytes(self.segments_dir / ".probe", b"latticewatch probe\n", fsync=self.fsync)
                os.unlink(self.segments_dir / ".probe")
            except ArchiveUnavailable:
                return False
            except OSError as exc:
                self._fail(exc, self.segments_dir)
                return False
            self._recovered()
            return True

    def rotate(self) -> Path | None:
        """Consolidate the pending segments into the next volume now; return its path.

        Raises ``OSError`` (after cleaning up) when the volume cannot be written; the segments
        stay where they are and nothing is lost.
        """
        with self._lock:
            self._ensure_open()
            segments = self._pending_paths()
            if not segments:
                return None
            volume = self.session_dir / f"{self.session}-{self._next_volume:04d}.h5"
            needed = sum(p.stat().st_size for p in segments)
            self._check_space(needed)
            tmp = _tmp_name(volume)
            try:
                self._consolidate(segments, tmp)
                if self.fsync:
                    _fsync_file(tmp)
                os.replace(tmp, volume)
                if self.fsync:
                    _fsync_dir(self.session_dir)
            except BaseException:
                _unlink_quiet(tmp)
                raise
            self._next_volume += 1
            # Only now may the segments go: the volume holding their frames is durable.
            for path in segments:
                _unlink_quiet(path)
                self._pending.pop(path.stem, None)
            if self.fsync:
                _fsync_dir(self.segments_dir)
            self.counters.rotations += 1
            log.info("archive: rotated %d frames into %s", len(segments), volume)
            return volume

    def close(self) -> None:
        """Consolidate what is pending (when the disk allows) and release the session lock."""
        with self._lock:
            if self._opened and self._pending:
                try:
                    self.rotate()
                except Exception as exc:  # noqa: BLE001 - h5py has its own error types
                    # The segments are complete archive files; the next writer of this session
                    # (or ``latticewatch restore``) reads them as they are.
                    log.warning("archive: could not consolidate %s on close: %s", self.session_dir, exc)
            self._release_lock()
            self._opened = False

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    # -- internals --------------------------------------------------------------------------

    def _reduce(self, frame: Frame, analysis: Analysis | None) -> tuple[ReducedFrame, dict[str, Any]]:
        margin_px, margin_unit = margin_to_pixels(self.margin_nm, frame.pixel_size_nm)
        reason = None
        if not self.reduce:
            reason = "reduce = false"
        elif analysis is None:
            reason = "no analysis"
        elif analysis.mask.shape != frame.pixels.shape:
            reason = f"mask shape {analysis.mask.shape} != frame shape {frame.pixels.shape}"
        else:
            rule = self.uncertainty
            reason = rule.reason_for(analysis) if isinstance(rule, UncertaintyRule) else rule(analysis)
        mask = None if analysis is None or reason and reason.startswith("mask shape") else analysis.mask
        reduced = reduce_frame(
            frame.pixels,
            mask,
            low_value_class=self.low_value_class,
            policy=self.policy,
            margin_px=margin_px,
            lossless=reason is not None,
            lossless_reason=reason or "",
        )
        prov = {
            "policy": str(self.policy),
            "reduce": self.reduce,
            "lossless": reduced.lossless,
            "lossless_reason": reduced.lossless_reason,
            "low_value_class": self.low_value_class,
            "margin_nm": self.margin_nm,
            "margin_px": margin_px,
            "margin_unit": margin_unit,
            "margin_shape": "square",
            "codec": str(self.codec),
            "uncertainty_rule": dataclasses.asdict(self.uncertainty)
            if isinstance(self.uncertainty, UncertaintyRule)
            else repr(self.uncertainty),
        }
        if margin_unit == "px" and self.margin_nm:
            prov["note"] = "pixel size unknown: margin_nm was applied as pixels"
        return reduced, prov

    def _check_backoff(self) -> None:
        if self._failure is None:
            return
        wait = self._retry_at - time.monotonic()
        if wait > 0:
            f = self._failure
            raise ArchiveUnavailable(
                f"archive paused ({f.reason}): {f}; retrying in {wait:.1f} s",
                reason=f.reason,
                errno=f.errno,
                path=f.path,
                retry_in_s=wait,
            )

    def _fail(self, exc: OSError, path: Path) -> ArchiveUnavailable:
        reason = _reason(exc)
        self.counters.failures += 1
        if self._failure is None:
            self._unavailable_since = time.time()
            self._backoff = self.retry_after_s
            log.error("archive: paused, %s at %s: %s (analysis and publishing continue)", reason, path, exc)
        else:
            self._backoff = min(max(self._backoff * 2, self.retry_after_s), self.retry_max_s)
        self._retry_at = time.monotonic() + self._backoff
        self._failure = ArchiveUnavailable(
            f"cannot archive to {path}: {exc.strerror or exc}",
            reason=reason,
            errno=exc.errno,
            path=str(path),
            retry_in_s=self._backoff,
        )
        return self._failure

    def _recovered(self) -> None:
        if self._failure is not None:
            log.warning(
                "archive: resumed after %.0f s paused (%s)",
                time.time() - (self._unavailable_since or time.time()),
                self._failure.reason,
            )
        self._failure = None
        self._unavailable_since = None
        self._backoff = self.retry_after_s

    def _check_space(self, nbytes: int) -> None:
        st = os.statvfs(self.session_dir)
        free = st.f_bavail * st.f_frsize
        if free - nbytes < self.min_free_bytes:
            raise OSError(
                errno_mod.ENOSPC,
                f"{free} bytes free, {nbytes} needed with a reserve of {self.min_free_bytes}",
            )

    def _ensure_open(self) -> None:
        if self._opened:
            return
        try:
            created = not self.segments_dir.exists()
            self.segments_dir.mkdir(parents=True, exist_ok=True)
            if created and self.fsync:
                # New directory entries must be durable too, or a crash could lose them with
                # every segment inside.
                for directory in (self.session_dir, self.root):
                    _fsync_dir(directory)
            # Read-only descriptor: flock works on it, and it does not keep the filesystem
            # "busy" for an administrator's read-only remount.
            lock_fd = os.open(self.session_dir / ".lock", os.O_RDONLY | os.O_CREAT, 0o644)
        except OSError as exc:
            raise self._fail(exc, self.session_dir) from exc
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise ArchiveError(f"archive session {self.session_dir} is in use by another writer") from None
        self._lock_fd = lock_fd
        try:
            self._recover()
        except OSError as exc:
            self._release_lock()
            raise self._fail(exc, self.session_dir) from exc
        self._opened = True

    def _recover(self) -> None:
        """Tidy after a crash: drop our temporaries and segments already in a volume."""
        for directory in (self.session_dir, self.segments_dir):
            for path in directory.iterdir():
                if path.name.startswith(".") and _TMP_MARK in path.name:
                    log.info("archive: removing incomplete %s", path)
                    _unlink_quiet(path)
        in_volumes: set[tuple[str, int]] = set()
        numbers = [0]
        for path in sorted(self.session_dir.glob("*.h5")):
            m = _VOLUME_RE.match(path.name)
            if not m or m["session"] != self.session:
                continue
            numbers.append(int(m["number"]))
            for row in _read_index(path):
                in_volumes.add((_attr_str(row["key"]), int(row["archived_ns"])))
        self._next_volume = max(numbers) + 1
        self._pending.clear()
        for path in sorted(self.segments_dir.glob("*.h5")):
            rows = _read_index(path)
            if rows.size and all((_attr_str(r["key"]), int(r["archived_ns"])) in in_volumes for r in rows):
                # Crash between a volume's rename and the deletion of its segments.
                _unlink_quiet(path)
                continue
            st = path.stat()
            self._pending[path.stem] = (st.st_size, st.st_mtime)

    def _pending_paths(self) -> list[Path]:
        paths = [self.segments_dir / f"{key}.h5" for key in self._pending]
        return [p for p in paths if p.exists()]

    def _maybe_rotate(self) -> tuple[str, ...]:
        if not self._pending or time.monotonic() < self._rotate_retry_at:
            return ()
        size = sum(b for b, _ in self._pending.values())
        oldest = min(t for _, t in self._pending.values())
        if size < self.max_bytes and time.time() - oldest < self.max_age_s:
            return ()
        try:
            self.rotate()
        except OSError as exc:
            self.counters.rotation_failures += 1
            self._rotate_retry_at = time.monotonic() + self.retry_max_s
            msg = f"archive rotation deferred ({_reason(exc)}): {exc}; frames stay in {self.segments_dir}"
            log.warning(msg)
            return (msg,)
        except Exception as exc:  # h5py reports some write failures as its own error types
            self.counters.rotation_failures += 1
            self._rotate_retry_at = time.monotonic() + self.retry_max_s
            msg = f"archive rotation deferred: {exc}; frames stay in {self.segments_dir}"
            log.warning(msg)
            return (msg,)
        return ()

    def _consolidate(self, segments: list[Path], out_path: Path) -> None:
        _load_filter_plugins()
        rows = []
        with h5py.File(out_path, "w") as out:
            _write_root(out, self.session)
            frames = out.create_group("frames")
            for path in segments:
                with h5py.File(path, "r") as seg:
                    for key in seg["frames"]:
                        # H5Ocopy moves the compressed chunks as they are: no re-encoding.
                        seg.copy(seg["frames"][key], frames, name=key)
                    rows.append(seg["index"][...])
            index = np.concatenate(rows) if rows else np.zeros(0, _INDEX_DTYPE)
            out.create_dataset("index", data=index.astype(_INDEX_DTYPE), maxshape=(None,))


def _read_index(path: Path) -> np.ndarray:
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != FORMAT or "index" not in f:
                return np.zeros(0, _INDEX_DTYPE)
            return f["index"][...]
    except OSError as exc:
        log.warning("archive: cannot read index of %s: %s", path, exc)
        return np.zeros(0, _INDEX_DTYPE)


# ------------------------------------------------------------------------------------- reader


@dataclass(frozen=True)
class IndexEntry:
    """One row of an archive index, with the file that holds it."""

    key: str
    frame_id: str
    path: Path
    archived_ns: int
    acquired_at: str
    shape: tuple[int, int]
    dtype: str
    policy: str
    lossless: bool
    raw_bytes: int
    exact_fraction: float
    coverage: float
    n_regions: int


def _archive_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no archive at {path}")
    return sorted(p for p in path.rglob("*.h5") if _is_archive_file(p))


class ArchiveReader:
    """Read an archive: one file, a session directory, or a root with several sessions.

    A frame held both by a volume and by a leftover segment (a crash during rotation) is listed
    once; when a frame was archived again later, the newest copy wins.

    Examples
    --------
    >>> import tempfile
    >>> fr = Frame("a.mrc", np.arange(16, dtype=np.int16).reshape(4, 4))
    >>> with tempfile.TemporaryDirectory() as d:
    ...     with ArchiveWriter(d, "s1", reduce=False) as w:
    ...         _ = w.write(fr, None)
    ...     r = ArchiveReader(d)
    ...     [e.frame_id for e in r.entries()], int(r.read("a.mrc").pixels().sum())
    (['a.mrc'], 120)
    """

    def __init__(self, path: str | os.PathLike[str]):
        _load_filter_plugins()
        self.path = Path(path)
        self.files: list[Path] = []
        best: dict[str, IndexEntry] = {}
        for file in _archive_files(self.path):
            rows = _read_index(file)
            if rows.size:
                self.files.append(file)
            for row in rows:
                entry = IndexEntry(
                    key=_attr_str(row["key"]),
                    frame_id=_attr_str(row["frame_id"]),
                    path=file,
                    archived_ns=int(row["archived_ns"]),
                    acquired_at=_attr_str(row["acquired_at"]),
                    shape=(int(row["rows"]), int(row["cols"])),
                    dtype=_attr_str(row["dtype"]),
                    policy=_attr_str(row["policy"]),
                    lossless=bool(row["lossless"]),
                    raw_bytes=int(row["raw_bytes"]),
                    exact_fraction=float(row["exact_fraction"]),
                    coverage=float(row["coverage"]),
                    n_regions=int(row["n_regions"]),
                )
                old = best.get(entry.key)
                is_segment = file.parent.name == SEGMENTS_DIR
                if old is None or entry.archived_ns > old.archived_ns or (
                    entry.archived_ns == old.archived_ns and not is_segment
                ):
                    best[entry.key] = entry
        self._entries = sorted(best.values(), key=lambda e: (e.archived_ns, e.frame_id))

    def entries(self) -> list[IndexEntry]:
        """The archived frames, oldest first."""
        return list(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def find(self, frame: str) -> IndexEntry:
        """Look a frame up by id, by key, or by a file name that matches exactly one id."""
        for entry in self._entries:
            if frame in (entry.frame_id, entry.key):
                return entry
        matches = [e for e in self._entries if e.frame_id.rsplit("/", 1)[-1] == frame]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise KeyError(f"{frame!r} matches {len(matches)} frames; give the full id or the key")
        raise KeyError(f"no frame {frame!r} in {self.path}")

    def read(self, frame: str | IndexEntry) -> ArchivedFrame:
        """Load one frame (by id, key or :class:`IndexEntry`)."""
        entry = frame if isinstance(frame, IndexEntry) else self.find(frame)
        with h5py.File(entry.path, "r") as f:
            return read_frame_group(f["frames"][entry.key], entry.path)

    def __iter__(self) -> Iterator[ArchivedFrame]:
        for entry in self._entries:
            yield self.read(entry)


# -------------------------------------------------------------------------------------- stats


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


def archive_stats(path: str | os.PathLike[str], *, per_frame: bool = False) -> dict[str, Any]:
    """Compression ratio and bytes by component of an archive file, session or root.

    Components: ``mask`` (run-length coded class mask), ``exact_pixels`` and ``exact_runs``
    (the bit-exact part and where it goes), ``low`` (the low-value class under its policy),
    ``metadata`` (frame metadata, analysis, provenance), ``index`` and ``hdf5_overhead`` (the
    rest of the file: superblock, object headers, attributes).

    Examples
    --------
    >>> import tempfile
    >>> fr = Frame("a.mrc", np.zeros((64, 64), np.int16))
    >>> with tempfile.TemporaryDirectory() as d:
    ...     with ArchiveWriter(d, "s1", reduce=False) as w:
    ...         _ = w.write(fr, None)
    ...     archive_stats(d)["frames"]
    1
    """
    root = Path(path)
    files = _archive_files(root)
    components = dict.fromkeys(
        ("mask", "exact_pixels", "exact_runs", "low", "metadata", "index", "hdf5_overhead"), 0
    )
    raw = stored = n_frames = n_lossless = 0
    policies: dict[str, int] = {}
    file_rows = []
    frame_rows = []
    for file in files:
        size = file.stat().st_size
        index = _read_index(file)
        if index.size == 0:
            continue
        counted = 0
        per_key: dict[str, int] = {}

        def visit(name: str, obj: Any, per_key: dict[str, int] = per_key) -> None:
            nonlocal counted
            if isinstance(obj, h5py.Dataset):
                nbytes = obj.id.get_storage_size()
                components[_component(name)] += nbytes
                counted += nbytes
                parts = name.split("/")
                if parts[0] == "frames" and len(parts) > 1:
                    per_key[parts[1]] = per_key.get(parts[1], 0) + nbytes

        with h5py.File(file, "r") as f:
            f.visititems(visit)
        components["hdf5_overhead"] += size - counted
        file_raw = int(index["raw_bytes"].sum())
        raw += file_raw
        stored += size
        n_frames += index.size
        n_lossless += int(index["lossless"].sum())
        for p in index["policy"]:
            p = _attr_str(p)
            policies[p] = policies.get(p, 0) + 1
        file_rows.append({"path": str(file), "frames": int(index.size), "raw_bytes": file_raw, "bytes": size})
        if per_frame:
            for row in index:
                key = _attr_str(row["key"])
                frame_rows.append(
                    {
                        "frame_id": _attr_str(row["frame_id"]),
                        "key": key,
                        "path": str(file),
                        "policy": _attr_str(row["policy"]),
                        "raw_bytes": int(row["raw_bytes"]),
                        "data_bytes": per_key.get(key, 0),
                        "exact_fraction": float(row["exact_fraction"]),
                        "ratio": int(row["raw_bytes"]) / max(per_key.get(key, 0), 1),
                    }
                )
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
