"""Nanoparticles: single crystals (perfect or with planted planar defects) and multiply twinned
particles, on or off a zone axis.

Single crystals
---------------
:func:`single_crystal` stacks close-packed layers (:mod:`.stacking`), plants the planar defects
as rule changes of the sequence, and carves the particle shape (:mod:`.shapes`) from the layer
sites, at a random offset from the lattice so no two particles are cut the same way. Perfect and
faulted particles go through exactly the same code, so nothing but the stacking tells them apart.
On zone (:mod:`.orientation`), every planted fault is edge-on.

Multiply twinned particles
--------------------------
Decahedra and icosahedra come from ``ase.cluster`` as they are; seen along the decahedron's
five-fold axis (or the icosahedron's two-fold or five-fold axis) their twin boundaries are
edge-on, so they count as defective particles (``multiply_twinned``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.spatial import ConvexHull

from latticewatch.training.simulate.structures.orientation import (
    MIN_OFF_ZONE_DEG,
    ZONE_JITTER_DEG,
    ZONE_TO_BEAM,
    align_to_beam,
    misorientation,
    random_rotation,
    zone_orientation,
)
from latticewatch.training.simulate.structures.shapes import SHAPES, Shape, make_shape
from latticewatch.training.simulate.structures.stacking import (
    CUBIC_TO_STACKING,
    LATTICES,
    STRUCTURES,
    Lattice,
    layer_registry,
    letters,
    stacked_crystal,
    stacking_sequence,
)

#: Shapes of multiply twinned particles (fcc metals only).
MULTIPLY_TWINNED_SHAPES: tuple[str, ...] = ("decahedron", "icosahedron")

#: Names of the planted defects in a particle's record, by the kind :func:`stacking_sequence` takes.
DEFECT_NAMES = {
    "intrinsic": "intrinsic_stacking_fault",
    "extrinsic": "extrinsic_stacking_fault",
    "twin": "twin",
    "I1": "I1_stacking_fault",
    "I2": "I2_stacking_fault",
}


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
    >>> from latticewatch.training.simulate.structures.stacking import stacking_environments
    >>> p = single_crystal(np.random.default_rng(3), "Au", 3.0, shape="octahedron", defects=("twin",))
    >>> p.params["zone_axis"], p.params["defects"][0]["type"], "h" in stacking_environments(
    ...     layer_registry(p.local_positions, p.lattice)[1])
    ('<110>', 'twin', True)
    """
    structure, shape_kind = _structure_and_shape(rng, material, structure, shape)
    lattice = LATTICES[material, structure]
    body = make_shape(rng, shape_kind, size_nm)
    sites, layer, planted, k0 = _carve(rng, lattice, body, defects, size_nm)

    symbols = np.concatenate([np.full(len(sites), sym, dtype=object) for sym, _ in lattice.basis])
    local = np.vstack([sites + [0.0, 0.0, h * lattice.layer_spacing] for _, h in lattice.basis])
    centre = local.mean(axis=0)
    rotation, tilt, zone = _crystal_orientation(rng, structure, on_zone, min_off_zone_deg)
    positions = (local - centre) @ rotation.T

    first = lattice.basis[0][0]
    _, reg = layer_registry(local[symbols == first], lattice)
    crystal_to_lab = rotation @ CUBIC_TO_STACKING if structure != "wurtzite" else rotation
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
        "defects": _defect_records(planted, k0, int(layer.min()), lattice, rotation, centre),
        "stacking": letters(reg),
        "rotation_crystal_to_lab": [[float(v) for v in row] for row in crystal_to_lab],
        "crystal_frame": "cubic" if structure != "wurtzite" else "x=[2-1-10], z=[0001]",
    }
    return Particle(symbols.astype(str), positions, local, centre, rotation, params, lattice)


def _structure_and_shape(
    rng: np.random.Generator, material: str, structure: str | None, shape: str | None,
) -> tuple[str, str]:
    """The structure and shape asked for (drawn when ``None``), checked against the material."""
    if material not in STRUCTURES:
        raise ValueError(f"material must be one of {tuple(STRUCTURES)}, got {material!r}")
    structure = structure or str(rng.choice(STRUCTURES[material]))
    if structure not in STRUCTURES[material]:
        raise ValueError(f"{material} comes as {STRUCTURES[material]}, not {structure!r}")
    shape_kind = shape or str(rng.choice(SHAPES[structure]))
    if shape_kind not in SHAPES[structure]:
        raise ValueError(f"{structure} particles take shapes {SHAPES[structure]}, not {shape_kind!r}")
    return structure, shape_kind


def _carve(
    rng: np.random.Generator, lattice: Lattice, body: Shape, defects: tuple[str, ...], size_nm: float,
) -> tuple[np.ndarray, np.ndarray, dict[int, str], int]:
    """Layer sites inside ``body`` of a stacking with ``defects`` planted.

    Returns
    -------
    sites, layer, planted, k0
        Site positions (stacking frame, Å), the layer index of each, the planted defects
        (``{index in the sequence: kind}``) and the layer index of the sequence's first layer.
    """
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
    sites, layer = carve(stacking_sequence(lattice.structure, n_layers, start=start, direction=direction))
    if len(sites) == 0:
        raise ValueError(f"a {size_nm} nm {body.kind} holds no atoms")
    held = np.unique(layer)
    planted = {int(held[0] - k0 + j): kind for j, kind in _defect_layers(rng, defects, len(held)).items()}
    if planted:
        sites, layer = carve(stacking_sequence(lattice.structure, n_layers, planted, start=start, direction=direction))
    return sites, layer, planted, k0


def _crystal_orientation(
    rng: np.random.Generator, structure: str, on_zone: bool, min_off_zone_deg: float,
) -> tuple[np.ndarray, float, str | None]:
    """Rotation, angle to the nearest zone axis (on zone: the jitter) and the zone axis's name."""
    if on_zone:
        rotation, tilt = zone_orientation(rng, ZONE_TO_BEAM, ZONE_JITTER_DEG)
        return rotation, tilt, "<110>" if structure != "wurtzite" else "<11-20>"
    rotation, angle = misorientation(rng, structure, min_off_zone_deg)
    return rotation, angle, None


def _defect_records(
    planted: dict[int, str], k0: int, first_layer: int, lattice: Lattice, rotation: np.ndarray, centre: np.ndarray,
) -> list[dict[str, Any]]:
    """Type, layer (counted from the particle's first layer), lab-frame normal and offset of each defect."""
    normal = rotation @ np.array([0.0, 0.0, 1.0])
    records = []
    for j, kind in sorted(planted.items()):
        # The fault lies between layers j-1 and j (for a twin, layer j-1 is the mirror plane).
        z_plane = (k0 + j - 0.5) * lattice.layer_spacing
        records.append({
            "type": DEFECT_NAMES[kind],
            "layer": int(k0 + j - first_layer),
            "normal": [float(v) for v in normal],
            "offset_nm": float((z_plane - centre[2]) / 10.0),
        })
    return records


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
    if material not in ("Au", "Pd"):
        raise ValueError(f"multiply twinned particles are fcc metals (Au, Pd), not {material!r}")
    shape = shape or str(rng.choice(MULTIPLY_TWINNED_SHAPES))
    a = LATTICES[material, "fcc"].lattice_constant
    target = math.pi / 6.0 * (10.0 * size_nm) ** 3
    n_target = 4.0 * target / a**3  # fcc: four atoms per cubic cell
    if shape == "decahedron":
        atoms, params, axes = _decahedron(rng, material, a, n_target)
    elif shape == "icosahedron":
        atoms, params, axes = _icosahedron(material, a, n_target)
    else:
        raise ValueError(f"multiply twinned shapes are {MULTIPLY_TWINNED_SHAPES}, not {shape!r}")
    local = atoms.positions.copy()
    centre = local.mean(axis=0)
    rotation, zone, tilt, nearest = _twinned_orientation(rng, axes, on_zone, min_off_zone_deg)
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


def _decahedron(rng: np.random.Generator, material: str, a: float, n_target: float):
    """The ``ase`` decahedron of a drawn shape nearest to ``n_target`` atoms, its parameters and twin axis."""
    from ase.cluster import Decahedron

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
    return atoms, params, {"five-fold": np.array([0.0, 0.0, 1.0])}


def _icosahedron(material: str, a: float, n_target: float):
    """The ``ase`` icosahedron nearest to ``n_target`` atoms, its parameters and axes (twin boundaries edge-on)."""
    from ase.cluster import Icosahedron

    shells = max(2, round((n_target * 3.0 / 10.0) ** (1.0 / 3.0)) + 1)
    while shells > 2 and len(Icosahedron(material, shells - 1, latticeconstant=a)) > n_target:
        shells -= 1
    atoms = Icosahedron(material, shells, latticeconstant=a)
    golden = (1.0 + math.sqrt(5.0)) / 2.0
    return atoms, {"shells": shells}, {"two-fold": np.array([0.0, 0.0, 1.0]), "five-fold": np.array([0.0, 1.0, golden])}


def _twinned_orientation(
    rng: np.random.Generator, axes: dict[str, np.ndarray], on_zone: bool, min_off_zone_deg: float,
) -> tuple[np.ndarray, str | None, float | None, float]:
    """Rotation, name of the axis along the beam (``None`` off zone), tilt, angle to the nearest axis."""
    if on_zone:
        name = str(rng.choice(sorted(axes)))
        rotation, tilt = zone_orientation(rng, align_to_beam(axes[name]), ZONE_JITTER_DEG)
        return rotation, name, tilt, tilt
    for _ in range(1000):
        rotation = random_rotation(rng)
        nearest = min(
            math.degrees(math.acos(min(1.0, abs((rotation @ (v / np.linalg.norm(v)))[2]))))
            for v in axes.values()
        )
        if nearest >= min_off_zone_deg:
            break
    return rotation, None, None, nearest
