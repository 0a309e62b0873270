"""Domain check: does a segmentation look like the model understood the frame?

A network trained on particles on thin carbon, shown something else (graphene, a thick film, a
frame at a wrong scale), does not answer "no particles": it typically paints the whole frame as one
"particle", or hovers near p = 0.5 everywhere. Both are visible in the probability map and the
labelled mask alone. A frame can also look like nothing the network was trained on and still get a
confident, plausible-looking segmentation; the optional `InputReference` catches that from the
model input itself: a small descriptor of the preprocessed image (`input_descriptor`) compared with
the training frames' (`input_distance`). The check is a pure function of these arrays and the
profile's `DomainRules`.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

#: Side of the square tiles the descriptor is measured on, and how many along each axis (at most).
DESCRIPTOR_TILE_PX = 64
DESCRIPTOR_TILES_PER_AXIS = 4
#: Radial frequency bins of the power spectrum, log-spaced from 1/tile to Nyquist (cycles per pixel).
DESCRIPTOR_BINS = 12
_BLOCK_PX = 16  # local-variance blocks inside each tile
_FLOOR = 1e-12  # power and variance floor: a constant frame gives a finite, very distant descriptor
#: Names of the descriptor's entries, in order (`input_descriptor`).
DESCRIPTOR_FEATURES = (
    *(f"log_power_{i:02d}" for i in range(DESCRIPTOR_BINS)),
    "log_variance_spread",  # std of log local variance: how uneven the texture is across the frame
    "log_variance_range",  # its 10–90 % range
    "spectral_peak",  # log10 max/median power at 0.08–0.4 cycles/px: lattice fringes make Bragg spots
)


class DomainRules(BaseModel):
    """When a frame is out of the model's domain (the manifest's ``domain`` table); ``None`` switches a test off.

    The defaults were checked on the real tiles of ``shared/data/real-nanoparticles`` and the demo's
    synthetic frames with the shipped nanoparticle profiles (0.1.0, max normalisation, and 0.2.0,
    z-score): the largest true particle fraction there is 0.86 (Au5nm_c31_r1, one particle touching
    all four edges, which 0.2.0 segments as 0.92), so a frame is flagged only where the segmentation
    itself is implausible: a region filling ≥ 95 % of the frame, or most pixels undecided.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_spanning_region_fraction: float | None = Field(
        0.95, gt=0, le=1,
        description="flag when the largest region touches all four edges and covers more than this fraction")
    max_foreground_fraction: float | None = Field(
        0.98, gt=0, le=1, description="flag when the foreground as a whole covers more than this fraction")
    uncertain_band: tuple[float, float] = Field(
        (0.3, 0.7), description="probabilities in this closed interval count as undecided")
    max_uncertain_fraction: float | None = Field(
        0.5, ge=0, le=1, description="flag when more than this fraction of pixels is undecided")
    reference: InputReference | None = Field(
        None, description="the training frames' input statistics (`latticewatch calibrate domain`); "
        "flag a frame whose model input is farther from them than its limit")

    @model_validator(mode="after")
    def _ordered_band(self) -> DomainRules:
        lo, hi = self.uncertain_band
        if not 0 <= lo <= hi <= 1:
            raise ValueError(f"uncertain_band must be 0 ≤ low ≤ high ≤ 1, got {self.uncertain_band}")
        return self


class InputReference(BaseModel):
    """The training frames' model-input statistics (`input_descriptor`): mean, shrunk covariance, limit.

    Written by ``latticewatch calibrate domain`` from the frames a profile was trained on. A frame whose
    Mahalanobis distance from ``mean`` exceeds ``limit`` is flagged: its statistics are unlike training.

    Examples
    --------
    >>> ref = InputReference(features=("a", "b"), mean=(0.0, 0.0), covariance=((1.0, 0.0), (0.0, 4.0)), limit=3.0,
    ...                      n_frames=10)
    >>> ref.distance(np.array([3.0, 2.0]))
    3.1622776601683795
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    descriptor: str = Field("log-power-v1", description="which `input_descriptor` the numbers describe")
    features: tuple[str, ...] = DESCRIPTOR_FEATURES
    mean: tuple[float, ...]
    covariance: tuple[tuple[float, ...], ...] = Field(description="shrunk towards its diagonal (see calibrate)")
    limit: float = Field(gt=0, description="flag above this distance")
    n_frames: int = Field(ge=2, description="training frames the statistics come from")
    _precision: np.ndarray = PrivateAttr()

    @model_validator(mode="after")
    def _consistent(self) -> InputReference:
        n = len(self.features)
        if len(self.mean) != n or len(self.covariance) != n or any(len(row) != n for row in self.covariance):
            raise ValueError(f"reference: mean and covariance must have {n} entries per side, one per feature")
        try:
            self._precision = np.linalg.inv(np.asarray(self.covariance, np.float64))
        except np.linalg.LinAlgError:
            raise ValueError("reference: the covariance is singular") from None
        return self

    def distance(self, descriptor: np.ndarray) -> float:
        """Mahalanobis distance of one descriptor from the training mean."""
        delta = np.asarray(descriptor, np.float64) - np.asarray(self.mean)
        return float(np.sqrt(max(delta @ self._precision @ delta, 0.0)))


def _tiles(image: np.ndarray) -> np.ndarray:
    t, n = DESCRIPTOR_TILE_PX, DESCRIPTOR_TILES_PER_AXIS
    h, w = image.shape
    if h < t or w < t:
        image = np.pad(image, ((0, max(0, t - h)), (0, max(0, t - w))), mode="symmetric")
        h, w = image.shape
    rows = np.unique(np.linspace(0, h - t, n).astype(int))
    cols = np.unique(np.linspace(0, w - t, n).astype(int))
    return np.stack([image[r : r + t, c : c + t] for r in rows for c in cols]).astype(np.float32)


def _spectrum_geometry() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    t = DESCRIPTOR_TILE_PX
    radius = np.hypot(np.fft.fftfreq(t)[:, None], np.fft.rfftfreq(t)[None, :])
    bins = np.digitize(radius, np.geomspace(1.0 / t, 0.5, DESCRIPTOR_BINS + 1)) - 1
    inside = (bins >= 0) & (bins < DESCRIPTOR_BINS)
    window = np.outer(np.hanning(t), np.hanning(t)).astype(np.float32)
    return bins[inside], inside, (radius > 0.08) & (radius < 0.4), window


_BINS, _INSIDE, _FRINGE_BAND, _WINDOW = _spectrum_geometry()
_BIN_COUNTS = np.bincount(_BINS, minlength=DESCRIPTOR_BINS)


def input_descriptor(image: np.ndarray) -> np.ndarray:
    """What the model input looks like, in `DESCRIPTOR_FEATURES` order (float64).

    Measured on up to 16 tiles of 64² px spread over the (preprocessed, model-resolution) image, so it
    costs about the same on any frame size: the shape of the radially averaged power spectrum (log10
    of each bin's share of the power: independent of contrast and normalisation; the pixel size shows
    as where the power sits), how unevenly the local variance spreads (particles on carbon vs a
    uniform texture), and how peaked the spectrum is where lattice fringes would be.

    Examples
    --------
    >>> noise = np.random.default_rng(0).normal(size=(256, 256)).astype(np.float32)
    >>> d = input_descriptor(noise)
    >>> d.shape, bool(np.all(np.abs(d[:DESCRIPTOR_BINS] + np.log10(DESCRIPTOR_BINS)) < 0.3))  # white: flat
    ((15,), True)
    """
    tiles = _tiles(np.asarray(image))
    tiles -= tiles.mean(axis=(1, 2), keepdims=True)
    power = (np.abs(np.fft.rfft2(tiles * _WINDOW)) ** 2).mean(axis=0)
    band = np.bincount(_BINS, weights=power[_INSIDE], minlength=DESCRIPTOR_BINS) / _BIN_COUNTS
    shape = np.log10(band / max(float(band.sum()), _FLOOR) + _FLOOR)
    b, t = _BLOCK_PX, DESCRIPTOR_TILE_PX
    blocks = tiles.reshape(len(tiles), t // b, b, t // b, b).var(axis=(2, 4), dtype=np.float64)
    log_var = np.log(blocks + _FLOOR * max(float(blocks.mean()), _FLOOR))
    lo, hi = np.percentile(log_var, [10, 90])
    fringe = power[_FRINGE_BAND]
    peak = np.log10((float(fringe.max()) + _FLOOR) / (float(np.median(fringe)) + _FLOOR))
    return np.concatenate([shape, [log_var.std(), hi - lo, peak]])


def _percent(fraction: float, digits: int = 1) -> str:
    return f"{100 * fraction:.{digits}f} %"


def _touches_all_edges(region: np.ndarray) -> bool:
    return bool(region[0].any() and region[-1].any() and region[:, 0].any() and region[:, -1].any())


def out_of_domain(probability: np.ndarray, labels: np.ndarray, rules: DomainRules,
                  image: np.ndarray | None = None) -> tuple[str, ...]:
    """Why the segmentation of a frame is not to be trusted; empty when it looks like the model's domain.

    Parameters
    ----------
    probability
        Foreground probability at model resolution.
    labels
        The isolated regions (0 background, 1…n regions) at the same resolution.
    rules
        The profile's thresholds.
    image
        The preprocessed model input (`Preprocessed.image`), compared with ``rules.reference`` when
        both are given.

    Examples
    --------
    >>> rules = DomainRules()
    >>> labels = np.ones((64, 64), np.int32)  # one "particle" filling the frame
    >>> out_of_domain(np.full((64, 64), 0.62, np.float32), labels, rules)[0]
    'one region spans the frame: 100.0 % of it, touching all four edges (limit 95 %)'
    >>> out_of_domain(np.zeros((64, 64), np.float32), np.zeros((64, 64), np.int32), rules)
    ()
    """
    reasons = []
    size = max(labels.size, 1)
    # one pass over the labels gives both the largest region and the foreground
    areas = np.bincount(labels.ravel(), minlength=1)
    foreground = int(labels.size - areas[0])
    if rules.max_spanning_region_fraction is not None and foreground:
        areas[0] = 0
        largest = int(areas.argmax())
        fraction = areas[largest] / size
        if fraction > rules.max_spanning_region_fraction and _touches_all_edges(labels == largest):
            reasons.append(f"one region spans the frame: {_percent(fraction)} of it, touching all four edges "
                           f"(limit {_percent(rules.max_spanning_region_fraction, 0)})")
    if rules.max_foreground_fraction is not None:
        fraction = foreground / size
        if fraction > rules.max_foreground_fraction:
            reasons.append(f"foreground covers {_percent(fraction)} of the frame "
                           f"(limit {_percent(rules.max_foreground_fraction, 0)})")
    if rules.max_uncertain_fraction is not None:
        lo, hi = rules.uncertain_band
        fraction = np.count_nonzero((probability >= lo) & (probability <= hi)) / max(probability.size, 1)
        if fraction > rules.max_uncertain_fraction:
            reasons.append(f"probability near 0.5: {_percent(fraction)} of pixels with p in [{lo:g}, {hi:g}] "
                           f"(limit {_percent(rules.max_uncertain_fraction, 0)})")
    if rules.reference is not None and image is not None:
        distance = rules.reference.distance(input_descriptor(image))
        if not distance <= rules.reference.limit:  # also catches NaN
            reasons.append(f"input statistics unlike training: distance {distance:.1f} "
                           f"(limit {rules.reference.limit:.1f})")
    return tuple(reasons)
