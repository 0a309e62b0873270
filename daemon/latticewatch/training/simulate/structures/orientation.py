"""Orientations of a particle: a zone axis along the beam, or well away from every zone axis.

On zone, the zone axis is put along the beam (lab ``+z``), turned by a random angle about it and
tilted off by at most :data:`ZONE_JITTER_DEG`. Off zone ("misoriented"), the rotation is uniform
on SO(3), redrawn until every low-index zone axis (:func:`zone_axes`) is at least
``min_off_zone_deg`` from the beam: a few planes may still be edge-on and show fringes, but no
atomic columns line up.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np

from latticewatch.training.simulate.structures.stacking import CUBIC_TO_STACKING

#: Zone-axis tolerance of an "on zone" particle: the largest random tilt away from the axis.
ZONE_JITTER_DEG = 0.5
#: Default smallest angle between the beam and any low-index zone axis of a misoriented particle.
MIN_OFF_ZONE_DEG = 5.0
#: The zone axis of the stacking frame (its ``x`` axis) onto the beam: ``lab = ZONE_TO_BEAM @ local``.
ZONE_TO_BEAM = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])


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


def align_to_beam(direction: np.ndarray) -> np.ndarray:
    """A rotation taking ``direction`` onto the beam (``+z``).

    Examples
    --------
    >>> (align_to_beam(np.array([1.0, 0.0, 0.0])) @ [1.0, 0.0, 0.0]).round(6).tolist()
    [0.0, 0.0, 1.0]
    """
    d = np.asarray(direction, float) / np.linalg.norm(direction)
    axis = np.cross(d, [0.0, 0.0, 1.0])
    s = np.linalg.norm(axis)
    if s < 1e-12:
        return np.eye(3) if d[2] > 0 else np.diag([1.0, -1.0, -1.0])
    return _axis_rotation(axis, math.atan2(s, d[2]))


def zone_orientation(rng: np.random.Generator, to_beam: np.ndarray, jitter_deg: float) -> tuple[np.ndarray, float]:
    """``to_beam`` followed by a random turn about the beam and a tilt of at most ``jitter_deg``.

    Returns
    -------
    rotation, tilt_deg
        The rotation and how far it tilts the zone axis off the beam (degrees).

    Examples
    --------
    >>> rotation, tilt = zone_orientation(np.random.default_rng(0), ZONE_TO_BEAM, ZONE_JITTER_DEG)
    >>> tilt <= ZONE_JITTER_DEG, round(angle_to_zone(rotation, "fcc"), 3) <= ZONE_JITTER_DEG
    (True, True)
    """
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
        for perm in set(itertools.permutations(base)):
            for signs in np.ndindex(2, 2, 2):
                v = tuple(p * (1 - 2 * s) for p, s in zip(perm, signs))
                first = next(x for x in v if x != 0)
                if first > 0:
                    dirs.add(v)
    vecs = np.array(sorted(dirs), float)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    return vecs @ CUBIC_TO_STACKING.T


def angle_to_zone(rotation: np.ndarray, structure: str) -> float:
    """Smallest angle (degrees) between the beam and a zone axis of :func:`zone_axes`.

    Examples
    --------
    >>> round(angle_to_zone(ZONE_TO_BEAM, "fcc"), 3)
    0.0
    """
    beam_components = np.abs((zone_axes(structure) @ rotation.T)[:, 2])
    return float(np.degrees(np.arccos(np.clip(beam_components.max(), -1.0, 1.0))))


def misorientation(rng: np.random.Generator, structure: str, min_off_zone_deg: float) -> tuple[np.ndarray, float]:
    """A uniform random rotation at least ``min_off_zone_deg`` from every zone axis of ``structure``.

    Returns
    -------
    rotation, angle_deg
        The rotation and the angle between the beam and the nearest zone axis.

    Examples
    --------
    >>> rotation, angle = misorientation(np.random.default_rng(0), "fcc", 5.0)
    >>> angle >= 5.0, round(angle_to_zone(rotation, "fcc"), 6) == round(angle, 6)
    (True, True)
    """
    for _ in range(1000):
        rot = random_rotation(rng)
        angle = angle_to_zone(rot, structure)
        if angle >= min_off_zone_deg:
            return rot, angle
    raise RuntimeError(f"no orientation {min_off_zone_deg}° off every zone axis in 1000 draws")


