"""Crystals of the analytic generator: lattice fringes on a convex outline, and the bodies (one
crystal, or the members of an agglomerate) that become one instance each.

A crystal carries one or two fringe sets ``a·cos(2π g·r + φ)``: two crossed sets (with weak
``g₁ ± g₂`` cross terms) stand for a particle on zone axis with atomic-column contrast, one set
for a misoriented particle. A stacking fault shifts the second set by ±2π/3 across a plane
parallel to the first set's lattice planes — the in-plane displacement of an fcc ``ABC→ABA``
fault (``g·b = ±1/3``). Fringe contrast ramps up over a few tenths of a nanometre from the edge
(thin rims of a rounded particle), and the carbon shows through the particle at reduced weight.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from latticewatch.testing.synthetic.shapes import Outline, convex_outline

#: Shortest fringe period rendered (pixels). 2 would be Nyquist; 2.5 keeps the fringe peak clear
#: of the Nyquist edge so that a resampling by the pipeline does not alias it.
MIN_FRINGE_PERIOD_PX = 2.5

# Contrast model, in units of the mean intensity (1.0 = vacuum-level beam through thin carbon).
_FRINGE_AMPLITUDE = (0.05, 0.15)  # per fringe set
_SECOND_SET_RATIO = (0.6, 1.0)  # on zone axis both sets are comparably strong
_WEAK_AMPLITUDE = (0.015, 0.04)  # the "very weak lattice" misoriented variant
_WEAK_MISORIENTED_P = 0.2
_CROSS_TERM = (0.0, 0.6)  # g1±g2 beams, relative to sqrt(a1·a2)
_SET_ANGLE_DEG = (55.0, 90.0)  # angle between the two sets (fcc [110]: 70.5°, [001]: 90°, hcp 60°)
_EQUAL_SPACING_P = 0.4  # chance that both sets share a spacing (e.g. {111}/{11-1})
_ABSORPTION = (-0.005, 0.025)  # mean darkening of a particle: deliberately tiny
_CARBON_IN_PARTICLE = (0.3, 0.7)  # weight of the carbon texture seen through a particle
_FAULT_SHIFT_RAD = 2.0 * math.pi / 3.0
_FAULT_KEEP_OUT = 0.3  # the fault plane leaves at least this fraction of the width on each side
_AGGLOMERATE_OVERLAP = (0.1, 0.45)  # overlap along the centre line, fraction of the smaller radius
_AGGLOMERATE_CROSSED_P = 0.6  # members showing two crossed sets (else one)


@dataclass(frozen=True)
class Crystal:
    """One convex crystal: outline, fringe sets and optional stacking fault, in pixels."""

    shape: Outline
    offset: np.ndarray  # (row, col) of its centroid relative to the body centre
    waves: np.ndarray  # (S, 2) wave vectors in cycles/pixel, (row, col)
    amplitudes: np.ndarray  # (S,)
    phases: np.ndarray  # (S,) at the crystal centroid
    cross: tuple[float, float]  # amplitudes of the g1+g2 and g1-g2 terms (0 = left out)
    absorption: float
    carbon_weight: float
    fault: tuple[np.ndarray, float, float, int] | None  # (normal, offset_px, shift, set index)
    variant: str = ""

    def scaled(self, factor: float) -> Crystal:
        """The crystal's outline and position enlarged ``factor`` times (the lattice keeps its spacing)."""
        fault = self.fault
        if fault is not None:
            fault = (fault[0], fault[1] * factor, fault[2], fault[3])
        return Crystal(
            self.shape.scaled(factor), self.offset * factor, self.waves, self.amplitudes,
            self.phases, self.cross, self.absorption, self.carbon_weight, fault, self.variant,
        )

    def render(
        self, rr: np.ndarray, cc: np.ndarray, taper_px: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Mask, intensity change and carbon-weight factor on a local grid (see ``Body``)."""
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
class Body:
    """What becomes one instance: one crystal, or the members of an agglomerate."""

    crystals: tuple[Crystal, ...]
    radius: float  # bounding circle around the body centre (px)
    area_px: float  # estimate used for coverage bookkeeping

    def scaled(self, factor: float) -> Body:
        """The body enlarged ``factor`` times about its centre (the lattices keep their spacing)."""
        return Body(
            tuple(c.scaled(factor) for c in self.crystals), self.radius * factor,
            self.area_px * factor**2,
        )

    def render(self, rr: np.ndarray, cc: np.ndarray, taper_px: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Mask, intensity change and carbon-weight factor of the body on a grid around its centre.

        ``rr`` is a column and ``cc`` a row of coordinates relative to the centre (px);
        ``taper_px`` is the distance over which the fringe contrast ramps up from the edge.
        """
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


def make_crystal(
    rng: np.random.Generator, kind: str, diameter_px: float, spacing_px: tuple[float, float],
) -> Crystal:
    """A crystal of ``kind``: ``crossed``, ``fault`` (crossed + stacking fault) or ``single`` (one set).

    Examples
    --------
    >>> crystal = make_crystal(np.random.default_rng(0), "fault", 50.0, (4.0, 7.0))
    >>> len(crystal.waves), crystal.fault is not None
    (2, True)
    """
    shape = convex_outline(rng, diameter_px)
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
    return Crystal(
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


def make_body(
    rng: np.random.Generator, label: str, diameter_px: tuple[float, float],
    spacing_px: tuple[float, float],
) -> Body:
    """The body of one particle of class ``label`` (agglomerates: 2–3 overlapping members).

    Examples
    --------
    >>> body = make_body(np.random.default_rng(0), "agglomeration", (40.0, 60.0), (4.0, 7.0))
    >>> len(body.crystals) in (2, 3), body.radius > 20.0
    (True, True)
    """
    if label != "agglomeration":
        kind = {"stacking_fault": "fault", "no_stacking_fault": "crossed", "misoriented": "single"}[label]
        crystal = make_crystal(rng, kind, rng.uniform(*diameter_px), spacing_px)
        return Body((crystal,), crystal.shape.radius, crystal.shape.area)
    members = _agglomerate(rng, diameter_px, spacing_px)
    areas = np.array([m.shape.area for m in members])
    centre = (areas[:, None] * np.array([m.offset for m in members])).sum(axis=0) / areas.sum()
    members = [dataclasses.replace(m, offset=m.offset - centre) for m in members]
    radius = max(float(np.linalg.norm(m.offset)) + m.shape.radius for m in members)
    return Body(tuple(members), radius, float(areas.sum()))


def _agglomerate(
    rng: np.random.Generator, diameter_px: tuple[float, float], spacing_px: tuple[float, float],
) -> list[Crystal]:
    """2–3 crystals, each overlapping a little with an earlier one (offsets from the first)."""
    n_members = 2 if rng.random() < 0.7 else 3
    members: list[Crystal] = []
    for _ in range(n_members):
        kind = "crossed" if rng.random() < _AGGLOMERATE_CROSSED_P else "single"
        crystal = make_crystal(rng, kind, rng.uniform(*diameter_px), spacing_px)
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
        members.append(dataclasses.replace(crystal, offset=np.asarray(offset, dtype=float)))
    return members
