"""The scene of one image: particles placed on the field of view, then stacked on the carbon
film into the multislice cell.

:func:`compose_scene` places 1–N particles (:mod:`latticewatch.training.simulate.structures`)
inside the field of view, at least ``min_gap_nm`` apart in projection so the binary mask keeps
them apart, except the members of an agglomerate, which touch (their nearest projected atoms
2.4–2.9 Å apart) and form one instance. :func:`build_cell` rests every particle on the carbon
film (a 2.5 Å gap), adds thermal displacements (Gaussian, r.m.s. from Debye–Waller factors) to
the particle atoms and slices the cell.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.spatial import cKDTree

from latticewatch.training.simulate.config import MASK_ATOM_RADIUS_NM, SimulationConfig, weighted_choice
from latticewatch.training.simulate.structures.carbon import amorphous_carbon
from latticewatch.training.simulate.structures.particles import Particle, multiply_twinned, single_crystal
from latticewatch.training.simulate.structures.stacking import DEFECTS, STRUCTURES

#: r.m.s. thermal displacement (Å) per element at room temperature, ``sqrt(B / 8π²)`` from
#: Debye–Waller factors: Au B ≈ 0.60 Å², Pd 0.45 Å², Cd (in CdSe) 1.1 Å², Se 0.8 Å².
THERMAL_RMS_ANGSTROM: dict[str, float] = {"Au": 0.087, "Pd": 0.075, "Cd": 0.118, "Se": 0.101}


@dataclass
class PlacedParticle:
    """A particle of the scene: one or more members (an agglomerate has several), placed.

    ``offsets`` are the ``(x, y)`` positions (Å, cell frame) of each member's centre.
    """

    instance: int
    label: str
    material: str
    members: list[Particle]
    offsets: list[np.ndarray]
    contact_angstrom: list[float] = field(default_factory=list)

    def projected(self) -> np.ndarray:
        """``(n, 2)`` projected atom positions of all members (Å, cell frame)."""
        return np.vstack([m.positions[:, :2] + o for m, o in zip(self.members, self.offsets)])


@dataclass
class Scene:
    """What goes into the multislice cell."""

    fov: float  # Å
    particles: list[PlacedParticle]
    empty_field: bool


def _member(rng: np.random.Generator, config: SimulationConfig, material: str, kind: str, size: float) -> Particle:
    structure = str(rng.choice(STRUCTURES[material]))
    if kind == "perfect":
        return single_crystal(rng, material, size, structure=structure)
    if kind == "faulted":
        if material in ("Au", "Pd") and rng.random() < config.multiply_twinned_fraction:
            return multiply_twinned(rng, material, size)
        n_defects = 2 if rng.random() < config.second_defect_fraction else 1
        defects = tuple(str(rng.choice(DEFECTS[structure])) for _ in range(n_defects))
        for attempt in range(4):
            try:
                return single_crystal(rng, material, size, structure=structure, defects=defects)
            except ValueError:  # too few layers for the defects: one fewer, then a larger particle
                defects = defects[:1]
                size *= 1.0 if attempt == 0 else 1.25
        raise ValueError(f"no room for a planar defect in a {size:.1f} nm {material} particle")
    if kind == "misoriented":
        defects = (str(rng.choice(DEFECTS[structure])),) if rng.random() < config.hidden_defect_fraction else ()
        try:
            return single_crystal(rng, material, size, structure=structure, defects=defects, on_zone=False,
                                     min_off_zone_deg=config.min_off_zone_deg)
        except ValueError:  # too small for the (invisible anyway) defect
            return single_crystal(rng, material, size, structure=structure, on_zone=False,
                                     min_off_zone_deg=config.min_off_zone_deg)
    raise ValueError(kind)


_KIND_OF_CLASS = {"no_stacking_fault": "perfect", "stacking_fault": "faulted", "misoriented": "misoriented"}


def _agglomerate(
    rng: np.random.Generator, config: SimulationConfig, material: str, size_hi: float,
) -> tuple[list[Particle], list[np.ndarray], list[float]]:
    """2–3 touching members of one material: the members, their offsets (Å) and contact distances."""
    n = int(rng.integers(config.agglomerate_members[0], config.agglomerate_members[1] + 1))
    members, offsets, contacts = [], [], []
    lo = min(config.particle_size_nm[0], size_hi)
    for m in range(n):
        kind = str(rng.choice(["perfect", "faulted", "misoriented"]))
        particle = _member(rng, config, material, kind, float(rng.uniform(lo, size_hi)))
        if m == 0:
            members.append(particle)
            offsets.append(np.zeros(2))
            continue
        # Slide the new member in from a random direction towards a random earlier one until
        # its nearest projected atom is `contact` from theirs: touching, never overlapping.
        contact = float(rng.uniform(2.4, 2.9))
        anchor = offsets[int(rng.integers(len(offsets)))]
        theta = float(rng.uniform(0, 2 * math.pi))
        direction = np.array([math.cos(theta), math.sin(theta)])
        tree = cKDTree(np.vstack([p.positions[:, :2] + o for p, o in zip(members, offsets)]))
        start = particle.positions[:, :2] + anchor
        # far enough that no earlier member is within reach, so the gap at `far` is positive
        reach = max(float(np.hypot(*(o - anchor))) + p.radius_xy for p, o in zip(members, offsets))
        far = reach + particle.radius_xy + 2 * contact
        near = 0.0
        for _ in range(40):
            mid = 0.5 * (near + far)
            near, far = (mid, far) if _nearest(tree, start + mid * direction) < contact else (near, mid)
        members.append(particle)
        offsets.append(anchor + far * direction)
        contacts.append(_nearest(tree, start + far * direction))
    return members, offsets, contacts


def _nearest(tree: cKDTree, points: np.ndarray) -> float:
    return float(tree.query(points, k=1)[0].min())


def compose_scene(rng: np.random.Generator, config: SimulationConfig, conditions: dict[str, Any]) -> Scene:
    """Particles of one image, placed in the field of view without overlap (agglomerates touch).

    Distinct particles keep ``min_gap_nm`` between their masks (atoms ``min_gap_nm`` + two mask
    radii apart). Sizes are capped at 55 % of the field of view (agglomerate members at 30 %); a
    particle that finds no free place in 60 tries is left out, so crowded images hold fewer
    particles than drawn.

    Examples
    --------
    >>> cfg = SimulationConfig(size=128, pixel_size_nm=(0.05, 0.05), particle_size_nm=(2, 3), materials={"Pd": 1})
    >>> from latticewatch.training.simulate.optics import draw_conditions
    >>> cond = draw_conditions(np.random.default_rng(0), cfg)
    >>> scene = compose_scene(np.random.default_rng(1), cfg, cond)
    >>> all(p.instance == i + 1 for i, p in enumerate(scene.particles))
    True
    """
    fov = 10.0 * config.size * conditions["pixel_size_nm"]
    if not config.particle_classes or rng.random() < config.empty_fraction:
        return Scene(fov, [], True)
    n = int(rng.integers(config.particles_per_image[0], config.particles_per_image[1] + 1))
    # min_gap_nm is between masks; each mask reaches one atomic radius beyond the atoms
    gap = 10.0 * config.min_gap_nm + 2.0 * 10.0 * MASK_ATOM_RADIUS_NM
    placed: list[PlacedParticle] = []
    for _ in range(n):
        label = weighted_choice(rng, config.particle_classes)
        material = weighted_choice(rng, config.materials)
        candidate = _fitting_particle(rng, config, label, material, len(placed) + 1, fov)
        if candidate is not None and _place(rng, candidate, placed, fov, 10.0 * config.edge_margin_nm, gap):
            placed.append(candidate)
    return Scene(fov, placed, not placed)


def _fitting_particle(
    rng: np.random.Generator, config: SimulationConfig, label: str, material: str, instance: int, fov: float,
) -> PlacedParticle | None:
    """A particle of ``label`` that fits the field of view inside the edge margin, or ``None``.

    A body that does not fit is drawn again smaller, three times at most.
    """
    margin = 10.0 * config.edge_margin_nm
    for shrink in (1.0, 0.75, 0.55, 0.4):
        if label == "agglomeration":
            size_hi = shrink * min(config.particle_size_nm[1], 0.3 * fov / 10.0)
            members, offsets, contacts = _agglomerate(rng, config, material, size_hi)
        else:
            size_hi = shrink * min(config.particle_size_nm[1], 0.55 * fov / 10.0)
            size = float(rng.uniform(min(config.particle_size_nm[0], size_hi), size_hi))
            members = [_member(rng, config, material, _KIND_OF_CLASS[label], size)]
            offsets, contacts = [np.zeros(2)], []
        candidate = PlacedParticle(instance, label, material, members, offsets, contacts)
        if 0.5 * fov - margin - _radius_of(candidate) >= 0:
            return candidate
    return None


def _place(
    rng: np.random.Generator, candidate: PlacedParticle, placed: list[PlacedParticle], fov: float, margin: float,
    gap: float,
) -> bool:
    """Move ``candidate`` to a random position ``gap`` away from the ``placed`` ones; ``False`` after 60 tries."""
    pts = candidate.projected()
    # Centre the bounding circle of the members on the drawn position.
    centre = _centre_of(candidate)
    radius = _radius_of(candidate)
    room = 0.5 * fov - margin - radius
    rel = [o - centre for o in candidate.offsets]
    others = [(_centre_of(p), _radius_of(p), cKDTree(p.projected())) for p in placed]
    for _ in range(60):
        pos = 0.5 * fov + rng.uniform(-room, room, size=2)
        if all(_apart(pos, radius, pts - centre, other, gap) for other in others):
            candidate.offsets = [pos + r for r in rel]
            return True
    return False


def _apart(pos: np.ndarray, radius: float, pts: np.ndarray, other: tuple, gap: float) -> bool:
    """Whether atoms ``pts`` placed at ``pos`` keep ``gap`` from another particle's atoms."""
    centre, other_radius, tree = other
    if np.hypot(*(pos - centre)) >= radius + other_radius + gap:
        return True  # bounding circles apart: no need to look at atoms
    return bool(tree.query(pts + pos, k=1, distance_upper_bound=gap)[0].min() >= gap)


def _centre_of(p: PlacedParticle) -> np.ndarray:
    pts = p.projected()
    return 0.5 * (pts.min(axis=0) + pts.max(axis=0))


def _radius_of(p: PlacedParticle) -> float:
    pts = p.projected()
    return float(np.hypot(*(pts - _centre_of(p)).T).max())



@dataclass
class Cell:
    """The multislice cell: atoms (Å), cell size, slice thicknesses, and where the particles lie."""

    symbols: np.ndarray
    positions: np.ndarray
    size: tuple[float, float, float]
    slices: tuple[float, ...]
    particle_atoms: list[np.ndarray]  # per scene particle: (n, 3) positions as simulated
    n_carbon: int


def build_cell(
    scene: Scene,
    conditions: dict[str, Any],
    config: SimulationConfig,
    carbon_rng: np.random.Generator,
    thermal_rng: np.random.Generator,
) -> Cell:
    """Stack the particles on the carbon film and slice the cell.

    The film is periodic in ``x`` and ``y`` like the cell; particles rest on it with a 2.5 Å
    gap between their lowest (or highest) atoms and the film surface.
    """
    t_c = 10.0 * conditions["carbon"]["thickness_nm"]
    carbon = amorphous_carbon(
        carbon_rng, (scene.fov, scene.fov), t_c,
        density_g_cm3=config.carbon_density_g_cm3, min_distance=config.carbon_min_distance_angstrom,
    )
    margin, gap = 1.0, 2.5
    thick = max((m.thickness for p in scene.particles for m in p.members), default=0.0)
    entrance = conditions["particles_side"] == "beam_entrance"
    if entrance:  # beam meets the particles first, then the film
        surface = margin + thick
        carbon_z0 = surface + gap
        total = carbon_z0 + t_c + margin
    else:
        carbon_z0 = margin
        surface = margin + t_c + gap
        total = surface + thick + margin
    carbon = carbon + [0.0, 0.0, carbon_z0]

    symbols = [np.full(len(carbon), "C")]
    positions = [carbon]
    particle_atoms = []
    for p in scene.particles:
        atoms = []
        for member, offset in zip(p.members, p.offsets):
            pos = member.positions.copy()
            pos[:, :2] += offset
            pos[:, 2] += (surface - pos[:, 2].max()) if entrance else (surface - pos[:, 2].min())
            rms = np.array([THERMAL_RMS_ANGSTROM.get(s, 0.08) for s in member.symbols])
            pos += thermal_rng.normal(size=pos.shape) * rms[:, None]
            atoms.append(pos)
            symbols.append(np.asarray(member.symbols))
            positions.append(pos)
        particle_atoms.append(np.vstack(atoms))
    positions = np.vstack(positions)
    positions[:, :2] %= scene.fov  # the film wraps; particles lie inside anyway
    # Uniform slices that end exactly on the cell boundary.
    n_slices = max(1, math.ceil(total / config.slice_thickness_angstrom - 1e-9))
    slices = (total / n_slices,) * n_slices
    return Cell(np.concatenate(symbols), positions, (scene.fov, scene.fov, total), slices, particle_atoms, len(carbon))


