"""Classical segmentation baselines the papers compare their U-Nets with.

* :class:`OtsuBaseline` — Groschner et al. (2021): a global Otsu threshold of the intensity
  after a 3×3 median and a Gaussian that washes out the fringes (so only mass-thickness
  contrast is left).
* :class:`FourierAnnulusBaseline` — Groschner et al. (2021), after Buseck et al. (1988): keep an
  annulus of spatial frequencies around the lattice spacing, transform back, take the local
  fringe amplitude (smoothed), threshold it.
* :class:`BraggFilterBaseline` — Sadre et al. (2021): weighted Fourier transform
  ``G(q) = |q|·|F{I·W}|``, local maxima above ``G_thresh`` (at most 24), Gaussian apertures of
  width σ on them, inverse transform ``I_Bragg``, low-passed ``|I − I_Bragg|``, threshold
  ``M_thresh``.

Every baseline is a pydantic model whose fields are its parameters (so they round-trip through
JSON and can be stored in a profile manifest), with ``fit(images, masks)`` — a small grid search
maximising the Dice pooled over all pixels of the training images — and ``predict(image)``.

What counts as foreground is learnt, never assumed. For nanoparticles the particle is where the
lattice *is* (and is slightly darker); for the graphene of Sadre et al. the contamination is
where the graphene lattice is *missing* (large aperiodic residual). ``fit`` tries both
polarities and, for the Bragg filter, both signals (residual, lattice amplitude).

Parameters in pixels and cycles/pixel refer to the image the baseline is given: in
``latticewatch evaluate`` that is the image the network sees (resampled to the model's pixel
size and normalised), so fitted parameters carry over between data sets of the same profile.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from scipy import fft as sfft
from scipy import ndimage

from latticewatch.errors import ConfigError
from latticewatch.stages.preprocess import median3x3
from latticewatch.training.assess.metrics import counts_above, pooled_dice

log = logging.getLogger(__name__)

#: Quantiles of the pooled training scores tried as thresholds.
_THRESHOLD_QUANTILES = np.linspace(0.005, 0.995, 199)
#: At most this many pixels of a training set are used to place the candidate thresholds.
_QUANTILE_SAMPLE = 200_000


class BaselineError(ConfigError):
    """Baseline parameters that cannot be used (unknown name, bad values); the message says which."""


def _standardise(image: np.ndarray) -> np.ndarray:
    """Zero mean, unit standard deviation, float32 (flat images stay zero)."""
    x = np.asarray(image, np.float32)
    x = x - np.float32(x.mean())
    std = float(x.std())
    return x / np.float32(std) if std > 0 else x


def _smooth(x: np.ndarray, sigma_px: float) -> np.ndarray:
    return ndimage.gaussian_filter(x, sigma_px, mode="reflect") if sigma_px > 0 else x


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's (1979) threshold: the histogram split maximising the between-class variance.

    Examples
    --------
    >>> x = np.r_[np.zeros(100), np.ones(100)]
    >>> 0 < otsu_threshold(x) < 1
    True
    """
    v = np.asarray(values, np.float64).ravel()
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return lo
    hist, edges = np.histogram(v, bins=bins, range=(lo, hi))
    centres = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(hist)[:-1].astype(np.float64)
    w1 = v.size - w0
    s0 = np.cumsum(hist * centres)[:-1]
    m0 = s0 / np.maximum(w0, 1)
    m1 = (s0[-1] + hist[-1] * centres[-1] - s0) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(edges[1:-1][int(np.argmax(between))])


def best_threshold(scores: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> tuple[float, str, float]:
    """The global threshold and side (``"above"``/``"below"``) maximising pooled Dice.

    Candidate thresholds are quantiles of the pooled scores, all counted in one sweep
    (:func:`~latticewatch.training.assess.metrics.counts_above`).

    Returns
    -------
    (threshold, side, dice)
        ``side == "above"`` means foreground is ``score >= threshold``, ``"below"`` ``score < threshold``.
    """
    flat = np.concatenate([np.asarray(s, np.float32).ravel() for s in scores])
    step = max(1, flat.size // _QUANTILE_SAMPLE)
    candidates = np.unique(np.quantile(flat[::step], _THRESHOLD_QUANTILES))
    fg_above, bg_above, n_fg, n_bg = counts_above(scores, masks, candidates)
    best = (float(candidates[0]), "above", -1.0)
    for side, tp, fp in (("above", fg_above, bg_above), ("below", n_fg - fg_above, n_bg - bg_above)):
        fn = n_fg - tp
        den = 2 * tp + fp + fn
        dice = np.where(den > 0, 2 * tp / np.maximum(den, 1), 1.0)
        i = int(np.argmax(dice))
        if dice[i] > best[2]:
            best = (float(candidates[i]), side, float(dice[i]))
    return best


class Baseline(BaseModel):
    """Common interface: parameters as fields, ``fit``, ``score``, ``predict``, JSON round trip."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: ClassVar[str]
    fitted_dice: float | None = Field(None, description="pooled training Dice reached by fit")
    fitted_images: int = Field(0, ge=0, description="number of images fit used")

    def to_dict(self) -> dict[str, Any]:
        """The parameters as plain JSON types, with ``kind`` naming the baseline."""
        return {"kind": self.name, **self.model_dump(mode="json")}

    def predict(self, image: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def fit(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> Baseline:  # pragma: no cover
        raise NotImplementedError

    def _record_fit(self, dice: float, n: int) -> None:
        self.fitted_dice = round(float(dice), 6)
        self.fitted_images = n


def _check_training_set(images: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> None:
    if not images or len(images) != len(masks):
        raise BaselineError(f"fit needs matching, non-empty lists of images and masks ({len(images)} vs {len(masks)})")
    for i, (image, mask) in enumerate(zip(images, masks)):
        if np.shape(image) != np.shape(mask) or np.ndim(image) != 2:
            raise BaselineError(f"training pair {i}: image {np.shape(image)} and mask {np.shape(mask)} "
                                "must be equal 2-D shapes")


# ------------------------------------------------------------------------------------------ Otsu


class OtsuBaseline(Baseline):
    """Otsu threshold of the median-filtered, Gaussian-smoothed intensity.

    The smoothing width and which side of the threshold is foreground are fitted; the threshold
    itself is Otsu's, computed afresh for each image as in the papers.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> image = rng.normal(1.0, 0.1, (64, 64)); image[16:48, 16:48] -= 0.5
    >>> mask = np.zeros((64, 64), bool); mask[16:48, 16:48] = True
    >>> otsu = OtsuBaseline().fit([image], [mask])
    >>> otsu.foreground, float((otsu.predict(image) == mask).mean()) > 0.95
    ('dark', True)
    """

    name: ClassVar[str] = "otsu"
    smoothing_px: float = Field(2.0, ge=0, description="Gaussian σ after the 3×3 median, pixels")
    foreground: Literal["dark", "bright"] = "dark"

    #: σ values tried by fit; the larger ones average fringes of a few pixels' period away.
    SMOOTHING_GRID: ClassVar[tuple[float, ...]] = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0)

    def score(self, image: np.ndarray) -> np.ndarray:
        return _smooth(median3x3(np.asarray(image, np.float32)), self.smoothing_px)

    def _split(self, smoothed: np.ndarray, foreground: str) -> np.ndarray:
        t = otsu_threshold(smoothed)
        return smoothed <= t if foreground == "dark" else smoothed > t

    def predict(self, image: np.ndarray) -> np.ndarray:
        return self._split(self.score(image), self.foreground)

    def fit(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> OtsuBaseline:
        _check_training_set(images, masks)
        best = (-1.0, self.smoothing_px, self.foreground)
        for sigma in self.SMOOTHING_GRID:
            smoothed = [_smooth(median3x3(np.asarray(x, np.float32)), sigma) for x in images]
            for side in ("dark", "bright"):
                dice = pooled_dice([self._split(s, side) for s in smoothed], masks)
                if dice > best[0]:
                    best = (dice, sigma, side)
        self.smoothing_px, self.foreground = best[1], best[2]
        self._record_fit(best[0], len(images))
        return self


# ------------------------------------------------------------------------------ Fourier annulus


def _radius_grid(shape: tuple[int, int]) -> np.ndarray:
    """|k| in cycles/pixel on the half-plane grid of ``rfft2``."""
    ky = sfft.fftfreq(shape[0])[:, None]
    kx = sfft.rfftfreq(shape[1])[None, :]
    return np.hypot(ky, kx).astype(np.float32)


class FourierAnnulusBaseline(Baseline):
    """Band-pass annulus around the lattice spacing → local fringe amplitude → threshold.

    The image is standardised, its Fourier transform multiplied by an annulus
    ``k_low <= |k| <= k_high`` (cycles/pixel), transformed back, and the local RMS amplitude of
    the fringes taken (Gaussian of the squared band-passed image, σ = ``envelope_px``). That
    amplitude is divided by its median over the image — the level of the background, which
    covers most of a frame — so the threshold is a ratio that carries over between images of
    different dose and contrast.

    Examples
    --------
    >>> yy, xx = np.mgrid[:128, :128]
    >>> mask = (yy - 64) ** 2 + (xx - 64) ** 2 < 30**2
    >>> image = np.random.default_rng(0).normal(0, 1, (128, 128)) + 2 * mask * np.cos(2 * np.pi * xx / 5)
    >>> annulus = FourierAnnulusBaseline().fit([image], [mask])
    >>> round(1 / annulus.k_low, 1) >= 5 >= round(1 / annulus.k_high, 1), annulus.foreground
    (True, 'lattice')
    """

    name: ClassVar[str] = "fourier"
    k_low: float = Field(0.14, gt=0, le=0.5, description="inner radius of the annulus, cycles/pixel")
    k_high: float = Field(0.26, gt=0, le=0.75, description="outer radius of the annulus, cycles/pixel")
    envelope_px: float = Field(4.0, gt=0, description="Gaussian σ of the local amplitude, pixels")
    threshold: float = Field(1.5, description="amplitude / median amplitude at the foreground boundary")
    foreground: Literal["lattice", "no_lattice"] = "lattice"

    #: Annulus centres tried by fit (cycles/pixel): lattice periods from 2.2 to 16 pixels.
    CENTRE_GRID: ClassVar[tuple[float, ...]] = tuple(np.round(np.geomspace(0.0625, 0.45, 12), 4))
    HALF_WIDTH_GRID: ClassVar[tuple[float, ...]] = (0.12, 0.25, 0.4)  # relative to the centre
    ENVELOPE_GRID: ClassVar[tuple[float, ...]] = (2.0, 4.0, 8.0)

    def _spectrum(self, image: np.ndarray) -> np.ndarray:
        return sfft.rfft2(_standardise(image))

    def _score_from_spectrum(self, spectrum: np.ndarray, shape: tuple[int, int], k_low: float, k_high: float,
                             envelope_px: float) -> np.ndarray:
        radius = _radius_grid(shape)
        band = sfft.irfft2(spectrum * ((radius >= k_low) & (radius <= k_high)), s=shape)
        amplitude = np.sqrt(_smooth(band * band, envelope_px))
        median = float(np.median(amplitude))
        return amplitude / median if median > 0 else amplitude

    def score(self, image: np.ndarray) -> np.ndarray:
        image = np.asarray(image, np.float32)
        return self._score_from_spectrum(self._spectrum(image), image.shape, self.k_low, self.k_high, self.envelope_px)

    def predict(self, image: np.ndarray) -> np.ndarray:
        s = self.score(image)
        return s >= self.threshold if self.foreground == "lattice" else s < self.threshold

    def fit(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> FourierAnnulusBaseline:
        _check_training_set(images, masks)
        spectra = [(self._spectrum(x), np.shape(x)) for x in images]
        masks = [np.asarray(m, bool) for m in masks]

        def trial(k_low: float, k_high: float, envelope: float) -> tuple[float, str, float]:
            scores = [self._score_from_spectrum(f, shape, k_low, k_high, envelope) for f, shape in spectra]
            return best_threshold(scores, masks)

        # coarse to fine: where the lattice is (centre), then how wide and how smooth
        results = {}
        for centre in self.CENTRE_GRID:
            band = (centre * (1 - 0.25), min(0.75, centre * (1 + 0.25)))
            results[(band, 4.0)] = trial(*band, 4.0)
        (band, _), _ = max(results.items(), key=lambda item: item[1][2])
        centre = 0.5 * (band[0] + band[1])
        for half in self.HALF_WIDTH_GRID:
            for envelope in self.ENVELOPE_GRID:
                b = (centre * (1 - half), min(0.75, centre * (1 + half)))
                if (b, envelope) not in results:
                    results[(b, envelope)] = trial(*b, envelope)
        ((k_low, k_high), envelope), (threshold, side, dice) = max(results.items(), key=lambda item: item[1][2])
        self.k_low, self.k_high, self.envelope_px = round(float(k_low), 5), round(float(k_high), 5), envelope
        self.threshold, self.foreground = threshold, ("lattice" if side == "above" else "no_lattice")
        self._record_fit(dice, len(images))
        return self


# -------------------------------------------------------------------------------- Bragg filter


def _hann2d(shape: tuple[int, int]) -> np.ndarray:
    return (np.hanning(shape[0])[:, None] * np.hanning(shape[1])[None, :]).astype(np.float32)


class BraggFilterBaseline(Baseline):
    """The Bragg filter of Sadre et al. (2021), equations 4–6.

    1. standardise and mirror-pad the image (``pad_fraction`` of each side), so the filter does
       not see a wrap-around edge;
    2. ``G(q) = |q|·|F{I·W}|`` with a Hann window ``W``, smoothed by a Gaussian of
       ``peak_smoothing_px`` Fourier pixels and divided by its median (so ``peak_threshold`` is a
       ratio, independent of image size and dose);
    3. local maxima of ``G`` above ``peak_threshold``, the ``max_peaks`` strongest, taken in
       centro-symmetric pairs so the filtered image is real;
    4. ``I_Bragg = F⁻¹{F{I}·Σₙ exp(−|q − qₙ|²/2σ²)}`` with σ = ``aperture`` cycles/pixel;
    5. ``signal = "residual"``: Gaussian (``output_smoothing_px``) of ``|I − I_Bragg|``, the
       aperiodic part — Sadre's contamination map; ``signal = "lattice"``: Gaussian of
       ``|I_Bragg|``, the periodic part — where crystalline particles are;
    6. threshold: foreground is ``signal >= threshold`` (``above``) or ``<`` (``below``).

    Sadre et al. fitted σ, G_thresh and M_thresh with fivefold cross-validation (σ ≈ 0.0156
    1/px, 24 peaks, smoothing 2 and 5 px); ``fit`` searches a grid around those values.

    Examples
    --------
    >>> yy, xx = np.mgrid[:128, :128]
    >>> dirty = (yy - 64) ** 2 + (xx - 64) ** 2 < 30**2  # no lattice inside the disc
    >>> rng = np.random.default_rng(0)
    >>> lattice = np.cos(2 * np.pi * xx / 6) + np.cos(2 * np.pi * (xx + yy) / 7)
    >>> image = np.where(dirty, 2 * rng.normal(0, 1, (128, 128)), lattice) + 0.3 * rng.normal(0, 1, (128, 128))
    >>> bragg = BraggFilterBaseline().fit([image], [dirty])
    >>> bragg.fitted_dice > 0.8
    True
    """

    name: ClassVar[str] = "bragg"
    aperture: float = Field(0.0156, gt=0, lt=0.25, description="σ of the Gaussian apertures, cycles/pixel")
    peak_threshold: float = Field(8.0, gt=0, description="G_thresh: peak height over the median of G")
    max_peaks: int = Field(24, ge=2, description="most Bragg peaks used (pairs count twice)")
    peak_smoothing_px: float = Field(2.0, ge=0, description="Gaussian σ on G before peak finding, Fourier pixels")
    output_smoothing_px: float = Field(5.0, ge=0, description="Gaussian σ of the low-pass on the output, pixels")
    min_frequency: float = Field(0.03, ge=0, lt=0.5, description="peaks nearer the origin (cycles/pixel) are ignored")
    pad_fraction: float = Field(0.125, ge=0, le=0.5, description="mirror padding on each side, fraction of the side")
    signal: Literal["residual", "lattice"] = "residual"
    threshold: float = Field(1.0, description="M_thresh, in units of the standardised image")
    foreground: Literal["above", "below"] = "above"

    APERTURE_GRID: ClassVar[tuple[float, ...]] = (0.004, 0.008, 0.0156, 0.03)
    PEAK_THRESHOLD_GRID: ClassVar[tuple[float, ...]] = (4.0, 8.0, 16.0, 32.0)

    def _prepare(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[slice, slice]]:
        """Padded standardised image, its spectrum, the median-normalised weighted spectrum G, the crop back."""
        z = _standardise(image)
        h, w = z.shape
        ph, pw = int(round(self.pad_fraction * h)), int(round(self.pad_fraction * w))
        padded = np.pad(z, ((ph, ph), (pw, pw)), mode="symmetric") if ph or pw else z
        spectrum = sfft.fft2(padded)
        ky = sfft.fftfreq(padded.shape[0]).astype(np.float32)[:, None]
        kx = sfft.fftfreq(padded.shape[1]).astype(np.float32)[None, :]
        weighted = np.hypot(ky, kx) * np.abs(sfft.fft2(padded * _hann2d(padded.shape)))
        if self.peak_smoothing_px > 0:
            weighted = ndimage.gaussian_filter(weighted, self.peak_smoothing_px, mode="wrap")
        median = float(np.median(weighted))
        g = weighted / median if median > 0 else weighted
        return padded, spectrum, g, (slice(ph, ph + h), slice(pw, pw + w))

    def _peaks(self, g: np.ndarray, peak_threshold: float) -> np.ndarray:
        """Peak positions (cycles/pixel, (n, 2) as (ky, kx)), centro-symmetric pairs."""
        ny, nx = g.shape
        ky = sfft.fftfreq(ny)[:, None]
        kx = sfft.fftfreq(nx)[None, :]
        local_max = (g == ndimage.maximum_filter(g, size=5, mode="wrap")) & (g > peak_threshold)
        # one half-plane; the mirror image of each peak is added below
        half = (ky > 0) | ((ky == 0) & (kx > 0))
        local_max &= half & (np.hypot(ky, kx) >= self.min_frequency)
        rows, cols = np.nonzero(local_max)
        if rows.size == 0:
            return np.zeros((0, 2))
        order = np.argsort(g[rows, cols])[::-1][: self.max_peaks // 2]
        q = np.stack([ky[rows[order], 0], kx[0, cols[order]]], axis=1)
        return np.concatenate([q, -q])

    def _filtered(self, spectrum: np.ndarray, peaks: np.ndarray, aperture: float) -> np.ndarray:
        ny, nx = spectrum.shape
        if peaks.size == 0:
            return np.zeros((ny, nx), np.float32)
        ky = sfft.fftfreq(ny).astype(np.float32)
        kx = sfft.fftfreq(nx).astype(np.float32)
        mask = np.zeros((ny, nx), np.float32)
        for qy, qx in peaks:
            # separable Gaussian; differences wrap so an aperture near Nyquist stays whole
            dy = (ky - qy + 0.5) % 1.0 - 0.5
            dx = (kx - qx + 0.5) % 1.0 - 0.5
            mask += np.exp(-(dy * dy) / (2 * aperture**2))[:, None] * np.exp(-(dx * dx) / (2 * aperture**2))[None, :]
        return sfft.ifft2(spectrum * mask).real.astype(np.float32)

    def _signals(self, prepared, peak_threshold: float, aperture: float) -> dict[str, np.ndarray]:
        image, spectrum, g, crop = prepared
        bragg = self._filtered(spectrum, self._peaks(g, peak_threshold), aperture)
        out = {}
        for name, raw in (("residual", np.abs(image - bragg)), ("lattice", np.abs(bragg))):
            out[name] = _smooth(raw, self.output_smoothing_px)[crop]
        return out

    def score(self, image: np.ndarray) -> np.ndarray:
        prepared = self._prepare(np.asarray(image, np.float32))
        return self._signals(prepared, self.peak_threshold, self.aperture)[self.signal]

    def predict(self, image: np.ndarray) -> np.ndarray:
        s = self.score(image)
        return s >= self.threshold if self.foreground == "above" else s < self.threshold

    def fit(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> BraggFilterBaseline:
        _check_training_set(images, masks)
        prepared = [self._prepare(np.asarray(x, np.float32)) for x in images]
        masks = [np.asarray(m, bool) for m in masks]
        best: tuple[float, dict] = (-1.0, {})
        for peak_threshold in self.PEAK_THRESHOLD_GRID:
            for aperture in self.APERTURE_GRID:
                signals = [self._signals(p, peak_threshold, aperture) for p in prepared]
                for signal in ("residual", "lattice"):
                    threshold, side, dice = best_threshold([s[signal] for s in signals], masks)
                    if dice > best[0]:
                        best = (dice, {"peak_threshold": peak_threshold, "aperture": aperture, "signal": signal,
                                       "threshold": threshold, "foreground": side})
        for key, value in best[1].items():
            setattr(self, key, value)
        self._record_fit(best[0], len(images))
        return self


# ------------------------------------------------------------------------------------ registry

BASELINES: dict[str, type[Baseline]] = {b.name: b for b in (OtsuBaseline, FourierAnnulusBaseline, BraggFilterBaseline)}


def make_baseline(name: str) -> Baseline:
    """A baseline with default parameters, by name (``otsu``, ``fourier``, ``bragg``).

    >>> make_baseline("bragg").max_peaks
    24
    """
    try:
        return BASELINES[name]()
    except KeyError:
        raise BaselineError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}") from None


def baseline_from_dict(params: dict[str, Any], name: str | None = None) -> Baseline:
    """Rebuild a baseline from :meth:`Baseline.to_dict` output (e.g. a manifest's ``baselines``).

    >>> otsu = baseline_from_dict({"kind": "otsu", "smoothing_px": 4.0, "foreground": "bright"})
    >>> baseline_from_dict(otsu.to_dict()) == otsu
    True
    """
    params = dict(params)
    kind = params.pop("kind", name)
    if kind is None:
        raise BaselineError("baseline parameters without 'kind'")
    if name is not None and kind != name:
        raise BaselineError(f"baseline {name!r} holds parameters of kind {kind!r}")
    cls = BASELINES.get(kind)
    if cls is None:
        raise BaselineError(f"unknown baseline {kind!r}; choose from {', '.join(BASELINES)}")
    try:
        return cls.model_validate(params)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
        raise BaselineError(f"baseline {kind}: {problems}") from None
