"""Frames and crops of the analytic generator: particles of random classes scattered on carbon
(:func:`generate_frame`) or one region of a given class centred in a crop
(:func:`generate_region`), rendered, with shot noise, and their ground truth collected.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from latticewatch.frame import CLASSES
from latticewatch.testing.synthetic.crystals import MIN_FRINGE_PERIOD_PX, Body, make_body
from latticewatch.testing.synthetic.optics import carbon_contrast, draw_dose, draw_optics
from latticewatch.testing.synthetic.shapes import Outline, convex_outline
from latticewatch.testing.synthetic.truth import SyntheticImage, SyntheticParticle, particle_record

logger = logging.getLogger(__name__)

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
#: Equivalent-circle diameters of single particles (nm).
DIAMETER_RANGE_NM: tuple[float, float] = (2.0, 10.0)
#: Pixel sizes the generator is tested at (nm/pixel); others work while fringes stay resolvable.
PIXEL_SIZE_RANGE_NM: tuple[float, float] = (0.02, 0.1)

_MIN_GAP_NM = 0.3  # between neighbouring particles so the binary mask keeps them apart
_COVERAGE = (0.05, 0.30)  # fraction of the frame covered by particles when their number is not given

#: A body to render: its class, the body, and its centre ``(row, col)`` in the frame.
Placed = tuple[str, Body, tuple[float, float]]


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

    optics = draw_optics(rng, pixel_size_nm)
    dose = draw_dose(rng, dose_lo, dose_hi)
    target_coverage = float(rng.uniform(*_COVERAGE)) if n_particles is None else None
    placed = _scatter(
        rng, shape, weights,
        diameter_px=(d_lo / pixel_size_nm, d_hi / pixel_size_nm),
        spacing_px=(spacing_nm[0] / pixel_size_nm, spacing_nm[1] / pixel_size_nm),
        gap_px=max(2.0, _MIN_GAP_NM / pixel_size_nm),
        n_particles=n_particles,
        target_area=(target_coverage or 0.0) * shape[0] * shape[1],
    )
    params: dict[str, Any] = {
        "class_weights": {k: float(v) for k, v in weights.items()},
        "diameter_range_nm": [d_lo, d_hi],
        "n_requested": n_particles,
        "target_coverage": target_coverage,
        "n_placed": len(placed),
    }
    return _compose(rng, shape, pixel_size_nm, placed, optics, dose, spacing_nm, params)


def _scatter(
    rng: np.random.Generator,
    shape: tuple[int, int],
    weights: dict[str, float],
    *,
    diameter_px: tuple[float, float],
    spacing_px: tuple[float, float],
    gap_px: float,
    n_particles: int | None,
    target_area: float,
) -> list[Placed]:
    """Bodies of random classes at free places: ``n_particles`` of them, or until they cover ``target_area``.

    Gives up after 30 bodies that find no place (too large for the frame, or no room left).
    """
    labels = list(weights)
    probabilities = np.array([weights[k] for k in labels])
    placed: list[Placed] = []
    circles = np.zeros((0, 3))  # (row, col, radius) of placed bodies
    covered = 0.0
    failures = 0
    while failures < 30:
        if n_particles is None and covered >= target_area:
            break
        if n_particles is not None and len(placed) >= n_particles:
            break
        label = labels[int(rng.choice(len(labels), p=probabilities))]
        body = make_body(rng, label, diameter_px, spacing_px)
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
    return placed


def _place(
    rng: np.random.Generator, body: Body, shape: tuple[int, int], circles: np.ndarray,
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

    optics = draw_optics(rng, pixel_size_nm)
    dose = draw_dose(rng, dose_lo, dose_hi)
    centre = ((size_px - 1) / 2.0, (size_px - 1) / 2.0)
    params: dict[str, Any] = {"label": label, "diameter_range_nm": [d_lo, d_hi]}
    if label == "empty":
        blob = convex_outline(rng, rng.uniform(d_lo, d_hi) / pixel_size_nm)
        blob = blob.scaled(min(1.0, 0.45 * size_px / blob.radius))
        params["blob_diameter_nm"] = blob.equivalent_diameter * pixel_size_nm
        image = _compose(rng, shape, pixel_size_nm, [], optics, dose, spacing_nm, params)
        return dataclasses.replace(image, mask=_outline_mask(blob, size_px, centre))

    spacing_px = (spacing_nm[0] / pixel_size_nm, spacing_nm[1] / pixel_size_nm)
    body = _region_body(rng, label, size_px, pixel_size_nm, (d_lo, d_hi), spacing_px)
    return _compose(rng, shape, pixel_size_nm, [(label, body, centre)], optics, dose, spacing_nm, params)


def _region_body(
    rng: np.random.Generator, label: str, size_px: int, pixel_size_nm: float,
    diameter_nm: tuple[float, float], spacing_px: tuple[float, float],
) -> Body:
    """A body of ``label`` whose outline reaches at most 45 % of the crop side from its centre."""
    d_lo, d_hi = diameter_nm
    if label == "agglomeration":
        # Two or three members side by side need about twice the width of one.
        member_hi = max(d_lo, min(d_hi, 0.45 * size_px * pixel_size_nm))
        diam_px = (min(d_lo, member_hi) / pixel_size_nm, member_hi / pixel_size_nm)
    else:
        diam_px = (d_lo / pixel_size_nm, d_hi / pixel_size_nm)
    body = make_body(rng, label, diam_px, spacing_px)
    max_radius = 0.45 * size_px
    if body.radius > max_radius:
        # Shrinking the geometry (not the lattice) keeps the crop's one region whole.
        body = body.scaled(max_radius / body.radius)
    return body


def _outline_mask(outline: Outline, size_px: int, centre: tuple[float, float]) -> np.ndarray:
    """``uint8`` mask of a square crop, 1 inside ``outline`` placed at ``centre``."""
    rr = np.arange(size_px, dtype=np.float32)[:, None] - np.float32(centre[0])
    cc = np.arange(size_px, dtype=np.float32)[None, :] - np.float32(centre[1])
    return (outline.signed_distance(rr, cc) >= 0).astype(np.uint8)


def _compose(
    rng: np.random.Generator,
    shape: tuple[int, int],
    pixel_size_nm: float,
    placed: list[Placed],
    optics: dict,
    dose: float,
    spacing_nm: tuple[float, float],
    extra: dict,
) -> SyntheticImage:
    """Render bodies on carbon, add shot noise and collect the ground truth."""
    taper_px = optics["edge_taper_nm"] / pixel_size_nm
    particle, carbon_weight, instances, records = _render(shape, pixel_size_nm, placed, taper_px)
    carbon = carbon_contrast(rng, shape, pixel_size_nm, optics)
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
        "shape": [shape[0], shape[1]],
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


def _render(
    shape: tuple[int, int], pixel_size_nm: float, placed: list[Placed], taper_px: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Intensity change of the particles, carbon weight, instance map and the particles' records."""
    rows, cols = shape
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
        records.append(particle_record(instance, label, body, (r0, c0), int(union.sum()), pixel_size_nm))
    return particle, carbon_weight, instances, records


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
