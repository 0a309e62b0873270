"""Atomic models for the multislice simulator: nanoparticles with planted planar defects, and
amorphous carbon.

Every builder is a pure function of its arguments and a ``numpy.random.Generator``; nothing here
touches abTEM, so models can be built and checked without it (``ase`` is needed for the fcc shape
templates and the multiply twinned particles).

Single crystals are built by stacking close-packed layers, then carving a shape
------------------------------------------------------------------------------
fcc metals (Au, Pd) and CdSe in both its polytypes are stackings of close-packed layers: fcc and
zinc blende repeat ``ABC``, wurtzite repeats ``AB`` (for CdSe a "layer" is a Cd–Se pair, the Se
3/4 of a layer spacing above its Cd, which gives the tetrahedral bond along the stacking axis).
:func:`stacking_sequence` writes the registry of each layer (0 = A, 1 = B, 2 = C); a planar
defect is a rule change at one layer:

* ``intrinsic`` (fcc, zinc blende): one layer missing, ``ABCA|CABC``;
* ``extrinsic``: one layer inserted, ``ABCAB|A|CABC``;
* ``twin``: the sequence mirrored from then on, ``ABCA|CBA`` (the mirror plane is the layer
  before the break);
* ``I1`` / ``I2`` (wurtzite): the basal faults with one and two cubic layers, ``ABAB|CBCB`` and
  ``ABAB|CACA``.

:func:`stacked_crystal` turns the sequence into atoms, and the particle shape is carved from
them: a convex polyhedron taken from an ``ase.cluster`` template (octahedron, truncated
octahedron, Wulff construction) in the stacking frame, an ellipsoid, or a hexagonal prism; the
shape is scaled to the requested volume-equivalent diameter, stretched a little along a random
direction and put at a random offset from the lattice, so no two particles are cut the same way.
Perfect and faulted particles go through exactly the same code, so nothing but the stacking
tells them apart.

The stacking frame has ``z`` along the stacking normal (fcc ``[111]``, wurtzite ``[0001]``) and
``x`` along a close-packed row (fcc ``[1-10]``, wurtzite ``[2-1-10]``). Viewing along ``x`` is the
zone axis on which the close-packed planes, and so every planted fault, are edge-on: fcc
``<110>`` and wurtzite ``<11-20>``. :func:`layer_registry` reads the stacking back from the atoms.

Multiply twinned particles
--------------------------
Decahedra and icosahedra come from ``ase.cluster`` as they are; seen along the decahedron's
five-fold axis (or the icosahedron's two-fold or five-fold axis) their twin boundaries are
edge-on, so they count as defective particles (``multiply_twinned``).

Orientation
-----------
On zone, the zone axis is put along the beam (lab ``+z``), turned by a random angle about it and
tilted off by at most :data:`ZONE_JITTER_DEG`. Off zone ("misoriented"), the rotation is uniform
on SO(3), redrawn until every low-index zone axis (:func:`zone_axes`) is at least
``min_off_zone_deg`` from the beam: a few planes may still be edge-on and show fringes, but no
atomic columns line up.

Amorphous carbon
----------------
:func:`amorphous_carbon` is random sequential addition with a minimum distance: uniform
candidates in batches, each tested against the accepted atoms with a periodic k-d tree (cell
list in C) and against the rest of its batch, until the number of atoms for the density is
reached. 2.0 g/cm³ with 1.35 Å gives a packing fraction of ~0.12, far below the random
sequential jamming limit, so it converges in a handful of batches.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from scipy.spatial import ConvexHull, cKDTree

logger = logging.getLogger("latticewatch.training.simulate.structures")

Structure = Literal["fcc", "zincblende", "wurtzite"]

#: Zone-axis tolerance of an "on zone" particle: the largest random tilt away from the axis.
ZONE_JITTER_DEG = 0.5
#: Default smallest angle between the beam and any low-index zone axis of a misoriented particle.
MIN_OFF_ZONE_DEG = 5.0
#: Avogadro constant, for densities.
_AVOGADRO = 6.02214076e23


@dataclass(frozen=True)
class Lattice:
    """A close-packed stacking: layer geometry and the atoms of one layer site.

    Attributes
    ----------
    material
        ``"Au"``, ``"Pd"`` or ``"CdSe"``.
    structure
        ``"fcc"``, ``"zincblende"`` or ``"wurtzite"``.
    a_nn
        Nearest-neighbour distance within a layer (Å).
    layer_spacing
        Distance between successive layers (Å).
    basis
        ``(symbol, height)`` of the atoms on one layer site, height in units of the layer spacing.
    lattice_constant
        Cubic lattice constant (fcc, zinc blende) or ``a`` (wurtzite), Å.
    """

    material: str
    structure: str
    a_nn: float
    layer_spacing: float
    basis: tuple[tuple[str, float], ...]
    lattice_constant: float

    @property
    def period(self) -> int:
        """Layers in one repeat of the perfect stacking (3 for ABC, 2 for AB)."""
        return 2 if self.structure == "wurtzite" else 3


def _cubic(material: str, structure: str, a: float, basis) -> Lattice:
    return Lattice(material, structure, a / math.sqrt(2.0), a / math.sqrt(3.0), basis, a)


#: Lattices by (material, structure). Room-temperature lattice constants: Au 4.078 Å, Pd 3.891 Å,
#: zinc-blende CdSe 6.077 Å, wurtzite CdSe a = 4.30 Å, c = 7.01 Å with u = 3/8 (Se 3/4 of a
#: layer above Cd: the Cd–Se bond along c is 2.63 Å in both polytypes).
LATTICES: dict[tuple[str, str], Lattice] = {
    ("Au", "fcc"): _cubic("Au", "fcc", 4.078, (("Au", 0.0),)),
    ("Pd", "fcc"): _cubic("Pd", "fcc", 3.891, (("Pd", 0.0),)),
    ("CdSe", "zincblende"): _cubic("CdSe", "zincblende", 6.077, (("Cd", 0.0), ("Se", 0.75))),
    ("CdSe", "wurtzite"): Lattice("CdSe", "wurtzite", 4.30, 7.01 / 2.0, (("Cd", 0.0), ("Se", 0.75)), 4.30),
}

#: Structures of each material.
STRUCTURES: dict[str, tuple[str, ...]] = {"Au": ("fcc",), "Pd": ("fcc",), "CdSe": ("wurtzite", "zincblende")}
#: Planar defects that can be planted, by structure.
DEFECTS: dict[str, tuple[str, ...]] = {
    "fcc": ("intrinsic", "extrinsic", "twin"),
    "zincblende": ("intrinsic", "extrinsic", "twin"),
    "wurtzite": ("I1", "I2"),
}
#: Shapes of single crystals, by structure. ``multiply twinned`` shapes are separate (fcc only).
SHAPES: dict[str, tuple[str, ...]] = {
    "fcc": ("octahedron", "truncated_octahedron", "wulff"),
    "zincblende": ("sphere", "truncated_octahedron"),
    "wurtzite": ("sphere", "hexagonal_prism"),
}
MULTIPLY_TWINNED_SHAPES: tuple[str, ...] = ("decahedron", "icosahedron")

# Rows: the stacking-frame axes x = [1-10], y = [11-2], z = [111] in cubic coordinates, so that
# ``local = _CUBIC_TO_STACKING @ cubic``.
_CUBIC_TO_STACKING = np.array(
    [[1.0, -1.0, 0.0], [1.0, 1.0, -2.0], [1.0, 1.0, 1.0]]
) / np.array([[math.sqrt(2.0)], [math.sqrt(6.0)], [math.sqrt(3.0)]])
# Zone axis of the stacking frame (its x axis) onto the beam: lab = R0 @ local.
_ZONE_TO_BEAM = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])


@dataclass(frozen=True)
class Particle:
    """One nanoparticle: its atoms in the lab frame and the truth about how it was made.

    Attributes
    ----------
    symbols
        Chemical symbol of each atom.
    positions
        ``(n, 3)`` positions in Å in the lab frame (the beam runs along ``+z``), centred on the
        mean atom position.
    local_positions
        The same atoms in the frame they were built in (stacking frame for single crystals, the
        ``ase`` frame for multiply twinned particles), before centring:
        ``positions = (local_positions - local_centre) @ rotation.T``.
    local_centre
        Mean of ``local_positions``.
    rotation
        ``(3, 3)`` rotation from the building frame to the lab frame.
    params
        JSON-serialisable description: ``material``, ``structure``, ``shape``, ``size_nm``
        (volume-equivalent diameter of the hull of the atom centres), ``n_atoms``, ``zone_axis``
        (``None`` off zone), ``tilt_deg``, ``defects`` (list of dicts with ``type``, ``layer``,
        ``normal`` and ``offset_nm``), ``stacking`` (letters read back from the atoms) and
        ``rotation_crystal_to_lab``.
    lattice
        The stacking of a single crystal, ``None`` for multiply twinned particles.
    """

    symbols: np.ndarray
    positions: np.ndarray
    local_positions: np.ndarray
    local_centre: np.ndarray
    rotation: np.ndarray
    params: dict[str, Any] = field(default_factory=dict)
    lattice: Lattice | None = None

    @property
    def radius_xy(self) -> float:
        """Largest distance of an atom from the centre, projected on the image plane (Å)."""
        return float(np.hypot(self.positions[:, 0], self.positions[:, 1]).max()) if len(self.positions) else 0.0

    @property
    def thickness(self) -> float:
        """Extent along the beam (Å)."""
        return float(np.ptp(self.positions[:, 2])) if len(self.positions) else 0.0


# --------------------------------------------------------------------------------------------
# Stacking


def stacking_sequence(
    structure: str,
    n_layers: int,
    defects: dict[int, str] | None = None,
    *,
    start: int = 0,
    direction: int = 1,
) -> np.ndarray:
    """Registry (0 = A, 1 = B, 2 = C) of ``n_layers`` close-packed layers.

    Parameters
    ----------
    structure
        ``"fcc"`` or ``"zincblende"`` (perfect ``ABC``) or ``"wurtzite"`` (perfect ``AB``).
    n_layers
        Number of layers.
    defects
        ``{layer: kind}``: the first layer whose registry breaks the perfect continuation, and
        the kind of defect (see :data:`DEFECTS`). Layers must be at least 2 (a break needs two
        layers of history); an ``extrinsic`` fault or ``I2`` also sets the layer after it.
    start, direction
        Registry of layer 0 and the step to layer 1 (+1 for ``ABC…``, −1 for ``ACB…``).

    Returns
    -------
    numpy.ndarray
        ``int8`` registry of each layer; neighbouring layers always differ.

    Examples
    --------
    >>> letters = lambda s: "".join("ABC"[i] for i in s)
    >>> letters(stacking_sequence("fcc", 8))
    'ABCABCAB'
    >>> letters(stacking_sequence("fcc", 8, {4: "intrinsic"}))
    'ABCACABC'
    >>> letters(stacking_sequence("fcc", 8, {4: "extrinsic"}))
    'ABCACBCA'
    >>> letters(stacking_sequence("fcc", 8, {4: "twin"}))
    'ABCACBAC'
    >>> letters(stacking_sequence("wurtzite", 8, {4: "I1"}))
    'ABABCBCB'
    >>> letters(stacking_sequence("wurtzite", 8, {4: "I2"}))
    'ABABCACA'
    """
    if structure not in DEFECTS:
        raise ValueError(f"structure must be one of {tuple(DEFECTS)}, got {structure!r}")
    defects = dict(defects or {})
    for layer, kind in defects.items():
        if kind not in DEFECTS[structure]:
            raise ValueError(f"{structure} takes defects {DEFECTS[structure]}, got {kind!r}")
        if not 2 <= layer < n_layers:
            raise ValueError(f"a defect needs 2 <= layer < {n_layers}, got {layer}")
    if direction not in (1, -1):
        raise ValueError(f"direction must be +1 or -1, got {direction!r}")
    seq = np.zeros(max(n_layers, 2), np.int8)
    seq[0], seq[1] = start % 3, (start + direction) % 3
    delta = direction
    forced: dict[int, int] = {}
    for k in range(2, n_layers):
        kind = defects.get(k)
        prev, prev2 = int(seq[k - 1]), int(seq[k - 2])
        third = 3 - prev - prev2  # the one registry that is neither of the last two
        if k in forced:
            s = forced[k]
        elif structure == "wurtzite":
            if kind == "I2":
                forced[k + 1] = 3 - third - prev
            s = third if kind in ("I1", "I2") else prev2
        elif kind == "twin":
            delta = -delta
            s = prev + delta  # == prev2: the previous layer is the mirror plane
        elif kind == "intrinsic":
            s = prev - delta  # one layer of the perfect sequence left out
        elif kind == "extrinsic":
            s = prev - delta  # an extra layer, then the perfect sequence resumes one step back
            forced[k + 1] = (s - delta) % 3
        elif structure == "wurtzite":
            s = prev2
        else:
            s = prev + delta
        seq[k] = s % 3
    return seq[:n_layers]


def letters(sequence) -> str:
    """``"ABC…"`` spelling of a registry sequence.

    Examples
    --------
    >>> letters([0, 1, 2, 0])
    'ABCA'
    """
    return "".join("ABC"[int(s)] for s in sequence)


def stacking_environments(sequence) -> str:
    """``h``/``c`` environment of each inner layer (hexagonal when both neighbours coincide).

    Examples
    --------
    >>> stacking_environments(stacking_sequence("fcc", 6, {3: "twin"}))
    'chcc'
    """
    s = np.asarray(sequence)
    return "".join("h" if a == b else "c" for a, b in zip(s[:-2], s[2:]))


def stacked_crystal(lattice: Lattice, sequence, first_layer: int, half_width: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Layer sites of a stacking over a square of ``2·half_width`` (Å) in the stacking frame.

    Layer ``first_layer + i`` has registry ``sequence[i]`` and its sites at height
    ``(first_layer + i)·layer_spacing``; within a layer the sites form a triangular lattice
    with a row along ``x``, shifted by ``registry·(a_nn/2, a_nn·√3/6)``.

    Parameters
    ----------
    lattice
        The stacking geometry.
    sequence
        Registry of each layer (see :func:`stacking_sequence`).
    first_layer
        Index of the first layer (sets its height).
    half_width
        Half the side of the square the sites cover in ``x`` and ``y``.

    Returns
    -------
    sites, layer_index, registry
        ``(n, 3)`` site positions (Å) and, for each, its layer index and registry.

    Examples
    --------
    >>> lat = LATTICES["Au", "fcc"]
    >>> sites, layers, reg = stacked_crystal(lat, [0, 1, 2], 0, 5.0)
    >>> sorted(set(layers.tolist())), round(float(sites[layers == 1, 2][0]), 3)
    ([0, 1, 2], 2.354)
    """
    a = lattice.a_nn
    row = a * math.sqrt(3.0) / 2.0
    nj = math.ceil(half_width / row) + 2
    ni = math.ceil(half_width / a) + nj + 2
    i, j = np.meshgrid(np.arange(-ni, ni + 1), np.arange(-nj, nj + 1), indexing="ij")
    base = np.stack([(i + 0.5 * j).ravel() * a, j.ravel() * row], axis=1)
    base = base[(np.abs(base[:, 0]) <= half_width + a) & (np.abs(base[:, 1]) <= half_width + a)]
    registry = np.asarray(sequence, np.int64)
    shift = np.array([0.5 * a, a * math.sqrt(3.0) / 6.0])
    n_layers = len(registry)
    xy = (base[None, :, :] + registry[:, None, None] * shift).reshape(-1, 2)
    layer = np.repeat(np.arange(first_layer, first_layer + n_layers), len(base))
    z = layer * lattice.layer_spacing
    return np.column_stack([xy, z]), layer, np.repeat(registry, len(base))


def layer_registry(local_positions: np.ndarray, lattice: Lattice) -> tuple[np.ndarray, np.ndarray]:
    """Read the stacking back from site positions in the stacking frame.

    Atoms are sorted into layers by height and each layer's registry is its ``y`` offset in
    units of ``a_nn·√3/6`` modulo 3 (rows repeat every ``a_nn·√3/2``).

    Parameters
    ----------
    local_positions
        ``(n, 3)`` positions of the *first* basis atom of each site (e.g. only Cd for CdSe), in
        the stacking frame, as built (small displacements, e.g. thermal, are tolerated).
    lattice
        The stacking geometry.

    Returns
    -------
    layers, registry
        Layer indices present (ascending) and the registry of each.

    Raises
    ------
    ValueError
        When the atoms of a layer do not share one registry (not a close-packed stacking).

    Examples
    --------
    >>> lat = LATTICES["Pd", "fcc"]
    >>> sites, _, _ = stacked_crystal(lat, stacking_sequence("fcc", 6, {3: "twin"}), 0, 6.0)
    >>> letters(layer_registry(sites, lat)[1])
    'ABCBAC'
    """
    z = np.round(local_positions[:, 2] / lattice.layer_spacing).astype(np.int64)
    unit = lattice.a_nn * math.sqrt(3.0) / 6.0
    reg = np.round(local_positions[:, 1] / unit).astype(np.int64) % 3
    layers = np.unique(z)
    out = np.empty(len(layers), np.int8)
    for n, k in enumerate(layers):
        values = np.unique(reg[z == k])
        if len(values) != 1:
            raise ValueError(f"layer {k} mixes registries {values.tolist()}: not a close-packed stacking")
        out[n] = values[0]
    return layers, out


# --------------------------------------------------------------------------------------------
# Shapes


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
    pts = pts @ _CUBIC_TO_STACKING.T
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
    params: dict[str, Any] = {}
    if kind == "octahedron":
        base = Shape(kind, vertices=_fcc_template(kind, (11, 0)))
    elif kind == "truncated_octahedron":
        cutoff = int(rng.integers(1, 6))
        params["cutoff_of_11"] = cutoff
        base = Shape(kind, vertices=_fcc_template(kind, (11, cutoff)))
    elif kind == "wulff":
        # steps of 0.05 keep the number of distinct templates (and ase calls) small
        energies = (round(float(rng.uniform(1.05, 1.3)) * 20) / 20, 1.0, round(float(rng.uniform(1.1, 1.4)) * 20) / 20)
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
    stretch = float(rng.uniform(1.0, max_stretch))
    u = rng.normal(size=3)
    u /= np.linalg.norm(u)
    matrix = np.eye(3) + (stretch - 1.0) * np.outer(u, u)
    shape = base.transformed(matrix)
    target = math.pi / 6.0 * (10.0 * size_nm) ** 3
    shape = shape.transformed(np.eye(3) * (target / shape.volume) ** (1.0 / 3.0))
    params["stretch"] = stretch
    return Shape(kind, vertices=shape.vertices, axes=shape.axes, params=params)


# --------------------------------------------------------------------------------------------
# Rotations


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A rotation matrix drawn uniformly from SO(3) (normalised Gaussian quaternion).

    Examples
    --------
    >>> r = random_rotation(np.random.default_rng(0))
    >>> bool(np.allclose(r @ r.T, np.eye(3))), round(float(np.linalg.det(r)), 6)
    (True, 1.0)
    """
    w, x, y, z = rng.normal(size=4) / 1.0
    n = math.sqrt(w * w + x * x + y * y + z * z)
    w, x, y, z = w / n, x / n, y / n, z / n
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def _axis_rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)


def _align_to_beam(direction: np.ndarray) -> np.ndarray:
    """A rotation taking ``direction`` onto ``+z``."""
    d = np.asarray(direction, float) / np.linalg.norm(direction)
    axis = np.cross(d, [0.0, 0.0, 1.0])
    s = np.linalg.norm(axis)
    if s < 1e-12:
        return np.eye(3) if d[2] > 0 else np.diag([1.0, -1.0, -1.0])
    return _axis_rotation(axis, math.atan2(s, d[2]))


def _zone_orientation(rng: np.random.Generator, to_beam: np.ndarray, jitter_deg: float) -> tuple[np.ndarray, float]:
    """``to_beam`` followed by a random turn about the beam and a tilt of at most ``jitter_deg``."""
    turn = _axis_rotation([0.0, 0.0, 1.0], float(rng.uniform(0.0, 2.0 * math.pi)))
    tilt = float(rng.uniform(0.0, jitter_deg))
    phi = float(rng.uniform(0.0, 2.0 * math.pi))
    tilt_rot = _axis_rotation([math.cos(phi), math.sin(phi), 0.0], math.radians(tilt))
    return tilt_rot @ turn @ to_beam, tilt


@functools.lru_cache(maxsize=8)
def zone_axes(structure: str) -> np.ndarray:
    """Unit vectors (building frame) of the low-index zone axes that show atomic columns.

    fcc and zinc blende: ``<100>``, ``<110>``, ``<111>``, ``<112>`` in the stacking frame;
    wurtzite: ``[0001]``, ``<11-20>``, ``<10-10>``. Only one of each ± pair is listed.

    Examples
    --------
    >>> zone_axes("fcc").shape, zone_axes("wurtzite").shape
    ((25, 3), (7, 3))
    """
    if structure == "wurtzite":
        ang = np.radians(np.arange(0, 180, 30))  # a-directions at 0/60/120, <10-10> at 30/90/150
        return np.vstack([[0.0, 0.0, 1.0], np.column_stack([np.cos(ang), np.sin(ang), np.zeros(6)])])
    dirs = set()
    for base in ((1, 0, 0), (1, 1, 0), (1, 1, 1), (1, 1, 2)):
        for perm in {(base[i], base[j], base[k]) for i, j, k in ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))}:
            for signs in np.ndindex(2, 2, 2):
                v = tuple(p * (1 - 2 * s) for p, s in zip(perm, signs))
                first = next(x for x in v if x != 0)
                if first > 0:
                    dirs.add(v)
    vecs = np.array(sorted(dirs), float)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    return vecs @ _CUBIC_TO_STACKING.T


def angle_to_zone(rotation: np.ndarray, structure: str) -> float:
    """Smallest angle (degrees) between the beam and a zone axis of :func:`zone_axes`.

    Examples
    --------
    >>> round(angle_to_zone(_ZONE_TO_BEAM, "fcc"), 3)
    0.0
    """
    beam_components = np.abs((zone_axes(structure) @ rotation.T)[:, 2])
    return float(np.degrees(np.arccos(np.clip(beam_components.max(), -1.0, 1.0))))


def _misorientation(rng: np.random.Generator, structure: str, min_off_zone_deg: float) -> tuple[np.ndarray, float]:
    for _ in range(1000):
        rot = random_rotation(rng)
        angle = angle_to_zone(rot, structure)
        if angle >= min_off_zone_deg:
            return rot, angle
    raise RuntimeError(f"no orientation {min_off_zone_deg}° off every zone axis in 1000 draws")


# --------------------------------------------------------------------------------------------
# Particles


def single_crystal(
    rng: np.random.Generator,
    material: str,
    size_nm: float,
    *,
    structure: str | None = None,
    shape: str | None = None,
    defects: tuple[str, ...] = (),
    on_zone: bool = True,
    min_off_zone_deg: float = MIN_OFF_ZONE_DEG,
) -> Particle:
    """A single-crystal particle, perfect or with planar defects, on or off its zone axis.

    Parameters
    ----------
    rng
        Source of randomness.
    material
        ``"Au"``, ``"Pd"`` or ``"CdSe"``.
    size_nm
        Volume-equivalent diameter of the carved shape (nm).
    structure
        One of :data:`STRUCTURES` for the material (default: drawn).
    shape
        One of :data:`SHAPES` for the structure (default: drawn).
    defects
        Kinds of planar defects to plant (see :data:`DEFECTS`), each at a random layer in the
        middle half of the particle's layers, at least three layers apart.
    on_zone
        Zone axis (fcc/zinc blende ``<110>``, wurtzite ``<11-20>``) along the beam, with every
        defect plane edge-on; otherwise a random orientation off every low-index zone axis.
    min_off_zone_deg
        Off zone: the smallest allowed angle between the beam and a zone axis.

    Returns
    -------
    Particle

    Examples
    --------
    >>> p = single_crystal(np.random.default_rng(3), "Au", 3.0, shape="octahedron", defects=("twin",))
    >>> p.params["zone_axis"], p.params["defects"][0]["type"], "h" in stacking_environments(
    ...     layer_registry(p.local_positions, p.lattice)[1])
    ('<110>', 'twin', True)
    """
    if material not in STRUCTURES:
        raise ValueError(f"material must be one of {tuple(STRUCTURES)}, got {material!r}")
    structure = structure or str(rng.choice(STRUCTURES[material]))
    if structure not in STRUCTURES[material]:
        raise ValueError(f"{material} comes as {STRUCTURES[material]}, not {structure!r}")
    shape_kind = shape or str(rng.choice(SHAPES[structure]))
    if shape_kind not in SHAPES[structure]:
        raise ValueError(f"{structure} particles take shapes {SHAPES[structure]}, not {shape_kind!r}")
    lattice = LATTICES[material, structure]
    body = make_shape(rng, shape_kind, size_nm)
    # A random offset of the body from the lattice, so the surface cuts the planes differently.
    offset = rng.uniform([0.0, 0.0, 0.0], [lattice.a_nn, lattice.a_nn * math.sqrt(3) / 2, lattice.layer_spacing])
    low, high = body.bounds()
    low, high = low + offset, high + offset
    k0 = math.floor(low[2] / lattice.layer_spacing)
    k1 = math.ceil(high[2] / lattice.layer_spacing)
    n_layers = k1 - k0 + 1
    half_width = float(max(np.abs(low[:2]).max(), np.abs(high[:2]).max())) + lattice.a_nn
    start, direction = int(rng.integers(3)), int(rng.choice([1, -1]))

    def carve(seq):
        sites, layer, _ = stacked_crystal(lattice, seq, k0, half_width)
        keep = body.contains(sites - offset)
        return sites[keep], layer[keep]

    # The body's bounding box can reach past its last atomic layer (a vertex between planes), so
    # the layers that really hold atoms are found first and defects go into their middle half.
    sites, layer = carve(stacking_sequence(structure, n_layers, start=start, direction=direction))
    if len(sites) == 0:
        raise ValueError(f"a {size_nm} nm {shape_kind} holds no atoms")
    held = np.unique(layer)
    planted = {int(held[0] - k0 + j): kind for j, kind in _defect_layers(rng, defects, len(held)).items()}
    if planted:
        sites, layer = carve(stacking_sequence(structure, n_layers, planted, start=start, direction=direction))

    symbols = np.concatenate([np.full(len(sites), sym, dtype=object) for sym, _ in lattice.basis])
    local = np.vstack([sites + [0.0, 0.0, h * lattice.layer_spacing] for _, h in lattice.basis])
    centre = local.mean(axis=0)

    if on_zone:
        rotation, tilt = _zone_orientation(rng, _ZONE_TO_BEAM, ZONE_JITTER_DEG)
        zone = "<110>" if structure != "wurtzite" else "<11-20>"
    else:
        rotation, tilt = _misorientation(rng, structure, min_off_zone_deg)
        zone = None
    positions = (local - centre) @ rotation.T

    present = np.unique(layer)
    normal = rotation @ np.array([0.0, 0.0, 1.0])
    defect_records = []
    for j, kind in sorted(planted.items()):
        # The fault lies between layers j-1 and j (for a twin, layer j-1 is the mirror plane).
        z_plane = (k0 + j - 0.5) * lattice.layer_spacing
        defect_records.append({
            "type": _DEFECT_NAMES[kind],
            "layer": int(k0 + j - present[0]),
            "normal": [float(v) for v in normal],
            "offset_nm": float((z_plane - centre[2]) / 10.0),
        })
    first = lattice.basis[0][0]
    _, reg = layer_registry(local[symbols == first], lattice)
    crystal_to_lab = rotation @ _CUBIC_TO_STACKING if structure != "wurtzite" else rotation
    params = {
        "material": material,
        "structure": structure,
        "shape": shape_kind,
        "shape_params": body.params,
        "size_nm": float(size_nm),
        "n_atoms": len(symbols),
        "zone_axis": zone,
        "tilt_deg": float(tilt) if on_zone else None,
        "angle_to_nearest_zone_deg": float(tilt),  # on zone: the jitter; off zone: to the nearest axis
        "defects": defect_records,
        "stacking": letters(reg),
        "rotation_crystal_to_lab": [[float(v) for v in row] for row in crystal_to_lab],
        "crystal_frame": "cubic" if structure != "wurtzite" else "x=[2-1-10], z=[0001]",
    }
    return Particle(symbols.astype(str), positions, local, centre, rotation, params, lattice)


_DEFECT_NAMES = {
    "intrinsic": "intrinsic_stacking_fault",
    "extrinsic": "extrinsic_stacking_fault",
    "twin": "twin",
    "I1": "I1_stacking_fault",
    "I2": "I2_stacking_fault",
}


def _defect_layers(rng: np.random.Generator, defects: tuple[str, ...], n_layers: int) -> dict[int, str]:
    if not defects:
        return {}
    lo = max(2, math.floor(0.25 * n_layers))
    hi = min(n_layers - 2, math.ceil(0.75 * n_layers))  # leave a layer of perfect stacking after
    candidates = list(range(lo, hi + 1))
    chosen: dict[int, str] = {}
    for kind in defects:
        free = [k for k in candidates if all(abs(k - c) >= 3 for c in chosen)]
        if not free:
            raise ValueError(f"{n_layers} layers leave no room for {len(defects)} defect(s)")
        chosen[int(rng.choice(free))] = kind
    return chosen


def multiply_twinned(
    rng: np.random.Generator,
    material: str,
    size_nm: float,
    *,
    shape: str | None = None,
    on_zone: bool = True,
    min_off_zone_deg: float = 10.0,
) -> Particle:
    """A decahedron or icosahedron from ``ase.cluster``, the nearest in size to ``size_nm``.

    On zone, the decahedron's five-fold axis, or the icosahedron's two-fold or five-fold axis
    (drawn), is put along the beam: twin boundaries edge-on. Off zone, a uniform random rotation
    at least ``min_off_zone_deg`` from every such axis.

    Examples
    --------
    >>> p = multiply_twinned(np.random.default_rng(0), "Au", 4.0, shape="decahedron")
    >>> p.params["zone_axis"], p.params["defects"][0]["type"]
    ('five-fold', 'multiply_twinned')
    """
    from ase.cluster import Decahedron, Icosahedron

    if material not in ("Au", "Pd"):
        raise ValueError(f"multiply twinned particles are fcc metals (Au, Pd), not {material!r}")
    shape = shape or str(rng.choice(MULTIPLY_TWINNED_SHAPES))
    a = LATTICES[material, "fcc"].lattice_constant
    target = math.pi / 6.0 * (10.0 * size_nm) ** 3
    n_target = 4.0 * target / a**3  # fcc: four atoms per cubic cell
    params: dict[str, Any]
    if shape == "decahedron":
        ratio, r = float(rng.uniform(0.4, 1.0)), int(rng.integers(0, 3))
        best = None
        for p in range(2, 60):
            q = max(1, round(ratio * p))
            atoms = Decahedron(material, p, q, min(r, p - 1), latticeconstant=a)
            if best is None or abs(len(atoms) - n_target) < abs(len(best[0]) - n_target):
                best = (atoms, {"p": p, "q": q, "r": min(r, p - 1)})
            if len(atoms) > n_target:
                break
        atoms, params = best
        axes = {"five-fold": np.array([0.0, 0.0, 1.0])}
    elif shape == "icosahedron":
        shells = max(2, round((n_target * 3.0 / 10.0) ** (1.0 / 3.0)) + 1)
        while shells > 2 and len(Icosahedron(material, shells - 1, latticeconstant=a)) > n_target:
            shells -= 1
        atoms = Icosahedron(material, shells, latticeconstant=a)
        params = {"shells": shells}
        golden = (1.0 + math.sqrt(5.0)) / 2.0
        axes = {"two-fold": np.array([0.0, 0.0, 1.0]), "five-fold": np.array([0.0, 1.0, golden])}
    else:
        raise ValueError(f"multiply twinned shapes are {MULTIPLY_TWINNED_SHAPES}, not {shape!r}")
    local = atoms.positions.copy()
    centre = local.mean(axis=0)
    if on_zone:
        name = str(rng.choice(sorted(axes)))
        rotation, tilt = _zone_orientation(rng, _align_to_beam(axes[name]), ZONE_JITTER_DEG)
        zone: str | None = name
        nearest = tilt
    else:
        for _ in range(1000):
            rotation = random_rotation(rng)
            nearest = min(
                math.degrees(math.acos(min(1.0, abs((rotation @ (v / np.linalg.norm(v)))[2]))))
                for v in axes.values()
            )
            if nearest >= min_off_zone_deg:
                break
        zone, tilt = None, None
    positions = (local - centre) @ rotation.T
    volume = ConvexHull(local).volume
    return Particle(
        np.array(atoms.get_chemical_symbols()), positions, local, centre, rotation,
        {
            "material": material,
            "structure": "fcc",
            "shape": shape,
            "shape_params": params,
            "size_nm": float((6.0 * volume / math.pi) ** (1.0 / 3.0) / 10.0),
            "n_atoms": len(atoms),
            "zone_axis": zone,
            "tilt_deg": tilt,
            "angle_to_nearest_zone_deg": float(nearest),
            "defects": [{"type": "multiply_twinned", "layer": None, "normal": None, "offset_nm": None}],
            "stacking": None,
            "rotation_crystal_to_lab": [[float(v) for v in row] for row in rotation],
            "crystal_frame": "ase.cluster",
        },
        None,
    )


# --------------------------------------------------------------------------------------------
# Amorphous carbon


def carbon_atoms_for(extent_xy: tuple[float, float], thickness: float, density_g_cm3: float) -> int:
    """Number of carbon atoms in a slab of ``extent_xy`` × ``thickness`` (Å) at a density.

    Examples
    --------
    >>> carbon_atoms_for((100.0, 100.0), 10.0, 2.0)
    10028
    """
    per_a3 = density_g_cm3 / 12.011 * _AVOGADRO * 1e-24
    return round(per_a3 * extent_xy[0] * extent_xy[1] * thickness)


def amorphous_carbon(
    rng: np.random.Generator,
    extent_xy: tuple[float, float],
    thickness: float,
    *,
    density_g_cm3: float = 2.0,
    min_distance: float = 1.35,
) -> np.ndarray:
    """Positions (Å) of an amorphous carbon slab, periodic in ``x`` and ``y``.

    Random sequential addition: candidates uniform in the slab are drawn in batches and kept
    when no accepted atom (periodic images in ``x``, ``y`` included) and no earlier candidate of
    the batch lies within ``min_distance``, until the slab holds
    :func:`carbon_atoms_for` atoms.

    Parameters
    ----------
    rng
        Source of randomness.
    extent_xy
        Periodic cell in ``x`` and ``y`` (Å).
    thickness
        Slab thickness (Å); atoms have ``0 <= z < thickness``.
    density_g_cm3
        Mass density; amorphous carbon films are 1.8–2.2 g/cm³.
    min_distance
        Closest allowed approach (Å); the C–C bond is 1.42 Å (graphitic) to 1.54 Å (diamond).

    Returns
    -------
    numpy.ndarray
        ``(n, 3)`` float64 positions.

    Examples
    --------
    >>> pts = amorphous_carbon(np.random.default_rng(0), (30.0, 30.0), 10.0)
    >>> len(pts) == carbon_atoms_for((30.0, 30.0), 10.0, 2.0), bool(pts[:, 2].max() < 10.0)
    (True, True)
    """
    lx, ly = float(extent_xy[0]), float(extent_xy[1])
    n_target = carbon_atoms_for((lx, ly), thickness, density_g_cm3)
    box = np.array([lx, ly, thickness])
    # z is not periodic: a box three times the slab keeps the wrapped images far apart
    tree_box = [lx, ly, 3.0 * thickness + 3.0 * min_distance]
    accepted = np.empty((0, 3))
    for _ in range(200):
        missing = n_target - len(accepted)
        if missing <= 0:
            break
        cand = rng.random((int(2.5 * missing) + 1000, 3)) * box
        if len(accepted):
            free = cKDTree(accepted, boxsize=tree_box).query_ball_point(cand, min_distance, return_length=True) == 0
            cand = cand[free]
        pairs = cKDTree(cand, boxsize=tree_box).query_pairs(min_distance, output_type="ndarray")
        if len(pairs):
            # Drop the later candidate of each close pair: order of drawing decides, as in RSA.
            clash = np.zeros(len(cand), bool)
            clash[pairs.max(axis=1)] = True
            cand = cand[~clash]
        accepted = np.concatenate([accepted, cand[:missing]])
    else:
        raise RuntimeError(f"amorphous carbon did not reach {n_target} atoms (min distance too large?)")
    return accepted
