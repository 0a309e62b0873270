"""What the analytic generator returns: the frame (:class:`SyntheticImage`) and the exact ground
truth of each particle in it (:class:`SyntheticParticle`), as built from the bodies it drew.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from latticewatch.testing.synthetic.crystals import Body, Crystal


@dataclass(frozen=True)
class SyntheticParticle:
    """Ground truth for one instance of a synthetic image.

    Attributes
    ----------
    instance
        Value of this particle in ``SyntheticImage.instances`` (1..n).
    label
        One of :data:`~latticewatch.testing.synthetic.frames.PARTICLE_CLASSES` (never ``"empty"``).
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


def _crystal_truth(crystal: Crystal, pixel_size_nm: float) -> dict[str, Any]:
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


def particle_record(
    instance: int, label: str, body: Body, centre: tuple[float, float], union_px: int,
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


