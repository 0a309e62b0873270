"""Fast analytic generator of labelled HRTEM micrographs of nanoparticles on amorphous carbon.

The images are not a multislice simulation; they are built directly in image space, which makes a
512×512 frame cost a few tens of milliseconds on one core and gives exact ground truth:

* **Amorphous carbon** everywhere: white noise filtered in Fourier space by a phase-contrast
  transfer function ``sin χ(k)`` (random defocus and Cs, so the power spectrum shows Thon rings)
  times a temporal-coherence damping envelope, plus a faint long-range thickness variation.
* **Particles**: random convex polygons or ellipses of 2–10 nm equivalent diameter carrying
  lattice fringes ``a·cos(2π g·r + φ)`` of spacing 0.20–0.35 nm. Two crossed sets (with weak
  ``g₁ ± g₂`` cross terms) stand for a particle on zone axis with atomic-column contrast; one set
  for a misoriented particle. Fringe contrast ramps up over a few tenths of a nanometre from the
  edge (thin rims of a rounded particle), and the carbon shows through the particle at reduced
  weight.
* **Weak amplitude contrast**: on average a particle is at most 2.5 % darker (or 0.5 % brighter)
  than the carbon, as in real HRTEM: a global threshold (Otsu on a smoothed frame) reaches a Dice
  of only ~0.2–0.6 on these frames, so a segmenter has to look at the fringes.
* **Shot noise**: ``counts = Poisson(dose · intensity)``, returned as ``uint16``.

Classes (see :data:`latticewatch.frame.CLASSES`):

``no_stacking_fault``
    Two crossed fringe sets, continuous across the particle.
``stacking_fault``
    Two crossed sets; across a plane parallel to the first set's lattice planes the second set
    is shifted by ±2π/3 — the in-plane displacement of an fcc ``ABC→ABA`` fault (``g·b = ±1/3``)
    — so the atomic columns are offset across the fault while the planes parallel to it are not.
``misoriented``
    One fringe set only (planes visible, columns not); in a fifth of the cases very weak.
``agglomeration``
    Two or three convex particles overlapping a little, each with its own lattice; their union is
    **one** instance.
``empty``
    Only for :func:`generate_region`: pure carbon, with a blob in ``mask`` standing for a region
    a segmenter found by mistake.

Nyquist: the fringe period is kept at or above :data:`MIN_FRINGE_PERIOD_PX` pixels, so at coarse
pixel sizes the lower end of the spacing range is raised (0.25 nm at 0.1 nm/pixel); pixel sizes
where no spacing of the range survives are refused. Cross terms ``g₁ ± g₂`` above that frequency
are left out instead of aliasing. Particle diameters are capped so one body fits in the image.
See :func:`usable_spacing_range_nm`.

Everything is drawn from the ``numpy.random.Generator`` passed in, in a fixed order, so a seed
reproduces an image bit for bit (for a given numpy/scipy).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import fft as sfft
from scipy.spatial import ConvexHull

from latticewatch.frame import CLASSES

logger = logging.getLogger("latticewatch.testing.synthetic")

#: Identifies the image model; stored in ``params`` so a dataset records what made it.
GENERATOR = "latticewatch.analytic/1"

#: Classes a particle in a frame can have (``empty`` is a region class only).
PARTICLE_CLASSES: tuple[str, ...] = tuple(c for c in CLASSES if c != "empty")

#: Default class mix of particles in a frame; roughly the paper's training set (71 stacking
#: fault, 156 no fault, 80 misoriented, 60 agglomerations), flattened so rare classes still appear.
DEFAULT_CLASS_WEIGHTS: dict[str, float] = {
    "stacking_fault": 0.25,
    "no_stacking_fault": 0.3,
    "misoriented": 0.25,
    "agglomeration": 0.2,
}

#: Lattice spacings drawn for the fringes (nm): d-spacings of Au, CdSe and friends.
SPACING_RANGE_NM: tuple[float, float] = (0.20, 0.35)
#: Shortest fringe period rendered (pixels). 2 would be Nyquist; 2.5 keeps the fringe peak clear
#: of the Nyquist edge so that a resampling by the pipeline does not alias it.
MIN_FRINGE_PERIOD_PX = 2.5
#: Equivalent-circle diameters of single particles (nm).
DIAMETER_RANGE_NM: tuple[float, float] = (2.0, 10.0)
#: Pixel sizes the generator is tested at (nm/pixel); others work while fringes stay resolvable.
PIXEL_SIZE_RANGE_NM: tuple[float, float] = (0.02, 0.1)

# Contrast model, in units of the mean intensity (1.0 = vacuum-level beam through thin carbon).
_CARBON_STD = (0.04, 0.09)  # granular phase contrast of ~3 nm amorphous carbon
_THICKNESS_STD = (0.0, 0.015)  # slow mass-thickness variation of the support film
_THICKNESS_SIGMA_NM = (2.0, 6.0)
_FRINGE_AMPLITUDE = (0.05, 0.15)  # per fringe set
_SECOND_SET_RATIO = (0.6, 1.0)  # on zone axis both sets are comparably strong
_WEAK_AMPLITUDE = (0.015, 0.04)  # the "very weak lattice" misoriented variant
_WEAK_MISORIENTED_P = 0.2
_CROSS_TERM = (0.0, 0.6)  # g1±g2 beams, relative to sqrt(a1·a2)
_SET_ANGLE_DEG = (55.0, 90.0)  # angle between the two sets (fcc [110]: 70.5°, [001]: 90°, hcp 60°)
_EQUAL_SPACING_P = 0.4  # chance that both sets share a spacing (e.g. {111}/{11-1})
_ABSORPTION = (-0.005, 0.025)  # mean darkening of a particle: deliberately tiny
_CARBON_IN_PARTICLE = (0.3, 0.7)  # weight of the carbon texture seen through a particle
_EDGE_TAPER_NM = (0.15, 0.5)  # fringe contrast ramps up over this distance from the edge
_FAULT_SHIFT_RAD = 2.0 * math.pi / 3.0
_FAULT_KEEP_OUT = 0.3  # the fault plane leaves at least this fraction of the width on each side
_AGGLOMERATE_OVERLAP = (0.1, 0.45)  # overlap along the centre line, fraction of the smaller radius
_AGGLOMERATE_CROSSED_P = 0.6  # members showing two crossed sets (else one)
_DEFOCUS_NM = (-120.0, -20.0)  # underfocus, where carbon shows its familiar Thon rings
_CS_MM = (0.0, 1.2)  # from aberration-corrected to a plain FEG objective
_FOCAL_SPREAD_NM = (2.0, 5.0)  # temporal coherence: information limit ~0.12–0.2 nm
_VOLTAGES_KV = (200.0, 300.0)
_ELLIPSE_P = 0.4
_MIN_GAP_NM = 0.3  # between neighbouring particles so the binary mask keeps them apart
_COVERAGE = (0.05, 0.30)


@dataclass(frozen=True)
class SyntheticParticle:
    """Ground truth for one instance of a synthetic image.

    Attributes
    ----------
    instance
        Value of this particle in ``SyntheticImage.instances`` (1..n).
    label
        One of :data:`PARTICLE_CLASSES` (never ``"empty"``).
    centre_px
        ``(row, col)`` of the area centroid of the whole (unclipped) shape; for agglomerates the
        area-weighted mean of the members' centroids. May lie near or, rarely, beyond an edge.
    diameter_nm
        Equivalent-circle diameter ``sqrt(4·area/π)`` of the whole shape (for agglomerates of the
        union, measured on the pixel grid), including any part cut off by the image edge.
    fringe_spacings_nm
        Lattice spacing of each rendered fringe set (agglomerates: all members' sets in order).
    fault
        For ``stacking_fault``: ``normal`` (unit ``(row, col)``, equal to the direction of the
        first set's wave vector), ``point_px`` (a point on the plane), ``offset_nm`` (signed
        distance of the plane from ``centre_px`` along ``normal``), ``phase_shift_rad`` (added to
        fringe set ``shifted_set`` where ``(r - point_px)·normal > 0``), ``plane_set`` (the set
        whose lattice planes are parallel to the fault). ``None`` otherwise.
    fringe_angles_deg
        Direction of each set's wave vector ``g``: ``atan2(g_row, g_col)`` in degrees, in
        [0, 180). The fringes run perpendicular to it. ``g = (sin θ, cos θ)/d`` in (row, col).
    touches_edge
        Whether the instance has pixels on the first or last row or column.
    detail
        Further truth, JSON-serialisable: ``amplitudes``, ``phases_rad`` (phase of each set at
        ``centre_px``), ``shape`` (``polygon``/``ellipse``), ``variant`` for misoriented
        (``planes``/``weak``), ``members`` for agglomerates (one dict per member).
    """

    instance: int
    label: str
    centre_px: tuple[float, float]
    diameter_nm: float
    fringe_spacings_nm: tuple[float, ...]
    fault: dict | None
    fringe_angles_deg: tuple[float, ...] = ()
    touches_edge: bool = False
    detail: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SyntheticImage:
    """A synthetic micrograph with its exact ground truth.

    Attributes
    ----------
    image
        ``uint16`` electron counts (Poisson shot noise at ``params["dose_per_px"]``).
    mask
        ``uint8`` binary particle mask, 1 = particle; always ``instances > 0`` except for an
        ``empty`` region, where it marks the falsely segmented carbon blob.
    instances
        ``int32`` instance map, 0 = background, values match ``SyntheticParticle.instance``.
    particles
        Per-instance records, ordered by instance number.
    pixel_size_nm
        Sampling (nm/pixel).
    params
        Everything drawn for the image (dose, defocus, …), JSON-serialisable.
    expected
        ``float32`` noise-free expected counts ``dose · intensity``; handy as a denoising target
        and for checking the shot noise. ``image`` is ``Poisson(expected)``.
    """

    image: np.ndarray
    mask: np.ndarray
    instances: np.ndarray
    particles: tuple[SyntheticParticle, ...]
    pixel_size_nm: float
    params: dict
    expected: np.ndarray | None = None


# --------------------------------------------------------------------------------------------
# Public helpers


def usable_spacing_range_nm(pixel_size_nm: float) -> tuple[float, float]:
    """Fringe spacings that can be rendered at a pixel size without aliasing.

    The lower bound of :data:`SPACING_RANGE_NM` is raised to ``MIN_FRINGE_PERIOD_PX`` pixels.

    Parameters
    ----------
    pixel_size_nm
        Sampling in nm/pixel.

    Returns
    -------
    tuple of float
        ``(lowest, highest)`` spacing in nm.

    Raises
    ------
    ValueError
        When the pixel size is not positive or too coarse for any spacing of the range.

    Examples
    --------
    >>> usable_spacing_range_nm(0.05)
    (0.2, 0.35)
    >>> usable_spacing_range_nm(0.1)
    (0.25, 0.35)
    """
    if not (pixel_size_nm > 0 and math.isfinite(pixel_size_nm)):
        raise ValueError(f"pixel_size_nm must be a positive number, got {pixel_size_nm!r}")
    lo = max(SPACING_RANGE_NM[0], MIN_FRINGE_PERIOD_PX * pixel_size_nm)
    hi = SPACING_RANGE_NM[1]
    if lo > hi:
        coarsest = hi / MIN_FRINGE_PERIOD_PX
        raise ValueError(
            f"pixel_size_nm={pixel_size_nm} is too coarse to show lattice fringes of "
            f"{SPACING_RANGE_NM[0]}–{hi} nm; use at most {coarsest:.3f} nm/pixel"
        )
    return (round(lo, 6), hi)


def generate_frame(
    rng: np.random.Generator,
    shape: tuple[int, int] = (512, 512),
    pixel_size_nm: float = 0.05,
    n_particles: int | None = None,
    class_weights: Mapping[str, float] | None = None,
    dose_range: tuple[float, float] = (20.0, 200.0),
    diameter_range_nm: tuple[float, float] = DIAMETER_RANGE_NM,
) -> SyntheticImage:
    """Make a synthetic HRTEM frame: particles of random classes scattered on carbon.

    Parameters
    ----------
    rng
        Source of all randomness; the same generator state gives the same frame.
    shape
        ``(rows, cols)`` of the frame.
    pixel_size_nm
        Sampling in nm/pixel (tested for 0.02–0.1, see :func:`usable_spacing_range_nm`).
    n_particles
        Number of particle instances (an agglomerate counts as one). ``None`` draws a target
        coverage of 5–30 % of the frame area and adds particles until it is reached. When the
        frame is too crowded for the number asked for, fewer are placed and
        ``params["n_placed"]`` says how many.
    class_weights
        Relative frequency of each label of :data:`PARTICLE_CLASSES`; missing labels get 0.
        Default :data:`DEFAULT_CLASS_WEIGHTS`.
    dose_range
        Dose in electrons per pixel, drawn log-uniformly from ``(low, high)``; equal bounds fix it.
    diameter_range_nm
        Equivalent diameters of single particles and agglomerate members, capped so that a body
        fits in 60 % of the shorter side.

    Returns
    -------
    SyntheticImage
        Particles do not overlap each other (a gap of at least 0.3 nm); agglomerates are the only
        touching ones and form single instances. Particles may be cut by the frame edge; every
        instance is still one connected piece.

    Examples
    --------
    >>> import numpy as np
    >>> frame = generate_frame(np.random.default_rng(0), shape=(256, 256), n_particles=2)
    >>> frame.image.dtype, frame.image.shape, len(frame.particles)
    (dtype('uint16'), (256, 256), 2)
    >>> bool(np.array_equal(frame.mask, (frame.instances > 0).astype(np.uint8)))
    True
    """
    shape = _check_shape(shape)
    spacing_nm = usable_spacing_range_nm(pixel_size_nm)
    weights = _class_weights(class_weights)
    dose_lo, dose_hi = _check_dose(dose_range)
    if n_particles is not None and n_particles < 0:
        raise ValueError(f"n_particles must be >= 0 or None, got {n_particles}")
    # Cap diameters so that a body (agglomerates are about twice as wide) fits the frame.
    d_lo, d_hi = _check_diameters(diameter_range_nm, 0.6 * min(shape) * pixel_size_nm)

    optics = _draw_optics(rng, pixel_size_nm)
    dose = _draw_dose(rng, dose_lo, dose_hi)
    labels = list(weights)
    probabilities = np.array([weights[k] for k in labels])
    spacing_px = (spacing_nm[0] / pixel_size_nm, spacing_nm[1] / pixel_size_nm)
    diam_px = (d_lo / pixel_size_nm, d_hi / pixel_size_nm)
    gap_px = max(2.0, _MIN_GAP_NM / pixel_size_nm)

    target_coverage = float(rng.uniform(*_COVERAGE)) if n_particles is None else None
    target_area = (target_coverage or 0.0) * shape[0] * shape[1]
    placed: list[tuple[str, _Body, tuple[float, float]]] = []
    circles = np.zeros((0, 3))  # (row, col, radius) of placed bodies
    covered = 0.0
    failures = 0
    while failures < 30:
        if n_particles is None and covered >= target_area:
            break
        if n_particles is not None and len(placed) >= n_particles:
            break
        label = labels[int(rng.choice(len(labels), p=probabilities))]
        body = _make_body(rng, label, diam_px, spacing_px)
        if body.radius > 0.5 * min(shape):
            failures += 1
            continue
        centre = _place(rng, body, shape, circles, gap_px)
        if centre is None:
            failures += 1
            continue
        placed.append((label, body, centre))
        circles = np.vstack([circles, [centre[0], centre[1], body.radius]])
        covered += body.area_px
    if n_particles is not None and len(placed) < n_particles:
        logger.debug("placed %d of %d particles: frame too crowded", len(placed), n_particles)

    params: dict[str, Any] = {
        "class_weights": {k: float(v) for k, v in weights.items()},
        "diameter_range_nm": [d_lo, d_hi],
        "n_requested": n_particles,
        "target_coverage": target_coverage,
        "n_placed": len(placed),
    }
    return _compose(rng, shape, pixel_size_nm, placed, optics, dose, spacing_nm, params)


def generate_region(
    rng: np.random.Generator,
    label: str,
    size_px: int = 160,
    pixel_size_nm: float = 0.05,
    dose_range: tuple[float, float] = (20.0, 200.0),
    diameter_range_nm: tuple[float, float] = DIAMETER_RANGE_NM,
) -> SyntheticImage:
    """Make a square crop centred on one region of a given class, for classifier training.

    Parameters
    ----------
    rng
        Source of all randomness.
    label
        One of :data:`latticewatch.frame.CLASSES`. ``"empty"`` gives pure carbon whose ``mask``
        marks a random convex blob (what a segmenter might have found by mistake) while
        ``instances`` is 0 everywhere and ``particles`` is empty.
    size_px
        Side of the crop in pixels.
    pixel_size_nm
        Sampling in nm/pixel.
    dose_range
        Dose in electrons per pixel, drawn log-uniformly.
    diameter_range_nm
        Equivalent diameters, capped at 80 % of the crop side (agglomerate members at 45 %). A
        body whose outline would still reach beyond 90 % of the crop is shrunk (outline only, the
        lattice keeps its spacing), so its ``diameter_nm`` can fall below the range.

    Returns
    -------
    SyntheticImage
        One instance (number 1) centred in the crop, entirely inside it.

    Examples
    --------
    >>> import numpy as np
    >>> crop = generate_region(np.random.default_rng(1), "stacking_fault", size_px=128)
    >>> crop.image.shape, crop.particles[0].label, crop.particles[0].fault is not None
    ((128, 128), 'stacking_fault', True)
    >>> empty = generate_region(np.random.default_rng(1), "empty", size_px=128)
    >>> int(empty.instances.max()), bool(empty.mask.any())
    (0, True)
    """
    if label not in CLASSES:
        raise ValueError(f"label must be one of {CLASSES}, got {label!r}")
    shape = _check_shape((size_px, size_px))
    spacing_nm = usable_spacing_range_nm(pixel_size_nm)
    dose_lo, dose_hi = _check_dose(dose_range)
    d_lo, d_hi = _check_diameters(diameter_range_nm, 0.8 * size_px * pixel_size_nm)

    optics = _draw_optics(rng, pixel_size_nm)
    dose = _draw_dose(rng, dose_lo, dose_hi)
    spacing_px = (spacing_nm[0] / pixel_size_nm, spacing_nm[1] / pixel_size_nm)
    centre = ((size_px - 1) / 2.0, (size_px - 1) / 2.0)
    max_radius = 0.45 * size_px
    params: dict[str, Any] = {"label": label, "diameter_range_nm": [d_lo, d_hi]}

    if label == "empty":
        d_px = rng.uniform(d_lo, d_hi) / pixel_size_nm
        blob = _convex_shape(rng, d_px)
        blob = blob.scaled(min(1.0, max_radius / blob.radius))
        params["blob_diameter_nm"] = blob.equivalent_diameter * pixel_size_nm
        image = _compose(rng, shape, pixel_size_nm, [], optics, dose, spacing_nm, params)
        rr = np.arange(size_px, dtype=np.float32)[:, None] - np.float32(centre[0])
        cc = np.arange(size_px, dtype=np.float32)[None, :] - np.float32(centre[1])
        mask = (blob.signed_distance(rr, cc) >= 0).astype(np.uint8)
        return SyntheticImage(
            image=image.image,
            mask=mask,
            instances=image.instances,
            particles=(),
            pixel_size_nm=float(pixel_size_nm),
            params=image.params,
            expected=image.expected,
        )

    if label == "agglomeration":
        # Two or three members side by side need about twice the width of one.
        member_hi = max(d_lo, min(d_hi, 0.45 * size_px * pixel_size_nm))
        diam_px = (min(d_lo, member_hi) / pixel_size_nm, member_hi / pixel_size_nm)
    else:
        diam_px = (d_lo / pixel_size_nm, d_hi / pixel_size_nm)
    body = _make_body(rng, label, diam_px, spacing_px)
    if body.radius > max_radius:
        # Shrinking the geometry (not the lattice) keeps the crop's one region whole.
        body = body.scaled(max_radius / body.radius)
    return _compose(
        rng, shape, pixel_size_nm, [(label, body, centre)], optics, dose, spacing_nm, params
    )


# --------------------------------------------------------------------------------------------
# Geometry


@dataclass(frozen=True)
class _Shape:
    """A convex polygon around the origin, as half-planes ``n·p <= c`` in (row, col) pixels."""

    vertices: np.ndarray  # (V, 2)
    normals: np.ndarray  # (V, 2) outward unit normals
    offsets: np.ndarray  # (V,) c_i > 0
    area: float
    kind: str

    @property
    def radius(self) -> float:
        return float(np.sqrt((self.vertices**2).sum(axis=1)).max())

    @property
    def equivalent_diameter(self) -> float:
        return math.sqrt(4.0 * self.area / math.pi)

    def scaled(self, factor: float) -> _Shape:
        return _Shape(
            self.vertices * factor, self.normals, self.offsets * factor, self.area * factor**2,
            self.kind,
        )

    def signed_distance(self, rr: np.ndarray, cc: np.ndarray) -> np.ndarray:
        """Distance to the boundary, positive inside (exact inside a convex polygon).

        ``rr`` is a column and ``cc`` a row of coordinates relative to the shape's origin; the
        loop runs over the polygon's edges (at most ~40), each step a whole-array operation.
        """
        out = None
        for (nr, nc), c in zip(self.normals.astype(np.float32), self.offsets.astype(np.float32)):
            d = c - (nr * rr + nc * cc)
            out = d if out is None else np.minimum(out, d, out=out)
        return out

    def radial(self, direction: np.ndarray) -> float:
        """Distance from the origin to the boundary along a unit direction."""
        dots = self.normals @ direction
        ok = dots > 1e-12
        return float((self.offsets[ok] / dots[ok]).min())

    def contains(self, point: np.ndarray) -> bool:
        return bool((self.normals @ point <= self.offsets).all())


def _polygon(points: np.ndarray, kind: str) -> _Shape:
    """Convex hull of ``points``, centred on its area centroid, as half-planes."""
    hull = points[ConvexHull(points).vertices]
    r, c = hull[:, 0], hull[:, 1]
    r1, c1 = np.roll(r, -1), np.roll(c, -1)
    cross = r * c1 - r1 * c
    area2 = cross.sum()
    if area2 < 0:  # orient so that (dc, -dr) of each edge points outward
        hull = hull[::-1]
        r, c = hull[:, 0], hull[:, 1]
        r1, c1 = np.roll(r, -1), np.roll(c, -1)
        cross = r * c1 - r1 * c
        area2 = cross.sum()
    centroid = np.array([((r + r1) * cross).sum(), ((c + c1) * cross).sum()]) / (3.0 * area2)
    hull = hull - centroid
    edges = np.roll(hull, -1, axis=0) - hull
    normals = np.stack([edges[:, 1], -edges[:, 0]], axis=1)
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    offsets = (normals * hull).sum(axis=1)
    return _Shape(hull, normals, offsets, 0.5 * float(area2), kind)


def _convex_shape(rng: np.random.Generator, diameter_px: float) -> _Shape:
    """A random faceted polygon or ellipse with an equivalent diameter of ``diameter_px``."""
    aspect = math.sqrt(rng.uniform(1.0, 1.35))
    rotation = rng.uniform(0.0, math.pi)
    if rng.random() < _ELLIPSE_P:
        kind = "ellipse"
        t = np.linspace(0.0, 2.0 * math.pi, 36, endpoint=False)
        rad = np.ones_like(t)
    else:
        kind = "polygon"
        n = int(rng.integers(5, 11))
        t = (np.arange(n) + rng.uniform(-0.3, 0.3, n)) * (2.0 * math.pi / n) + rng.uniform(0, 7)
        rad = rng.uniform(0.85, 1.0, n)
    x, y = rad * np.cos(t) * aspect, rad * np.sin(t) / aspect
    cr, sr = math.cos(rotation), math.sin(rotation)
    points = np.stack([sr * x + cr * y, cr * x - sr * y], axis=1)
    shape = _polygon(points, kind)
    return shape.scaled(math.sqrt(math.pi * diameter_px**2 / 4.0 / shape.area))


# --------------------------------------------------------------------------------------------
# Crystals and bodies


@dataclass(frozen=True)
class _Crystal:
    """One convex crystal: outline, fringe sets and optional stacking fault, in pixels."""

    shape: _Shape
    offset: np.ndarray  # (row, col) of its centroid relative to the body centre
    waves: np.ndarray  # (S, 2) wave vectors in cycles/pixel, (row, col)
    amplitudes: np.ndarray  # (S,)
    phases: np.ndarray  # (S,) at the crystal centroid
    cross: tuple[float, float]  # amplitudes of the g1+g2 and g1-g2 terms (0 = left out)
    absorption: float
    carbon_weight: float
    fault: tuple[np.ndarray, float, float, int] | None  # (normal, offset_px, shift, set index)
    variant: str = ""

    def scaled(self, factor: float) -> _Crystal:
        fault = self.fault
        if fault is not None:
            fault = (fault[0], fault[1] * factor, fault[2], fault[3])
        return _Crystal(
            self.shape.scaled(factor), self.offset * factor, self.waves, self.amplitudes,
            self.phases, self.cross, self.absorption, self.carbon_weight, fault, self.variant,
        )

    def render(
        self, rr: np.ndarray, cc: np.ndarray, taper_px: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Mask, intensity change and carbon-weight factor on a local grid (see ``_Body``)."""
        rr = rr - np.float32(self.offset[0])
        cc = cc - np.float32(self.offset[1])
        sd = self.shape.signed_distance(rr, cc)
        inside = sd >= 0
        # sqrt ramp: the projected thickness of a rounded particle grows like sqrt(distance).
        weight = np.sqrt(np.clip(sd * np.float32(1.0 / taper_px), 0.0, 1.0))
        two_pi = np.float32(2.0 * math.pi)
        psis = []
        for k, ((gr, gc), phase) in enumerate(zip(self.waves, self.phases)):
            psi = (two_pi * np.float32(gr)) * rr + (
                (two_pi * np.float32(gc)) * cc + np.float32(phase)
            )
            if self.fault is not None and self.fault[3] == k:
                normal, offset, shift, _ = self.fault
                along = np.float32(normal[0]) * rr + np.float32(normal[1]) * cc
                side = along > np.float32(offset)
                psi = psi + np.where(side, np.float32(shift), np.float32(0.0))
            psis.append(psi)
        fringes = np.zeros(np.broadcast_shapes(rr.shape, cc.shape), dtype=np.float32)
        for a, psi in zip(self.amplitudes, psis):
            fringes += np.float32(a) * np.cos(psi)
        if len(psis) == 2:
            for sign, amp in zip((1.0, -1.0), self.cross):
                if amp > 0:
                    fringes += np.float32(amp) * np.cos(psis[0] + np.float32(sign) * psis[1])
        delta = weight * (fringes - np.float32(self.absorption))
        carbon_factor = 1.0 - np.float32(1.0 - self.carbon_weight) * weight
        return inside, delta, carbon_factor


@dataclass(frozen=True)
class _Body:
    """What becomes one instance: one crystal, or the members of an agglomerate."""

    crystals: tuple[_Crystal, ...]
    radius: float  # bounding circle around the body centre (px)
    area_px: float  # estimate used for coverage bookkeeping

    def scaled(self, factor: float) -> _Body:
        return _Body(
            tuple(c.scaled(factor) for c in self.crystals), self.radius * factor,
            self.area_px * factor**2,
        )

    def render(self, rr: np.ndarray, cc: np.ndarray, taper_px: float):
        union = delta = carbon = None
        for crystal in self.crystals:
            inside, d, cf = crystal.render(rr, cc, taper_px)
            if union is None:
                union, delta, carbon = inside, d, cf
            else:
                # Overlapping members are both in the beam: their fringes add (moiré) and the
                # carbon under them is seen through both.
                union = union | inside
                delta = delta + d
                carbon = carbon * cf
        return union, delta, np.maximum(carbon, 0.0)


def _lattice(
    rng: np.random.Generator, n_sets: int, spacing_px: tuple[float, float],
    amplitude: tuple[float, float],
):
    """Wave vectors, amplitudes, phases and cross-term amplitudes of one or two fringe sets."""
    d1 = rng.uniform(*spacing_px)
    theta1 = rng.uniform(0.0, math.pi)
    spacings, thetas = [d1], [theta1]
    a1 = rng.uniform(*amplitude)
    amplitudes = [a1]
    if n_sets == 2:
        d2 = d1 if rng.random() < _EQUAL_SPACING_P else rng.uniform(*spacing_px)
        angle = math.radians(rng.uniform(*_SET_ANGLE_DEG)) * (1.0 if rng.random() < 0.5 else -1.0)
        spacings.append(d2)
        thetas.append(theta1 + angle)
        amplitudes.append(a1 * rng.uniform(*_SECOND_SET_RATIO))
    thetas = np.mod(np.array(thetas), math.pi)
    spacings = np.array(spacings)
    waves = np.stack([np.sin(thetas), np.cos(thetas)], axis=1) / spacings[:, None]
    phases = rng.uniform(0.0, 2.0 * math.pi, n_sets)
    cross = (0.0, 0.0)
    if n_sets == 2:
        kappa = rng.uniform(*_CROSS_TERM) * math.sqrt(amplitudes[0] * amplitudes[1])
        f_max = 1.0 / MIN_FRINGE_PERIOD_PX
        # Beams g1±g2 beyond the rendering limit would alias: leave them out.
        cross = tuple(
            kappa if np.linalg.norm(waves[0] + s * waves[1]) <= f_max else 0.0 for s in (1.0, -1.0)
        )
    return waves, np.array(amplitudes), phases, cross


def _make_crystal(
    rng: np.random.Generator, kind: str, diameter_px: float, spacing_px: tuple[float, float],
) -> _Crystal:
    """``kind``: ``crossed``, ``fault`` (crossed + stacking fault) or ``single``."""
    shape = _convex_shape(rng, diameter_px)
    variant = ""
    if kind == "single":
        weak = rng.random() < _WEAK_MISORIENTED_P
        variant = "weak" if weak else "planes"
        lattice = _lattice(rng, 1, spacing_px, _WEAK_AMPLITUDE if weak else _FRINGE_AMPLITUDE)
    else:
        lattice = _lattice(rng, 2, spacing_px, _FRINGE_AMPLITUDE)
    waves = lattice[0]
    fault = None
    if kind == "fault":
        # Plane parallel to set 0's lattice planes (normal along g0); it shifts set 1 by g·b.
        normal = waves[0] / np.linalg.norm(waves[0])
        proj = shape.vertices @ normal
        lo, hi = proj.min(), proj.max()
        keep = _FAULT_KEEP_OUT * (hi - lo)
        offset = rng.uniform(lo + keep, hi - keep)
        shift = _FAULT_SHIFT_RAD * (1.0 if rng.random() < 0.5 else -1.0)
        fault = (normal, float(offset), shift, 1)
    return _Crystal(
        shape=shape,
        offset=np.zeros(2),
        waves=waves,
        amplitudes=lattice[1],
        phases=lattice[2],
        cross=lattice[3],
        absorption=rng.uniform(*_ABSORPTION),
        carbon_weight=rng.uniform(*_CARBON_IN_PARTICLE),
        fault=fault,
        variant=variant,
    )


def _make_body(
    rng: np.random.Generator, label: str, diameter_px: tuple[float, float],
    spacing_px: tuple[float, float],
) -> _Body:
    if label != "agglomeration":
        kind = {"stacking_fault": "fault", "no_stacking_fault": "crossed", "misoriented": "single"}[
            label
        ]
        crystal = _make_crystal(rng, kind, rng.uniform(*diameter_px), spacing_px)
        return _Body((crystal,), crystal.shape.radius, crystal.shape.area)

    n_members = 2 if rng.random() < 0.7 else 3
    members: list[_Crystal] = []
    for _ in range(n_members):
        kind = "crossed" if rng.random() < _AGGLOMERATE_CROSSED_P else "single"
        crystal = _make_crystal(rng, kind, rng.uniform(*diameter_px), spacing_px)
        if not members:
            members.append(crystal)
            continue
        for _attempt in range(20):
            anchor = members[int(rng.integers(len(members)))]
            angle = rng.uniform(0.0, 2.0 * math.pi)
            u = np.array([math.sin(angle), math.cos(angle)])
            ra, rb = anchor.shape.radial(u), crystal.shape.radial(-u)
            # Overlapping along the line between the centroids guarantees one connected union;
            # keeping the overlap below half the smaller radius keeps both lobes distinct.
            distance = ra + rb - rng.uniform(*_AGGLOMERATE_OVERLAP) * min(ra, rb)
            offset = anchor.offset + distance * u
            if not any(m.shape.contains(offset - m.offset) for m in members):
                break
        members.append(_with_offset(crystal, offset))
    areas = np.array([m.shape.area for m in members])
    centre = (areas[:, None] * np.array([m.offset for m in members])).sum(axis=0) / areas.sum()
    members = [_with_offset(m, m.offset - centre) for m in members]
    radius = max(float(np.linalg.norm(m.offset)) + m.shape.radius for m in members)
    return _Body(tuple(members), radius, float(areas.sum()))


def _with_offset(crystal: _Crystal, offset: np.ndarray) -> _Crystal:
    return _Crystal(
        crystal.shape, np.asarray(offset, dtype=float), crystal.waves, crystal.amplitudes,
        crystal.phases, crystal.cross, crystal.absorption, crystal.carbon_weight, crystal.fault,
        crystal.variant,
    )


def _place(
    rng: np.random.Generator, body: _Body, shape: tuple[int, int], circles: np.ndarray,
    gap: float, attempts: int = 40,
) -> tuple[float, float] | None:
    """A centre whose bounding circle keeps ``gap`` from the others, or None.

    Centres stay at least half a radius inside the frame, so a body may be cut by the edge but
    most of it (and both sides of any fault plane) remains visible. Every agglomerate member's
    centroid must be inside too: the segments joining them lie in the union, so the visible
    part of an agglomerate is always one connected piece.
    """
    radius = body.radius
    margin = 0.5 * radius
    lo = np.array([margin, margin])
    hi = np.array([shape[0] - 1 - margin, shape[1] - 1 - margin])
    if (hi < lo).any():
        return None
    members = np.array([c.offset for c in body.crystals])
    for _ in range(attempts):
        centre = rng.uniform(lo, hi)
        points = members + centre
        if (points < 0).any() or (points > np.array(shape) - 1).any():
            continue
        if len(circles):
            dist = np.hypot(circles[:, 0] - centre[0], circles[:, 1] - centre[1])
            if (dist < circles[:, 2] + radius + gap).any():
                continue
        return float(centre[0]), float(centre[1])
    return None


# --------------------------------------------------------------------------------------------
# Optics, carbon and composition


def _wavelength_nm(voltage_kv: float) -> float:
    """Relativistic electron wavelength."""
    v = voltage_kv * 1e3
    return 1.226426 / math.sqrt(v * (1.0 + 0.978476e-6 * v))


def _draw_optics(rng: np.random.Generator, pixel_size_nm: float) -> dict[str, float]:
    voltage = float(_VOLTAGES_KV[int(rng.integers(len(_VOLTAGES_KV)))])
    return {
        "voltage_kv": voltage,
        "wavelength_nm": _wavelength_nm(voltage),
        "defocus_nm": float(rng.uniform(*_DEFOCUS_NM)),
        "cs_mm": float(rng.uniform(*_CS_MM)),
        "focal_spread_nm": float(rng.uniform(*_FOCAL_SPREAD_NM)),
        "carbon_std": float(rng.uniform(*_CARBON_STD)),
        "thickness_std": float(rng.uniform(*_THICKNESS_STD)),
        "thickness_sigma_nm": float(rng.uniform(*_THICKNESS_SIGMA_NM)),
        "edge_taper_nm": float(max(rng.uniform(*_EDGE_TAPER_NM), pixel_size_nm)),
    }


def _draw_dose(rng: np.random.Generator, lo: float, hi: float) -> float:
    # Log-uniform: the low-dose end, where segmentation is hardest, is not under-represented.
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi)))) if hi > lo else float(lo)


@functools.lru_cache(maxsize=16)
def _frequency_grid(
    shape: tuple[int, int], pixel_size_nm: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """|k|² and |k|⁴ (nm⁻², nm⁻⁴) on the rfft2 grid, and each column's weight in the full
    spectrum. float32 is ample (phase errors < 1e-3 rad where the envelope lets anything through)
    and halves the cost of the filter, a third of a frame's time."""
    kr = sfft.fftfreq(shape[0], d=pixel_size_nm)
    kc = sfft.rfftfreq(shape[1], d=pixel_size_nm)
    k2 = kr[:, None] ** 2 + kc[None, :] ** 2
    k4 = (k2**2).astype(np.float32)
    k2 = k2.astype(np.float32)
    weight = np.full(kc.size, 2.0, dtype=np.float32)
    weight[0] = 1.0
    if shape[1] % 2 == 0:
        weight[-1] = 1.0
    for a in (k2, k4, weight):
        a.flags.writeable = False
    return k2, k4, weight


def _carbon(
    rng: np.random.Generator, shape: tuple[int, int], pixel_size_nm: float, optics: dict
) -> np.ndarray:
    """Zero-mean amorphous-carbon contrast: CTF-filtered white noise plus slow thickness."""
    k2, k4, weight = _frequency_grid(shape, pixel_size_nm)
    lam = optics["wavelength_nm"]
    cs = optics["cs_mm"] * 1e6
    f32 = np.float32
    chi = f32(math.pi * lam * optics["defocus_nm"]) * k2
    chi += f32(0.5 * math.pi * cs * lam**3) * k4
    ctf = np.sin(chi, out=chi)
    # Temporal-coherence envelope exp(-½(πλΔ)²k⁴): the information limit of the microscope.
    ctf *= np.exp(f32(-0.5 * (math.pi * lam * optics["focal_spread_nm"]) ** 2) * k4)
    sigma = optics["thickness_sigma_nm"]
    slow = np.exp(f32(-2.0 * math.pi**2 * sigma**2) * k2)
    n = shape[0] * shape[1]

    def scale(h: np.ndarray, std: float) -> float:
        # Factor giving filtered unit white noise the standard deviation ``std`` (Parseval).
        var = float(np.square(h).sum(axis=0) @ weight) / n
        return std / math.sqrt(var) if var > 0 else 0.0

    filt = ctf
    filt *= f32(scale(ctf, optics["carbon_std"]))
    filt += f32(scale(slow, optics["thickness_std"])) * slow
    filt[0, 0] = 0.0  # zero mean: the carbon changes texture, not the mean intensity
    white = rng.standard_normal(shape, dtype=np.float32)
    spectrum = sfft.rfft2(white)
    spectrum *= filt
    return sfft.irfft2(spectrum, s=shape)


def _compose(
    rng: np.random.Generator,
    shape: tuple[int, int],
    pixel_size_nm: float,
    placed: list[tuple[str, _Body, tuple[float, float]]],
    optics: dict,
    dose: float,
    spacing_nm: tuple[float, float],
    extra: dict,
) -> SyntheticImage:
    """Render bodies on carbon, add shot noise and collect the ground truth."""
    rows, cols = shape
    taper_px = optics["edge_taper_nm"] / pixel_size_nm
    particle = np.zeros(shape, dtype=np.float32)
    carbon_weight = np.ones(shape, dtype=np.float32)
    instances = np.zeros(shape, dtype=np.int32)
    records = []
    for instance, (label, body, (r0, c0)) in enumerate(placed, start=1):
        # Render on the whole (unclipped) bounding box so sizes are known even when cut.
        r_lo, r_hi = math.floor(r0 - body.radius) - 1, math.ceil(r0 + body.radius) + 2
        c_lo, c_hi = math.floor(c0 - body.radius) - 1, math.ceil(c0 + body.radius) + 2
        rr = (np.arange(r_lo, r_hi, dtype=np.float64) - r0).astype(np.float32)[:, None]
        cc = (np.arange(c_lo, c_hi, dtype=np.float64) - c0).astype(np.float32)[None, :]
        union, delta, cfactor = body.render(rr, cc, taper_px)
        fr = slice(max(r_lo, 0), min(r_hi, rows))
        fc = slice(max(c_lo, 0), min(c_hi, cols))
        lr = slice(fr.start - r_lo, fr.stop - r_lo)
        lc = slice(fc.start - c_lo, fc.stop - c_lo)
        inside = union[lr, lc]
        instances[fr, fc][inside] = instance
        particle[fr, fc] += delta[lr, lc]
        carbon_weight[fr, fc] *= cfactor[lr, lc]
        records.append(
            _record(instance, label, body, (r0, c0), int(union.sum()), pixel_size_nm)
        )

    carbon = _carbon(rng, shape, pixel_size_nm, optics)
    intensity = 1.0 + carbon * carbon_weight + particle
    np.maximum(intensity, 0.0, out=intensity)
    expected = (np.float32(dose) * intensity).astype(np.float32)
    counts = rng.poisson(expected)
    # 65535 is far above any dose in range; the clip only guards absurd caller doses.
    image = np.minimum(counts, np.iinfo(np.uint16).max).astype(np.uint16)

    edge = np.zeros(len(records) + 1, dtype=bool)
    for border in (instances[0], instances[-1], instances[:, 0], instances[:, -1]):
        edge[border] = True
    particles = tuple(
        SyntheticParticle(**{**rec, "touches_edge": bool(edge[rec["instance"]])}) for rec in records
    )
    mask = (instances > 0).astype(np.uint8)
    params: dict[str, Any] = {
        "generator": GENERATOR,
        "shape": [rows, cols],
        "pixel_size_nm": float(pixel_size_nm),
        "dose_per_px": float(dose),
        "spacing_range_nm": [float(spacing_nm[0]), float(spacing_nm[1])],
        **{k: float(v) for k, v in optics.items()},
        **extra,
        "coverage": float(mask.mean()),
        "labels": [p.label for p in particles],
    }
    return SyntheticImage(
        image=image,
        mask=mask,
        instances=instances,
        particles=particles,
        pixel_size_nm=float(pixel_size_nm),
        params=params,
        expected=expected,
    )


def _crystal_truth(crystal: _Crystal, pixel_size_nm: float) -> dict[str, Any]:
    norms = np.linalg.norm(crystal.waves, axis=1)
    angles = np.degrees(np.arctan2(crystal.waves[:, 0], crystal.waves[:, 1])) % 180.0
    return {
        "spacings_nm": tuple(float(pixel_size_nm / g) for g in norms),
        "angles_deg": tuple(float(a) for a in angles),
        "amplitudes": [float(a) for a in crystal.amplitudes],
        "phases_rad": [float(p) for p in crystal.phases],
        "cross_amplitudes": [float(a) for a in crystal.cross] if len(crystal.waves) == 2 else [],
        "absorption": float(crystal.absorption),
        "carbon_weight": float(crystal.carbon_weight),
        "shape": crystal.shape.kind,
    }


def _record(
    instance: int, label: str, body: _Body, centre: tuple[float, float], union_px: int,
    pixel_size_nm: float,
) -> dict[str, Any]:
    """Fields of a SyntheticParticle (``touches_edge`` is filled in once the map is complete)."""
    truths = [_crystal_truth(c, pixel_size_nm) for c in body.crystals]
    if label == "agglomeration":
        diameter = math.sqrt(4.0 * union_px / math.pi) * pixel_size_nm
        members = []
        for crystal, truth in zip(body.crystals, truths):
            members.append({
                "centre_px": [
                    centre[0] + float(crystal.offset[0]), centre[1] + float(crystal.offset[1])
                ],
                "diameter_nm": crystal.shape.equivalent_diameter * pixel_size_nm,
                "fringe_spacings_nm": list(truth["spacings_nm"]),
                "fringe_angles_deg": list(truth["angles_deg"]),
                **{k: truth[k] for k in ("amplitudes", "phases_rad", "cross_amplitudes", "shape")},
            })
        detail: dict[str, Any] = {"members": members}
    else:
        crystal, truth = body.crystals[0], truths[0]
        diameter = crystal.shape.equivalent_diameter * pixel_size_nm
        detail = {k: truth[k] for k in (
            "amplitudes", "phases_rad", "cross_amplitudes", "absorption", "carbon_weight", "shape"
        )}
        if crystal.variant:
            detail["variant"] = crystal.variant
    fault = None
    crystal = body.crystals[0]
    if crystal.fault is not None:
        normal, offset, shift, shifted = crystal.fault
        fault = {
            "normal": [float(normal[0]), float(normal[1])],
            "point_px": [
                centre[0] + offset * float(normal[0]), centre[1] + offset * float(normal[1])
            ],
            "offset_nm": float(offset * pixel_size_nm),
            "phase_shift_rad": float(shift),
            "shifted_set": int(shifted),
            "plane_set": 0,
        }
    return {
        "instance": instance,
        "label": label,
        "centre_px": (float(centre[0]), float(centre[1])),
        "diameter_nm": float(diameter),
        "fringe_spacings_nm": tuple(s for t in truths for s in t["spacings_nm"]),
        "fault": fault,
        "fringe_angles_deg": tuple(a for t in truths for a in t["angles_deg"]),
        "detail": detail,
    }


# --------------------------------------------------------------------------------------------
# Argument checks


def _check_shape(shape: tuple[int, int]) -> tuple[int, int]:
    if len(shape) != 2 or min(shape) < 16:
        raise ValueError(f"shape must be two sides of at least 16 pixels, got {shape!r}")
    return int(shape[0]), int(shape[1])


def _check_dose(dose_range: tuple[float, float]) -> tuple[float, float]:
    lo, hi = (float(x) for x in dose_range)
    if not (0 < lo <= hi and math.isfinite(hi)):
        raise ValueError(f"dose_range must be (low, high) with 0 < low <= high, got {dose_range!r}")
    return lo, hi


def _check_diameters(diameter_range_nm: tuple[float, float], cap_nm: float) -> tuple[float, float]:
    lo, hi = (float(x) for x in diameter_range_nm)
    if not (0 < lo <= hi):
        raise ValueError(
            f"diameter_range_nm must be (low, high) with 0 < low <= high, got {diameter_range_nm!r}"
        )
    hi = min(hi, cap_nm)
    return min(lo, hi), hi


def _class_weights(class_weights: Mapping[str, float] | None) -> dict[str, float]:
    if class_weights is None:
        return dict(DEFAULT_CLASS_WEIGHTS)
    unknown = set(class_weights) - set(CLASSES)
    if unknown:
        raise ValueError(f"class_weights has unknown labels {sorted(unknown)}; use {CLASSES}")
    if class_weights.get("empty", 0) > 0:
        raise ValueError(
            "'empty' is not a particle class of a frame; use generate_region(rng, 'empty')"
        )
    weights = {k: float(class_weights.get(k, 0.0)) for k in PARTICLE_CLASSES}
    if any(w < 0 or not math.isfinite(w) for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(
            f"class_weights must be non-negative with a positive sum, got {class_weights!r}"
        )
    total = sum(weights.values())
    return {k: w / total for k, w in weights.items() if w > 0}
