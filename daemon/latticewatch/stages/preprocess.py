"""Preprocessing: X-ray spike removal, normalisation, resampling to the model's pixel size, padding.

Groschner et al. (2021) apply a 3×3 median filter and divide by the maximum; Sadre et al. (2021)
divide by a fitted quadratic Bézier surface (flat field) and z-score. Both are available here,
plus a robust percentile scaling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage

Normalisation = Literal["max", "percentile", "bezier_zscore", "zscore"]


def _sort_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.minimum(a, b), np.maximum(a, b)


def median3x3(image: np.ndarray) -> np.ndarray:
    """Exact 3×3 median filter with mirrored edges, equal to ``scipy.ndimage.median_filter(x, 3)``.

    Scipy's generic rank filter takes ~140 ms on a 1024² frame; this sorts each vertical triple once
    and takes the median of the three column summaries (max of lows, median of mids, min of highs),
    which is ~20 vectorised min/max passes.

    Examples
    --------
    >>> median3x3(np.array([[0, 0, 0], [0, 9, 0], [0, 0, 0]])).max()
    0
    """
    p = np.pad(image, 1, mode="symmetric")
    top, mid, bot = p[:-2], p[1:-1], p[2:]
    lo, mid = _sort_pair(top, mid)
    mid, hi = _sort_pair(mid, bot)
    lo, mid = _sort_pair(lo, mid)
    # each column now holds its sorted (lo, mid, hi); combine three adjacent columns
    max_lo = np.maximum(np.maximum(lo[:, :-2], lo[:, 1:-1]), lo[:, 2:])
    min_hi = np.minimum(np.minimum(hi[:, :-2], hi[:, 1:-1]), hi[:, 2:])
    a, b, c = mid[:, :-2], mid[:, 1:-1], mid[:, 2:]
    med_mid = np.maximum(np.minimum(a, b), np.minimum(np.maximum(a, b), c))
    return np.maximum(np.minimum(max_lo, med_mid), np.minimum(np.maximum(max_lo, med_mid), min_hi))


def _bernstein2(t: np.ndarray) -> np.ndarray:
    return np.stack([(1 - t) ** 2, 2 * t * (1 - t), t**2], axis=-1)


def bezier_background(image: np.ndarray, subsample: int = 8) -> np.ndarray:
    """Least-squares fit of a quadratic (3×3 control point) Bézier surface to the image.

    Fitted on a block-averaged copy because the surface is smooth; evaluated at full size.
    The design matrix is a Kronecker product of the row and column Bernstein bases, so the
    least-squares coefficients separate exactly, ``C = pinv(Bu) · Y · pinv(Bv)ᵀ``; with tiny
    matrices and the final 3-term outer sum done without BLAS, this takes ~2 ms on a 582² image
    instead of ~50 ms when a multithreaded BLAS spins up its threads for a 5184×9 solve on a
    busy machine.

    Examples
    --------
    >>> yy, xx = np.mgrid[:64, :64] / 64.0
    >>> surface = 1 + 0.5 * xx * (1 - yy)  # bilinear, hence exactly a quadratic Bézier surface
    >>> bool(np.abs(bezier_background(surface, subsample=1) - surface).max() < 1e-9)
    True
    """
    h, w = image.shape
    s = max(1, min(subsample, h // 4, w // 4))
    hh, ww = (h // s) * s, (w // s) * s
    coarse = image[:hh, :ww].reshape(hh // s, s, ww // s, s).mean(axis=(1, 3), dtype=np.float64)
    bu = _bernstein2((np.arange(coarse.shape[0]) + 0.5) * s / h)
    bv = _bernstein2((np.arange(coarse.shape[1]) + 0.5) * s / w)
    coeffs = np.linalg.pinv(bu) @ coarse @ np.linalg.pinv(bv).T
    rows = _bernstein2((np.arange(h) + 0.5) / h) @ coeffs  # (h, 3)
    full_v = _bernstein2((np.arange(w) + 0.5) / w)  # (w, 3)
    return sum(rows[:, k, None] * full_v[None, :, k] for k in range(3))


def normalise(image: np.ndarray, method: Normalisation) -> np.ndarray:
    """Scale a (median-filtered) image as the model expects; returns float32.

    ``max``: divide by the maximum (Groschner et al.); ``percentile``: map the 0.5–99.5 % range to
    0–1; ``bezier_zscore``: divide by a Bézier flat field, then subtract the mean and divide by the
    RMS deviation from one (Sadre et al.); ``zscore``: subtract the mean, divide by the standard
    deviation. ``zscore`` and ``bezier_zscore`` do not change when a frame's contrast or offset
    does (gain, display scaling, dose), unlike ``max``, which depends on the one brightest pixel.

    Examples
    --------
    >>> z = normalise(np.array([[1.0, 3.0], [5.0, 7.0]]), "zscore")
    >>> float(z.mean()), round(float(z.std()), 6)
    (0.0, 1.0)
    """
    x = image.astype(np.float32, copy=False)
    if method == "max":
        peak = float(x.max())
        return x / peak if peak > 0 else np.zeros_like(x)
    if method == "percentile":
        lo, hi = np.percentile(x, [0.5, 99.5])
        return np.clip((x - lo) / max(hi - lo, 1e-12), 0, 1).astype(np.float32)
    if method == "bezier_zscore":
        flat = x / np.maximum(bezier_background(x), 1e-12).astype(np.float32)
        sigma = float(np.sqrt(np.mean((flat - 1.0) ** 2)))
        return ((flat - flat.mean()) / max(sigma, 1e-12)).astype(np.float32)
    if method == "zscore":
        mean, sigma = float(x.mean(dtype=np.float64)), float(x.std(dtype=np.float64))
        return ((x - mean) / max(sigma, 1e-12)).astype(np.float32)
    raise ValueError(f"unknown normalisation {method!r}; use 'max', 'percentile', 'bezier_zscore' or 'zscore'")


def resample(image: np.ndarray, factor: float) -> np.ndarray:
    """Resample by ``factor`` (< 1 shrinks). Integer shrink factors use exact block means
    (fast, alias-free for lattice fringes); other factors a Gaussian anti-alias plus linear zoom."""
    if abs(factor - 1.0) < 1e-3:
        return image
    inverse = 1.0 / factor
    if factor < 1 and abs(inverse - round(inverse)) < 1e-3:
        k = int(round(inverse))
        h, w = (image.shape[0] // k) * k, (image.shape[1] // k) * k
        return image[:h, :w].reshape(h // k, k, w // k, k).mean(axis=(1, 3), dtype=np.float32)
    if factor < 1:
        image = ndimage.gaussian_filter(image, sigma=0.5 * inverse)
    return ndimage.zoom(image, factor, order=1, grid_mode=True, mode="grid-mirror").astype(np.float32)


def pad_to_multiple(image: np.ndarray, multiple: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Mirror-pad bottom/right so both sides divide by ``multiple``; returns the original shape."""
    h, w = image.shape
    ph, pw = -h % multiple, -w % multiple
    if ph or pw:
        image = np.pad(image, ((0, ph), (0, pw)), mode="symmetric" if min(h, w) > max(ph, pw) else "edge")
    return image, (h, w)


@dataclass(frozen=True)
class Preprocessed:
    """The model-ready image and how it maps back to the original frame."""

    image: np.ndarray  # float32, at the model's pixel size, not padded
    scale: float  # model pixels per original pixel
    pixel_size_nm: float | None  # pixel size of ``image``
    feature_image: np.ndarray  # ``image`` normalised for the region features (the same array unless asked otherwise)


def preprocess(
    pixels: np.ndarray,
    pixel_size_nm: float | None,
    *,
    normalisation: Normalisation,
    model_pixel_size_nm: float | None,
    feature_normalisation: Normalisation | None = None,
) -> Preprocessed:
    """Resample to the model's pixel size (when both sizes are known), median 3×3, normalise.

    ``feature_normalisation`` (when it differs from ``normalisation``) also gives the region
    features their own copy, normalised the way the classifier was trained; otherwise the features
    see the network's image.

    Resampling comes first so the median filter always acts at the sampling the network was
    trained at: at a finer camera sampling a 3×3 median would keep more fringe contrast than the
    network ever saw. An X-ray spike survives block averaging as one outlying model pixel, which
    the median then removes.

    Examples
    --------
    >>> out = preprocess(np.ones((64, 64), np.uint16), 0.025, normalisation="max", model_pixel_size_nm=0.05)
    >>> out.image.shape, out.scale
    ((32, 32), 0.5)
    """
    scale, sampled_nm, image = 1.0, pixel_size_nm, pixels
    if pixel_size_nm and model_pixel_size_nm and abs(pixel_size_nm / model_pixel_size_nm - 1.0) >= 1e-3:
        image = resample(pixels.astype(np.float32), pixel_size_nm / model_pixel_size_nm)
        scale = image.shape[0] / pixels.shape[0]
        sampled_nm = pixel_size_nm / scale
    filtered = median3x3(image)
    model_image = normalise(filtered, normalisation)
    own = feature_normalisation is not None and feature_normalisation != normalisation
    feature_image = normalise(filtered, feature_normalisation) if own else model_image
    return Preprocessed(model_image, scale, sampled_nm, feature_image)
