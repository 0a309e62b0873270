"""The lattice-fringe frequency of an image, from its power spectrum (``calibrate pixel-size``).

Single crystals show as spots (`SPOT_CONTRAST` times their ring), refined to sub-pixel; many
small, randomly oriented crystals show as a ring, located by the centroid of its excess power.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import fft as sfft
from scipy import ndimage

from latticewatch.errors import InputError

#: Largest central square analysed (pixels); 1024² zero-padded to 2048² resolves 0.05 % of a
#: typical fringe frequency, far below the 1 % a magnification calibration needs.
MAX_MEASURE_SIDE = 1024
#: A spot whose power (3×3 mean) is this many times its ring's median is a lattice reflection.
#: White noise reaches ~20 in a 2048² padded spectrum (neighbouring bins of a windowed,
#: zero-padded transform are correlated, so the mean does not tame the extremes); the
#: reflections of a calibration crystal are hundreds to thousands.
SPOT_CONTRAST = 60.0


class FringeError(InputError):
    """No lattice fringes found where they were looked for."""


@dataclass(frozen=True)
class FringeMeasurement:
    """Measured fringe frequency of a calibration image.

    Attributes
    ----------
    frequency
        Spatial frequency of the fringes in cycles per pixel (1 / period).
    method
        ``"spots"`` (sub-pixel centroids of the reflections: single crystals) or ``"ring"``
        (radial power-spectrum profile: many randomly oriented crystals).
    n_spots
        Reflections averaged (a centro-symmetric pair counts two).
    contrast
        Spot power over its ring's median, or ring over its surroundings.
    spread
        Relative standard deviation of the individual spots' frequencies (0 for a ring).
    """

    frequency: float
    method: str
    n_spots: int
    contrast: float
    spread: float

    @property
    def period_px(self) -> float:
        return 1.0 / self.frequency


_YY, _XX = (a.ravel().astype(np.float64) for a in np.mgrid[-2:3, -2:3])
_QUADRATIC = np.column_stack([np.ones(25), _XX, _YY, _XX**2, _YY**2, _XX * _YY])


def _vertex_2d(window: np.ndarray) -> tuple[float, float]:
    """Sub-pixel (dy, dx) of the maximum of a 5×5 window: least-squares quadratic surface.

    Twenty-five samples average the shot noise of the spectrum, which three-point parabolas
    along each axis do not; a surface that is not a cap (or a vertex outside the window)
    falls back to the centre pixel.
    """
    _, b, c, d, e, f = np.linalg.lstsq(_QUADRATIC, window.ravel(), rcond=None)[0]
    hessian = np.array([[2 * d, f], [f, 2 * e]])
    if not (hessian[0, 0] < 0 and np.linalg.det(hessian) > 0):
        return 0.0, 0.0
    dx, dy = np.linalg.solve(hessian, [-b, -c])
    return (float(dy), float(dx)) if max(abs(dx), abs(dy)) <= 2 else (0.0, 0.0)


def _parabolic(lm: float, l0: float, lp: float) -> float:
    """Offset (−0.5..0.5) of the vertex of a parabola through three equally spaced samples."""
    den = lm - 2 * l0 + lp
    return 0.0 if den >= 0 else float(np.clip(0.5 * (lm - lp) / den, -0.5, 0.5))


@dataclass(frozen=True)
class _Spectrum:
    """Power spectrum of the windowed, zero-padded central square, with each bin's ring (radius)."""

    power: np.ndarray
    k: np.ndarray  # frequency of each row / column index (cycles/pixel)
    radius: np.ndarray  # frequency of each bin (cycles/pixel)
    ring: np.ndarray  # integer radius of each bin, in bins
    size: int

    @property
    def n_rings(self) -> int:
        return int(self.ring.max()) + 1


def _spectrum(image: np.ndarray) -> _Spectrum:
    x = np.asarray(image, np.float64)
    if x.ndim != 2 or min(x.shape) < 32:
        raise FringeError(f"need a 2-D image of at least 32×32 pixels, got shape {x.shape}")
    n = min(min(x.shape), MAX_MEASURE_SIDE)
    r0, c0 = (x.shape[0] - n) // 2, (x.shape[1] - n) // 2
    x = x[r0 : r0 + n, c0 : c0 + n]
    x = (x - x.mean()) * (np.hanning(n)[:, None] * np.hanning(n)[None, :])
    size = 2 * n
    power = np.abs(sfft.fft2(x, s=(size, size), workers=-1)) ** 2
    k = sfft.fftfreq(size)
    radius = np.hypot(k[:, None], k[None, :])
    return _Spectrum(power, k, radius, np.rint(radius * size).astype(np.intp), size)


def _spot_frequency(spec: _Spectrum, contrast: np.ndarray, inside: np.ndarray,
                    peak: tuple[int, int]) -> FringeMeasurement:
    """Sub-pixel radii of the reflections at the peak's radius (±2 %), averaged by strength."""
    best = float(contrast[peak])
    r_peak = float(spec.radius[peak])
    local_max = (contrast == ndimage.maximum_filter(contrast, size=5, mode="wrap")) & inside
    candidates = local_max & (np.abs(spec.radius - r_peak) <= 0.02 * r_peak) & (contrast >= 0.2 * best)
    log_power = np.log(np.maximum(ndimage.uniform_filter(spec.power, 3, mode="wrap"), 1e-300))
    frequencies, weights = [], []
    for r, c in zip(*np.nonzero(candidates)):
        rows = log_power.take(np.arange(r - 2, r + 3), axis=0, mode="wrap")
        dy, dx = _vertex_2d(rows.take(np.arange(c - 2, c + 3), axis=1, mode="wrap"))
        frequencies.append(math.hypot(spec.k[r] + dy / spec.size, spec.k[c] + dx / spec.size))
        weights.append(contrast[r, c])
    f = np.array(frequencies)
    mean = float(np.average(f, weights=weights))
    return FringeMeasurement(mean, "spots", len(f), best, float(f.std() / mean))


def _ring_frequency(spec: _Spectrum, frequency_range: tuple[float, float], best_spot: float) -> FringeMeasurement:
    """Centroid of the excess power of the ring-normalised radial profile (many small crystals)."""
    lo, hi = frequency_range
    n_rings, ring = spec.n_rings, spec.ring.ravel()
    profile = (np.bincount(ring, weights=spec.power.ravel(), minlength=n_rings)
               / np.maximum(np.bincount(ring, minlength=n_rings), 1))
    background = ndimage.median_filter(profile, size=max(9, n_rings // 16 * 2 + 1), mode="nearest")
    normalised = profile / np.maximum(background, 1e-300)
    bins = np.arange(n_rings) / spec.size
    usable = (bins >= lo) & (bins <= min(hi, 0.5))
    usable[[0, -1]] = False
    i = int(np.argmax(np.where(usable, normalised, -np.inf)))
    if normalised[i] < 1.5:
        raise FringeError(f"no lattice fringes found between {lo} and {hi} cycles/pixel (strongest reflection "
                          f"{best_spot:.1f}× its ring, strongest ring {normalised[i]:.2f}× its surroundings)")
    # Rings of small crystals are tens of bins wide and sit on a sloping background, so the
    # vertex of three bins is biased; the centroid of the power above the background, summed
    # over each ring (× r undoes the ring mean's 1/r), over the peak's upper half is not.
    excess = (profile - background) * np.arange(n_rings)
    top = excess[i]
    a, b = i, i
    while a > 1 and excess[a - 1] > 0.5 * top:
        a -= 1
    while b < n_rings - 2 and excess[b + 1] > 0.5 * top:
        b += 1
    if b - a >= 2:
        r = np.arange(a, b + 1)
        centre = float(np.sum(r * excess[a : b + 1]) / np.sum(excess[a : b + 1]))
    else:
        centre = i + _parabolic(*np.log(normalised[i - 1 : i + 2]))
    return FringeMeasurement(centre / spec.size, "ring", 0, float(normalised[i]), 0.0)


def measure_fringe_frequency(image: np.ndarray, *,
                             frequency_range: tuple[float, float] = (0.02, 0.5)) -> FringeMeasurement:
    """Lattice-fringe frequency (cycles/pixel) of an image, from its power spectrum.

    The central square (at most :data:`MAX_MEASURE_SIDE`) is Hann-windowed and zero-padded to
    twice its side. Each Fourier pixel is divided by the median power of its ring (radius), which
    flattens the 1/f background and Thon rings of the carbon and leaves lattice reflections as
    isolated spikes. If the strongest spike in ``frequency_range`` is at least
    :data:`SPOT_CONTRAST` times its ring, the reflections at the same radius (±2 %) are refined
    to sub-pixel by a least-squares quadratic surface through the log power around each, and
    their radii averaged (weighted by strength). Otherwise (rings of many small crystals) the
    centroid of the excess power of the ring-normalised radial profile is used.

    Examples
    --------
    >>> yy, xx = np.mgrid[:256, :256]
    >>> fringes = 100 + 10 * np.cos(2 * np.pi * (0.6 * xx + 0.8 * yy) / 7.3)
    >>> round(measure_fringe_frequency(fringes).period_px, 2)
    7.3
    """
    spec = _spectrum(image)
    ring_median = np.asarray(ndimage.median(spec.power, labels=spec.ring, index=np.arange(spec.n_rings)), np.float64)
    ring_median = np.maximum(ring_median, 1e-300)
    lo, hi = frequency_range
    inside = (spec.radius >= lo) & (spec.radius <= min(hi, 0.5))
    if not inside.any():
        raise FringeError(f"frequency range {lo}–{hi} cycles/pixel is empty")
    # 3×3 mean of the ring-normalised power: a reflection spans a few bins, a noise spike one
    contrast = ndimage.uniform_filter(spec.power / ring_median[spec.ring], 3, mode="wrap")
    peak = np.unravel_index(int(np.argmax(np.where(inside, contrast, -np.inf))), spec.power.shape)
    if contrast[peak] >= SPOT_CONTRAST:
        return _spot_frequency(spec, contrast, inside, peak)
    return _ring_frequency(spec, frequency_range, float(contrast[peak]))
