"""The amorphous carbon support film.

:func:`amorphous_carbon` is random sequential addition with a minimum distance: uniform
candidates in batches, each tested against the accepted atoms with a periodic k-d tree (cell
list in C) and against the rest of its batch, until the number of atoms for the density is
reached. 2.0 g/cm³ with 1.35 Å gives a packing fraction of ~0.12, far below the random
sequential jamming limit, so it converges in a handful of batches.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

#: Avogadro constant, for densities.
_AVOGADRO = 6.02214076e23


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
