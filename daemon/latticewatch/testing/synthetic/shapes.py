"""Particle outlines of the analytic generator: random convex polygons and ellipses in pixels.

An :class:`Outline` is a convex polygon around its area centroid, kept as half-planes so the
signed distance to its edge (which sets the fringe contrast near the rim) is one whole-array
operation per edge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.spatial import ConvexHull

#: Chance that an outline is an ellipse (else a faceted polygon).
_ELLIPSE_P = 0.4


@dataclass(frozen=True)
class Outline:
    """A convex polygon around the origin, as half-planes ``n·p <= c`` in (row, col) pixels."""

    vertices: np.ndarray  # (V, 2)
    normals: np.ndarray  # (V, 2) outward unit normals
    offsets: np.ndarray  # (V,) c_i > 0
    area: float
    kind: str

    @property
    def radius(self) -> float:
        """Distance of the farthest vertex from the origin (px)."""
        return float(np.sqrt((self.vertices**2).sum(axis=1)).max())

    @property
    def equivalent_diameter(self) -> float:
        """Diameter of the circle of the same area (px)."""
        return math.sqrt(4.0 * self.area / math.pi)

    def scaled(self, factor: float) -> Outline:
        """The outline enlarged ``factor`` times about the origin."""
        return Outline(
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
        """Whether the ``(row, col)`` point lies inside or on the edge."""
        return bool((self.normals @ point <= self.offsets).all())


def _polygon(points: np.ndarray, kind: str) -> Outline:
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
    return Outline(hull, normals, offsets, 0.5 * float(area2), kind)


def convex_outline(rng: np.random.Generator, diameter_px: float) -> Outline:
    """A random faceted polygon or ellipse with an equivalent diameter of ``diameter_px``.

    Examples
    --------
    >>> outline = convex_outline(np.random.default_rng(0), 40.0)
    >>> round(outline.equivalent_diameter, 6), outline.contains(np.zeros(2))
    (40.0, True)
    """
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


