"""Ground truth from the simulated atoms: the instance map, the per-particle records, and the
windows of the classifier crops.

The particle mask is the projected footprint of the particle's atoms: every pixel whose centre
lies within :data:`~latticewatch.training.simulate.config.MASK_ATOM_RADIUS_NM` of a projected atom
centre (after thermal displacement), closed with a disc of
:data:`~latticewatch.training.simulate.config.MASK_CLOSING_NM` (fills the notches between surface
columns) and with enclosed holes filled. An agglomerate is one instance. Contrast delocalised
outside the particle by the lens (fringes running past the edge at large defocus) is
deliberately not in the mask.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from latticewatch.training.simulate.config import MASK_ATOM_RADIUS_NM, MASK_CLOSING_NM, SimulationConfig
from latticewatch.training.simulate.scene import Cell, Scene
from latticewatch.training.simulate.structures.particles import Particle


def pixel_coordinates(xy: np.ndarray, pixel_size: float, sampling: float) -> np.ndarray:
    """``(row, col)`` pixel coordinates of cell positions ``(x, y)`` (Å).

    Detector pixel ``j`` averages samples ``j·f … j·f + f − 1``, so its centre is at
    ``j · pixel_size + (pixel_size − sampling) / 2``.

    Examples
    --------
    >>> pixel_coordinates(np.array([[1.5, 0.5]]), 1.0, 0.5).tolist()
    [[0.25, 1.25]]
    """
    shift = 0.5 * (pixel_size - sampling)
    return np.column_stack([(xy[:, 1] - shift) / pixel_size, (xy[:, 0] - shift) / pixel_size])


def footprint(
    rc: np.ndarray, radius_px: float, shape: tuple[int, int], closing_px: float = 0.0,
) -> tuple[np.ndarray, tuple[slice, slice]]:
    """Mask of pixels within ``radius_px`` of any point ``rc`` (row, col), closed, holes filled.

    Parameters
    ----------
    rc
        ``(n, 2)`` points in pixel coordinates (pixel centres are integers).
    radius_px
        Disc radius around each point.
    shape
        Shape of the image the mask belongs to (the mask is clipped to it).
    closing_px
        Radius of a binary closing (disc) that fills notches narrower than twice it.

    Returns
    -------
    mask, box
        The mask over its bounding box and the box (slices into an image of ``shape``).

    Examples
    --------
    >>> mask, box = footprint(np.array([[10.0, 10.0]]), 2.0, (32, 32))
    >>> int(mask.sum()), (box[0].start, box[0].stop)
    (13, (7, 14))
    >>> two = np.array([[10.0, 10.0], [10.0, 15.0]])  # a notch between two discs ...
    >>> int(footprint(two, 2.0, (32, 32))[0].sum()), int(footprint(two, 2.0, (32, 32), 3.0)[0].sum())
    (26, 30)
    """
    pad = math.ceil(closing_px) + 1
    r0 = math.floor(rc[:, 0].min() - radius_px) - pad
    r1 = math.ceil(rc[:, 0].max() + radius_px) + 1 + pad
    c0 = math.floor(rc[:, 1].min() - radius_px) - pad
    c1 = math.ceil(rc[:, 1].max() + radius_px) + 1 + pad
    rows, cols = np.mgrid[r0:r1, c0:c1]
    grid = np.column_stack([rows.ravel(), cols.ravel()])
    dist, _ = cKDTree(rc).query(grid, k=1, distance_upper_bound=radius_px + 1e-9)
    mask = (dist <= radius_px).reshape(rows.shape)
    if closing_px > 0:
        k = math.floor(closing_px)
        yy, xx = np.mgrid[-k:k + 1, -k:k + 1]
        mask = ndimage.binary_closing(mask, structure=yy**2 + xx**2 <= closing_px**2)
    mask = ndimage.binary_fill_holes(mask)
    # The padded box may reach past the image: keep the part inside.
    b0, b1 = max(r0, 0), min(r1, shape[0])
    d0, d1 = max(c0, 0), min(c1, shape[1])
    return mask[b0 - r0:b1 - r0, d0 - c0:d1 - c0], (slice(b0, b1), slice(d0, d1))


def rasterise(scene: Scene, cell: Cell, conditions: dict[str, Any], shape: tuple[int, int]) -> np.ndarray:
    """Instance map (uint16, 0 = background) from the simulated particle atoms."""
    px = 10.0 * conditions["pixel_size_nm"]
    s = conditions["simulation"]["sampling_angstrom"]
    instances = np.zeros(shape, np.uint16)
    for p, atoms in zip(scene.particles, cell.particle_atoms):
        rc = pixel_coordinates(atoms[:, :2], px, s)
        mask, box = footprint(rc, 10.0 * MASK_ATOM_RADIUS_NM / px, shape, 10.0 * MASK_CLOSING_NM / px)
        target = instances[box]
        target[mask & (target == 0)] = p.instance
    return instances


def particle_records(scene: Scene, conditions: dict[str, Any], instances: np.ndarray) -> list[dict[str, Any]]:
    """The per-image JSON record of each particle: its instance's box and area, and how it was made.

    A single particle carries its member's fields (structure, shape, zone axis, defects …) at the
    top level; an agglomerate lists them under ``members``, as every particle does.
    """
    objects = ndimage.find_objects(instances.astype(np.int64))
    rows, cols = instances.shape
    out = []
    for p in scene.particles:
        box = objects[p.instance - 1] if p.instance - 1 < len(objects) else None
        area = int(np.count_nonzero(instances == p.instance))
        bbox = [box[0].start, box[1].start, box[0].stop, box[1].stop] if box is not None else None
        members = [_member_record(m, offset, conditions) for m, offset in zip(p.members, p.offsets)]
        touches = bbox is not None and (bbox[0] == 0 or bbox[1] == 0 or bbox[2] == rows or bbox[3] == cols)
        entry: dict[str, Any] = {
            "instance": p.instance,
            "class": p.label,
            "material": p.material,
            "bbox": bbox,
            "area_px": area,
            "equivalent_diameter_nm": math.sqrt(4.0 * area / math.pi) * conditions["pixel_size_nm"],
            "touches_edge": bool(touches),
        }
        if len(members) == 1:
            entry.update({k: v for k, v in members[0].items() if k not in entry})
        else:
            entry["shape"] = "agglomerate"
            entry["size_nm"] = entry["equivalent_diameter_nm"]
            entry["centre_px"] = [float(np.mean([m["centre_px"][axis] for m in members])) for axis in (0, 1)]
            entry["contact_angstrom"] = p.contact_angstrom
        entry["members"] = members
        out.append(entry)
    return out


def _member_record(member: Particle, offset: np.ndarray, conditions: dict[str, Any]) -> dict[str, Any]:
    """A member's parameters with its centre, and its defect planes, in pixel coordinates."""
    px = 10.0 * conditions["pixel_size_nm"]
    s = conditions["simulation"]["sampling_angstrom"]
    rec = dict(member.params)
    centre = pixel_coordinates(offset[None, :], px, s)[0]
    rec["centre_px"] = [float(centre[0]), float(centre[1])]
    rec["thickness_nm"] = member.thickness / 10.0
    defects = []
    for d in rec["defects"]:
        d = dict(d)
        if d["normal"] is not None:
            n = np.asarray(d["normal"])
            point = offset + 10.0 * d["offset_nm"] * n[:2]
            rc = pixel_coordinates(point[None, :], px, s)[0]
            d["point_px"] = [float(rc[0]), float(rc[1])]
            d["normal_px"] = [float(n[1]), float(n[0])]  # (row, col) components
            d["edge_on"] = bool(abs(n[2]) < math.sin(math.radians(1.0)))
        defects.append(d)
    rec["defects"] = defects
    return rec


def crop_windows(
    rng: np.random.Generator, config: SimulationConfig, instances: np.ndarray, particles: list[dict[str, Any]],
    conditions: dict[str, Any],
) -> list[dict[str, Any]]:
    """Square windows for the classifier: one per particle, plus one of bare carbon if allowed."""
    size = instances.shape[0]
    windows = []
    for p in particles:
        if p["bbox"] is None:
            continue
        r0, c0, r1, c1 = p["bbox"]
        side = min(size, max(config.crop_min_px, math.ceil(config.crop_scale * max(r1 - r0, c1 - c0))))
        top = _clamp(round(0.5 * (r0 + r1) - side / 2), 0, size - side)
        left = _clamp(round(0.5 * (c0 + c1) - side / 2), 0, size - side)
        mask = instances[top:top + side, left:left + side] == p["instance"]
        windows.append({"kind": "p", "number": p["instance"], "class": p["class"], "instance": p["instance"],
                        "window": [top, left, top + side, left + side], "mask": mask})
    if config.classes.get("empty", 0) > 0:
        side = min(size, config.crop_min_px)
        gap_px = max(1, round(config.min_gap_nm / conditions["pixel_size_nm"]))
        occupied = ndimage.binary_dilation(instances > 0, iterations=gap_px)
        for _ in range(60):
            top, left = (int(v) for v in rng.integers(0, size - side + 1, size=2))
            if not occupied[top:top + side, left:left + side].any():
                mask = _blob(rng, side, config, conditions["pixel_size_nm"])
                windows.append({"kind": "e", "number": 1, "class": "empty", "instance": 0,
                                "window": [top, left, top + side, left + side], "mask": mask})
                break
    return windows


def _clamp(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, v))


def _blob(rng: np.random.Generator, side: int, config: SimulationConfig, px_nm: float) -> np.ndarray:
    """An ellipse in the middle of a crop: the kind of region a segmenter finds in carbon by mistake."""
    d = min(rng.uniform(*config.particle_size_nm) / px_nm, 0.6 * side)
    a, b = 0.5 * d, 0.5 * d * float(rng.uniform(0.6, 1.0))
    phi = float(rng.uniform(0, math.pi))
    rows, cols = np.mgrid[0:side, 0:side] - (side - 1) / 2.0
    u = cols * math.cos(phi) + rows * math.sin(phi)
    v = -cols * math.sin(phi) + rows * math.cos(phi)
    return (u / a) ** 2 + (v / b) ** 2 <= 1.0


