"""``latticewatch bench --archive``: encode/decode throughput and size ratios of the archive."""

from __future__ import annotations

import io
import logging
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Sequence
from typing import Any

import h5py
import numpy as np

from latticewatch.frame import Frame
from latticewatch.io.readers.dispatch import read_frames
from latticewatch.sinks.archive.codec import load_filter_plugins
from latticewatch.sinks.archive.layout import decode_frame_file, encode_frame_file
from latticewatch.sinks.archive.reduce import ReducedFrame, margin_to_pixels, reduce_frame, restore_pixels
from latticewatch.sinks.archive.runs import runs_to_bool

log = logging.getLogger(__name__)

#: The general-purpose compressor levels the lossless path is compared with (on the raw frame bytes).
ZSTD_LEVELS = (3, 19)


def synthetic_frame(
    size: int = 4096, coverage: float = 0.15, *, pixel_size_nm: float = 0.02, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A simple stand-in for an HRTEM frame: lattice-fringed discs on amorphous noise.

    Discs of 3–8 nm diameter are added until ``coverage`` is reached; the background is
    Gaussian noise around 1000 counts (σ 30), particles are a little darker and carry 0.235 nm
    fringes. Returns ``(pixels int16, mask uint8)``.

    Examples
    --------
    >>> px, m = synthetic_frame(256, 0.2, seed=1)
    >>> px.dtype, bool(0.15 < m.mean() < 0.35)
    (dtype('int16'), True)
    """
    rng = np.random.default_rng(seed)
    mask = np.zeros((size, size), bool)
    target = coverage * size * size
    rows = np.arange(size)[:, None]
    cols = np.arange(size)[None, :]
    area = 0
    while area < target:
        radius = rng.uniform(3.0, 8.0) / pixel_size_nm / 2
        cy, cx = rng.uniform(0, size, 2)
        r0, r1 = int(max(cy - radius, 0)), int(min(cy + radius + 1, size))
        c0, c1 = int(max(cx - radius, 0)), int(min(cx + radius + 1, size))
        disc = (rows[r0:r1] - cy) ** 2 + (cols[:, c0:c1] - cx) ** 2 <= radius * radius
        new = disc & ~mask[r0:r1, c0:c1]
        mask[r0:r1, c0:c1] |= disc
        area += int(np.count_nonzero(new))
    img = rng.normal(1000.0, 30.0, (size, size)).astype(np.float32)
    period_px = 0.235 / pixel_size_nm
    fringes = 60.0 * np.sin((2 * np.pi / period_px) * (0.95 * cols + 0.31 * rows)).astype(np.float32)
    img += np.where(mask, fringes - 40.0, 0.0).astype(np.float32)
    return np.rint(img).astype(np.int16), mask.astype(np.uint8)


def general_purpose_sizes(raw: bytes, levels: Sequence[int] = ZSTD_LEVELS) -> dict[str, Any]:
    """Bytes that Zstandard makes of ``raw`` at each level: the python ``zstandard`` package, else the ``zstd`` CLI.

    ``compressor`` names the one used, ``None`` (and no sizes) when neither is installed.

    Examples
    --------
    >>> r = general_purpose_sizes(bytes(100_000), levels=(3,))
    >>> r["compressor"] is None or r["zstd_3"] < 1000
    True
    """
    try:
        import zstandard  # noqa: PLC0415 - optional

        return {"compressor": "zstandard", **{f"zstd_{lv}": len(zstandard.ZstdCompressor(level=lv).compress(raw))
                                              for lv in levels}}
    except ImportError:
        pass
    cli = shutil.which("zstd")
    if cli is None:
        log.warning("archive bench: neither the zstandard package nor the zstd command: no general-purpose reference")
        return {"compressor": None}
    sizes = {}
    for lv in levels:  # one thread: the archive's encoder runs on one core too
        out = subprocess.run([cli, f"-{lv}", "-T1", "-q", "-c"], input=raw, capture_output=True, check=True).stdout
        sizes[f"zstd_{lv}"] = len(out)
    return {"compressor": "zstd CLI", **sizes}


def pixel_bytes(data: bytes | memoryview) -> int:
    """Bytes the exact pixels of a one-frame archive file take on disk (the ``exact_pixels`` of archive-stats).

    Examples
    --------
    >>> from latticewatch.sinks.archive.reduce import reduce_frame
    >>> px = np.arange(10_000, dtype=np.uint16).reshape(100, 100)
    >>> pixel_bytes(encode_frame_file(reduce_frame(px, None, lossless=True), Frame("f", px))) < px.nbytes
    True
    """
    load_filter_plugins()
    with h5py.File(io.BytesIO(data), "r") as f:
        (key,) = list(f["frames"])
        exact = f["frames"][key]["exact"]
        return sum(exact[n].id.get_storage_size() for n in ("pixels", "low_bytes", "high_bits") if n in exact)


def _times(fn, repeats: int) -> tuple[list[float], Any]:
    times = []
    result = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return times, result


def run_archive_bench(
    frame_size: int = 4096,
    coverages: Sequence[float] = (0.05, 0.15, 0.40),
    policies: Sequence[str] = ("drop", "mean", "quantize:4", "lossless"),
    repeats: int = 3,
    *,
    margin_nm: float = 0.5,
    pixel_size_nm: float = 0.02,
    codec: str = "auto",
    seed: int = 0,
    pin_cpu: bool = True,
    frames: Sequence[str | os.PathLike[str]] = (),
) -> dict[str, Any]:
    """Encode/decode throughput and size of the archive on synthetic frames (one core).

    *Encode* is everything the writer does before the disk: reduce (dilate the margin,
    run-length code, apply the policy) and build the HDF5 segment with its compression.
    *Decode* parses the segment and restores the pixels. Throughput is MB (10⁶ bytes) of raw
    input per second; ``ratio`` is raw int16 bytes over segment bytes. Every run checks that the
    exact pixels come back bit-exact. Times are medians over ``repeats`` (``*_best``: the fastest
    repeat, for machines shared with other work).

    ``"lossless"`` in ``policies`` measures the safety valve (whole frame kept exactly). Each
    lossless frame — the synthetic ones and every section of the files in ``frames`` (e.g. real
    micrographs) — is also compared with Zstandard on its raw bytes (`general_purpose_sizes`) in
    ``lossless_vs_zstd``; the goal ``lossless_beats_zstd`` holds when the archive stores every such
    frame's pixels in no more bytes than the best level did.

    Examples
    --------
    >>> r = run_archive_bench(256, coverages=(0.15,), policies=("drop",), repeats=1)
    >>> sorted(r["results"][0])[:3]
    ['coverage', 'coverage_target', 'decode_MBps']
    """
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    if pin_cpu and affinity:
        os.sched_setaffinity(0, {min(affinity)})
    margin_px, _ = margin_to_pixels(margin_nm, pixel_size_nm)
    results = []
    versus = []
    try:
        for i, coverage in enumerate(coverages):
            pixels, mask = synthetic_frame(frame_size, coverage, pixel_size_nm=pixel_size_nm, seed=seed + i)
            frame = Frame(f"bench/{coverage:.2f}", pixels, pixel_size_nm=pixel_size_nm)
            for policy in policies:
                row = _measure(frame, mask, policy, margin_px=margin_px, codec=codec, repeats=repeats)
                results.append({"coverage_target": coverage, **row})
                if policy == "lossless":
                    versus.append(_versus_zstd(f"synthetic, {row['coverage']:.1%} coverage", pixels, row))
        for path in frames:
            for frame in read_frames(path):
                row = _measure(frame, None, "lossless", margin_px=0, codec=codec, repeats=repeats)
                versus.append(_versus_zstd(frame.frame_id, frame.pixels, row))
    finally:
        if pin_cpu and affinity:
            os.sched_setaffinity(0, affinity)
    return {
        "benchmark": "archive",
        "frame": {"size": frame_size, "dtype": "int16", "pixel_size_nm": pixel_size_nm, "synthetic": True},
        "margin_nm": margin_nm,
        "margin_px": margin_px,
        "codec": codec,
        "repeats": repeats,
        "cpus": 1 if pin_cpu and affinity else (len(affinity) if affinity else None),
        "results": results,
        "lossless_vs_zstd": versus,
        "goals": {**_goals(results), **_versus_goals(versus)},
    }


def _measure(
    frame: Frame, mask: np.ndarray | None, policy: str, *, margin_px: int, codec: str, repeats: int
) -> dict[str, Any]:
    """One result row: reduce, encode and decode ``frame`` under ``policy``, and check the exact pixels."""
    pixels = frame.pixels
    lossless = policy == "lossless"
    settings: dict[str, Any] = {
        "policy": "drop" if lossless else policy,
        "margin_px": margin_px,
        "lossless": lossless,
        "lossless_reason": "bench" if lossless else "",
    }

    def encode() -> tuple[ReducedFrame, memoryview]:
        r = reduce_frame(pixels, mask, **settings)
        return r, encode_frame_file(r, frame, None, {}, codec=codec)

    reduce_t, _ = _times(lambda: reduce_frame(pixels, mask, **settings), repeats)
    encode_t, (reduced, data) = _times(encode, repeats)
    data = bytes(data)
    decode_t, restored = _times(lambda: restore_pixels(decode_frame_file(data).reduced), repeats)
    reduce_s, encode_s, decode_s = (statistics.median(t) for t in (reduce_t, encode_t, decode_t))
    keep = runs_to_bool(reduced.exact_runs, reduced.n_pixels).reshape(pixels.shape)
    if not np.array_equal(restored[keep], pixels[keep]):  # pragma: no cover - a bug
        raise AssertionError(f"exact pixels changed ({policy}, {frame.frame_id})")
    low = ~keep
    err = np.abs(restored[low].astype(np.int32) - pixels[low]) if low.any() else np.zeros(1)
    raw = pixels.nbytes
    return {
        "coverage": float(mask.mean()) if mask is not None else None,
        "policy": policy,
        "exact_fraction": reduced.n_exact / reduced.n_pixels,
        "raw_bytes": raw,
        "stored_bytes": len(data),
        "pixel_bytes": pixel_bytes(data),
        "ratio": raw / len(data),
        "reduce_s": reduce_s,
        "encode_s": encode_s,
        "decode_s": decode_s,
        "encode_MBps": raw / encode_s / 1e6,
        "decode_MBps": raw / decode_s / 1e6,
        # best of the repeats: on a shared machine, closest to an idle core
        "encode_MBps_best": raw / min(encode_t) / 1e6,
        "decode_MBps_best": raw / min(decode_t) / 1e6,
        "low_max_abs_error": float(err.max()),
        "low_encoding": reduced.low_attrs.get("encoding"),
    }


def _versus_zstd(name: str, pixels: np.ndarray, row: dict[str, Any]) -> dict[str, Any]:
    """One ``lossless_vs_zstd`` entry: the archive's bytes for a lossless frame beside Zstandard's on its raw bytes."""
    general = general_purpose_sizes(pixels.tobytes())
    raw = row["raw_bytes"]
    sizes = {k: v for k, v in general.items() if k.startswith("zstd_")}
    return {
        "frame": name,
        "raw_bytes": raw,
        "stored_bytes": row["stored_bytes"],  # the whole one-frame file: pixels, mask, metadata, HDF5 headers
        "pixel_bytes": row["pixel_bytes"],
        "ratio_file": row["ratio"],
        "ratio_pixels": raw / row["pixel_bytes"],
        "compressor": general["compressor"],
        **sizes,
        **{f"ratio_{k}": raw / v for k, v in sizes.items()},
        "encode_MBps": row["encode_MBps"],
    }


def _versus_goals(versus: list[dict[str, Any]]) -> dict[str, Any]:
    """Whether every lossless frame's pixels took no more bytes than the best Zstandard level on its raw bytes."""
    # best zstd bytes over archive pixel bytes, per compared frame: >= 1 where the archive did as well
    margins = [min(v[f"zstd_{lv}"] for lv in ZSTD_LEVELS) / v["pixel_bytes"] for v in versus if v["compressor"]]
    return {
        "lossless_beats_zstd": all(m >= 1 for m in margins) if margins else None,
        "lossless_vs_zstd_worst": min(margins, default=None),
    }


def _goals(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The targets (300 MB/s encode for every reducing policy, ratio 8 for drop at 15 % coverage) and the results."""
    drop15 = next((r for r in results if r["policy"] == "drop" and r["coverage_target"] == 0.15), None)
    reduced_rows = [r for r in results if r["policy"] != "lossless"]
    return {
        "encode_MBps_min": 300.0,
        "ratio_drop_15pct_min": 8.0,
        "encode_MBps_worst": min((r["encode_MBps"] for r in reduced_rows), default=None),
        "ratio_drop_15pct": drop15["ratio"] if drop15 else None,
        "encode_met": all(r["encode_MBps"] >= 300.0 for r in reduced_rows) if reduced_rows else None,
        "ratio_met": drop15["ratio"] >= 8.0 if drop15 else None,
    }


def format_bench_table(result: dict[str, Any]) -> str:
    """A plain-text table of :func:`run_archive_bench` results (for `bench --archive` without --json)."""
    lines = [f"{'coverage':>8} {'policy':<11}{'exact':>7}{'ratio':>8}{'enc MB/s':>10}{'dec MB/s':>10}"]
    for r in result["results"]:
        lines.append(
            f"{r['coverage']:>8.1%} {r['policy']:<11}{r['exact_fraction']:>7.1%}{r['ratio']:>8.2f}"
            f"{r['encode_MBps']:>10.0f}{r['decode_MBps']:>10.0f}"
        )
    return "\n".join(lines)
