"""``latticewatch calibrate int8-set``: a small set of model-ready tiles, preprocessed exactly as
the analyser does, that spans the data (farthest-point sampling over simple statistics), for
calibrating the INT8 activation ranges of a TensorRT engine.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from latticewatch.errors import ConfigError
from latticewatch.io.atomic import write_atomic
from latticewatch.runtime.batch import Batch, Failure, micrograph_files

log = logging.getLogger(__name__)

#: Statistics describing each tile, in the order of the ``stats`` array.
INT8_STATS = ("mean", "std", "coverage")


def farthest_points(features: np.ndarray, n: int) -> list[int]:
    """``n`` row indices spreading over ``features``: start at the row nearest the mean, then
    repeatedly add the row farthest from those chosen (columns standardised first).

    >>> farthest_points(np.array([[0.0], [0.1], [5.0], [10.0]]), 3)
    [2, 0, 3]
    """
    f = np.asarray(features, np.float64)
    std = f.std(axis=0)
    f = (f - f.mean(axis=0)) / np.where(std > 0, std, 1.0)
    chosen = [int(np.argmin(np.linalg.norm(f, axis=1)))]
    distance = np.linalg.norm(f - f[chosen[0]], axis=1)
    while len(chosen) < min(n, len(f)):
        nxt = int(np.argmax(distance))
        chosen.append(nxt)
        distance = np.minimum(distance, np.linalg.norm(f - f[nxt], axis=1))
    return chosen


def _tile_origins(length: int, tile: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, tile))
    if starts[-1] + tile < length:
        starts.append(length - tile)  # the last strip, overlapping its neighbour
    return starts


@dataclass(frozen=True)
class Int8SetResult:
    path: Path
    n_chosen: int
    n_candidates: int
    n_frames: int
    skipped: tuple[Failure, ...]  # files, sections and frames that could not be prepared


def int8_calibration_set(
    profile: str | Path,
    images_dir: Path,
    out: Path,
    *,
    n: int = 32,
    tile: int = 512,
    threads: int | None = None,
    progress: bool = False,
) -> Int8SetResult:
    """Pick ``n`` model-ready tiles spanning ``images_dir`` and save them for INT8 calibration.

    Every frame goes through the analyser's ``prepare`` (validation, resampling to the model's
    pixel size, median, normalisation), is cut into ``tile``² tiles (mirror-padded when smaller),
    and each tile is described by its mean, standard deviation and particle coverage (the
    model's own mask at its threshold). Farthest-point sampling over those three picks tiles
    from the extremes as well as the typical, which is what activation-range calibration needs.

    The ``.npz`` (no pickled objects; ``np.load(path, allow_pickle=False)`` reads it) holds
    ``images`` (n, 1, tile, tile) float32 — the ONNX input — plus ``names``, ``origins`` (row,
    col at model resolution), ``stats``/``stat_names``, and ``onnx``, ``onnx_sha256``,
    ``profile``, ``pixel_size_nm``, ``normalisation``, ``threshold`` to tie it to the model.
    """
    from latticewatch.io.readers import SUPPORTED_SUFFIXES
    from latticewatch.runtime.analyser import Analyser

    analyser = Analyser(profile, threads=threads)
    seg = analyser.manifest.segmentation
    divisor = seg.divisor
    if tile % divisor:
        raise ConfigError(f"--tile must be a multiple of {divisor} for this network, got {tile}")
    files = micrograph_files(Path(images_dir))
    if not files:
        raise FileNotFoundError(f"{images_dir}: no micrographs ({', '.join(SUPPORTED_SUFFIXES)})")
    tiles, names, origins = [], [], []
    n_frames = 0
    batch = Batch(progress=progress, desc="frames")
    for frame, image in batch.run(files, lambda f: analyser.prepare(f).pre.image):
        n_frames += 1
        h, w = image.shape
        if h < tile or w < tile:
            image = np.pad(image, ((0, max(0, tile - h)), (0, max(0, tile - w))), mode="symmetric")
        for r in _tile_origins(image.shape[0], tile):
            for c in _tile_origins(image.shape[1], tile):
                tiles.append(np.ascontiguousarray(image[r : r + tile, c : c + tile], np.float32))
                names.append(frame.name)
                origins.append((r, c))
    if not tiles:
        raise FileNotFoundError(f"{images_dir}: no frame could be prepared ({len(batch.failures)} skipped)")
    coverage = []
    for start in range(0, len(tiles), 8):
        stacked = np.stack(tiles[start : start + 8])[:, None]
        coverage.extend((analyser.backend.predict(stacked)[:, 0] >= seg.threshold).mean(axis=(1, 2)).tolist())
    stats = np.array([[t.mean(), t.std(), cov] for t, cov in zip(tiles, coverage)], np.float64)
    chosen = farthest_points(stats, n)
    if len(chosen) < n:
        log.warning("only %d tiles available, fewer than the %d asked for", len(chosen), n)
    m = analyser.manifest
    arrays = {
        "images": np.stack([tiles[i] for i in chosen])[:, None],
        "names": np.array([names[i] for i in chosen]),
        "origins": np.array([origins[i] for i in chosen], np.int64),
        "stats": stats[chosen],
        "stat_names": np.array(INT8_STATS),
        "onnx": np.array(seg.onnx),
        "onnx_sha256": np.array(m.files[seg.onnx]),
        "profile": np.array(f"{m.name}@{m.version}"),
        "pixel_size_nm": np.array(np.nan if seg.pixel_size_nm is None else seg.pixel_size_nm),
        "normalisation": np.array(seg.normalisation),
        "threshold": np.array(seg.threshold),
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # np.savez appends .npz to names without it; write_atomic must get the final name
    if out.suffix != ".npz":
        out = out.with_name(out.name + ".npz")
    write_atomic(out, lambda fh: np.savez(fh, **arrays))
    return Int8SetResult(out, len(chosen), len(tiles), n_frames, tuple(batch.failures))
