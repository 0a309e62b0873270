"""Particle shapes: convex bodies in the stacking frame that a crystal is carved from.

A convex polyhedron taken from an ``ase.cluster`` template (octahedron, truncated octahedron,
Wulff construction), an ellipsoid, or a hexagonal prism; :func:`make_shape` scales it to the
requested volume-equivalent diameter and stretches it a little along a random direction, so no
two particles are cut the same way.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.spatial import ConvexHull

from latticewatch.training.simulate.structures.stacking import CUBIC_TO_STACKING

SHAPES: dict[str, tuple[str, ...]] = {
    "fcc": ("octahedron", "truncated_octahedron", "wulff"),
    "zincblende": ("sphere", "truncated_octahedron"),
    "wurtzite": ("sphere", "hexagonal_prism"),
}


@dataclass(frozen=True)
class Shape:
    """A convex body in the stacking frame: a polyhedron (``vertices``) or an ellipsoid (``axes``).

    Examples
    --------
    >>> box = Shape("box", vertices=np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], float))
    >>> round(box.volume, 6), box.contains(np.array([[0.0, 0, 0], [2, 0, 0]])).tolist()
    (8.0, [True, False])
    """

    kind: str
    vertices: np.ndarray | None = None
    axes: np.ndarray | None = None  # ellipsoid: (3, 3) rows = semi-axis vectors
    params: dict[str, Any] = field(default_factory=dict)

    @functools.cached_property
    def _hull(self) -> ConvexHull:
        return ConvexHull(self.vertices)

    @property
    def volume(self) -> float:
        """Volume (Å³)."""
        if self.vertices is not None:
            return float(self._hull.volume)
        return float(4.0 / 3.0 * math.pi * abs(np.linalg.det(self.axes)))

    def contains(self, points: np.ndarray, tol: float = 1e-6) -> np.ndarray:
        """Which of ``points`` (n, 3) lie inside (within ``tol`` Å of the surface)."""
        if self.vertices is not None:
            eq = self._hull.equations  # n·x + b <= 0 inside, n unit
            return np.all(points @ eq[:, :3].T + eq[:, 3] <= tol, axis=1)
        inv = np.linalg.inv(self.axes)  # coordinates in units of the semi-axes
        u = points @ inv
        return np.einsum("ij,ij->i", u, u) <= 1.0 + tol

    def transformed(self, matrix: np.ndarray) -> Shape:
        """The body under a linear map ``x -> matrix @ x``."""
        if self.vertices is not None:
            return Shape(self.kind, vertices=self.vertices @ matrix.T, params=self.params)
        return Shape(self.kind, axes=self.axes @ matrix.T, params=self.params)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned ``(low, high)`` corners (Å)."""
        if self.vertices is not None:
            return self.vertices.min(axis=0), self.vertices.max(axis=0)
        half = np.linalg.norm(self.axes, axis=0)  # support of an ellipsoid along each axis
        return -half, half


@functools.lru_cache(maxsize=64)
def _fcc_template(kind: str, variant: tuple) -> np.ndarray:
    """Hull vertices (unit lattice constant, stacking frame) of an ase.cluster shape."""
    from ase.cluster import Octahedron, wulff_construction

    if kind in ("octahedron", "truncated_octahedron"):
        length, cutoff = variant
        atoms = Octahedron("Cu", length, cutoff=cutoff, latticeconstant=1.0)
    elif kind == "wulff":
        atoms = wulff_construction(
            "Cu", [(1, 0, 0), (1, 1, 1), (1, 1, 0)], list(variant), 1500, "fcc", rounding="closest",
            latticeconstant=1.0,
        )
    else:
        raise ValueError(f"no fcc template for {kind!r}")
    pts = atoms.positions - atoms.positions.mean(axis=0)
    pts = pts @ CUBIC_TO_STACKING.T
    return pts[ConvexHull(pts).vertices]


def make_shape(rng: np.random.Generator, kind: str, size_nm: float, *, max_stretch: float = 1.15) -> Shape:
    """A convex particle shape of volume-equivalent diameter ``size_nm`` in the stacking frame.

    Parameters
    ----------
    rng
        Source of randomness (truncation, Wulff energies, aspect, stretch).
    kind
        ``octahedron``, ``truncated_octahedron`` (from a regular octahedron to a cuboctahedron),
        ``wulff`` ({100}, {111}, {110} with random energy ratios), ``sphere`` (an ellipsoid with
        axes within 15 %), or ``hexagonal_prism`` (wurtzite: {10-10} sides, basal caps).
    size_nm
        Diameter of the sphere of the same volume (nm), measured on atom centres.
    max_stretch
        Largest extra stretch along a random direction (1 = none).

    Returns
    -------
    Shape

    Examples
    --------
    >>> shape = make_shape(np.random.default_rng(0), "octahedron", 4.0)
    >>> round((6 * shape.volume / math.pi) ** (1 / 3) / 10, 3)
    4.0
    """
    base, params = _unit_shape(rng, kind)
    stretch = float(rng.uniform(1.0, max_stretch))
    u = rng.normal(size=3)
    u /= np.linalg.norm(u)
    matrix = np.eye(3) + (stretch - 1.0) * np.outer(u, u)
    shape = base.transformed(matrix)
    target = math.pi / 6.0 * (10.0 * size_nm) ** 3
    shape = shape.transformed(np.eye(3) * (target / shape.volume) ** (1.0 / 3.0))
    params["stretch"] = stretch
    return Shape(kind, vertices=shape.vertices, axes=shape.axes, params=params)


def _unit_shape(rng: np.random.Generator, kind: str) -> tuple[Shape, dict[str, Any]]:
    """The body of ``kind`` before stretching and scaling, and what was drawn for it."""
    params: dict[str, Any] = {}
    if kind == "octahedron":
        base = Shape(kind, vertices=_fcc_template(kind, (11, 0)))
    elif kind == "truncated_octahedron":
        cutoff = int(rng.integers(1, 6))
        params["cutoff_of_11"] = cutoff
        base = Shape(kind, vertices=_fcc_template(kind, (11, cutoff)))
    elif kind == "wulff":
        # steps of 0.05 keep the number of distinct templates (and ase calls) small
        energies = (round(float(rng.uniform(1.05, 1.3)) * 20) / 20, 1.0,
                    round(float(rng.uniform(1.1, 1.4)) * 20) / 20)
        params["surface_energies_100_111_110"] = list(energies)
        base = Shape(kind, vertices=_fcc_template(kind, energies))
    elif kind == "sphere":
        base = Shape(kind, axes=np.diag(rng.uniform(1.0, 1.15, size=3)))
    elif kind == "hexagonal_prism":
        aspect = float(rng.uniform(0.7, 1.5))  # height / across-corners width
        params["aspect"] = aspect
        ang = np.radians(np.arange(0, 360, 60))
        ring = np.column_stack([np.cos(ang), np.sin(ang)])
        base = Shape(kind, vertices=np.vstack([
            np.column_stack([ring, np.full(6, z)]) for z in (-aspect, aspect)
        ]))
    else:
        raise ValueError(f"unknown shape {kind!r}")
    return base, params
