"""Isolation: threshold the probability map, clean it with morphology, label and measure regions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from skimage.measure import regionprops


class IsolationParams(BaseModel):
    """Morphology and size rules, in physical units (converted with the model's pixel size)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    threshold: float = 0.5
    opening_radius_nm: float = 0.1  # 2 px at 0.05 nm/px: removes speckle; cost grows with the disc area
    closing_radius_nm: float = 0.15  # bridges the dark fringes inside a particle
    min_area_nm2: float = 2.0
    max_particle_area_nm2: float = 100.0  # larger than a 11 nm disc: likely several particles
    min_solidity: float = 0.85  # concave outlines suggest touching particles


@dataclass(frozen=True)
class IsolatedRegion:
    """A labelled region at model resolution; the pipeline maps it back to frame pixels."""

    label: int
    slice: tuple[slice, slice]
    bbox: tuple[int, int, int, int]
    centroid: tuple[float, float]
    area_px: int
    eccentricity: float
    solidity: float
    touches_edge: bool


def _radius_px(radius_nm: float, pixel_size_nm: float | None) -> int:
    # unknown pixel size: treat the configured radius as if the model sampling applied (1 px minimum)
    return max(0, int(round(radius_nm / pixel_size_nm))) if pixel_size_nm else 1


def _shifted(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``out[y, x] = mask[y + dy, x + dx]``, False where that falls outside the image."""
    h, w = mask.shape
    out = np.zeros_like(mask)
    target = (slice(max(0, -dy), h - max(0, dy)), slice(max(0, -dx), w - max(0, dx)))
    out[target] = mask[max(0, dy) : h - max(0, -dy), max(0, dx) : w - max(0, -dx)]
    return out


def disk_morphology(mask: np.ndarray, radius: int, erode: bool) -> np.ndarray:
    """Binary erosion or dilation by ``skimage.morphology.disk(radius)``, outside = False.

    The disc is a stack of horizontal segments of half-width ⌊√(r² − dy²)⌋, so the result is an
    intersection (erosion) or union (dilation) of 2r + 1 shifted 1-D results, each built up from
    the previous width: ~5r whole-image boolean operations instead of scipy's per-pixel loop over
    every disc element (≈ 1 ms instead of 6–9 ms at 512²).

    Examples
    --------
    >>> mask = np.zeros((7, 7), bool); mask[3, 3] = True
    >>> int(disk_morphology(mask, 1, erode=False).sum())  # a point grows into a radius-1 disc
    5
    """
    combine = np.logical_and if erode else np.logical_or
    sign = 1 if erode else -1  # dilation reflects the structuring element (symmetric here anyway)
    widths = [int(np.floor(np.sqrt(radius**2 - dy**2))) for dy in range(radius + 1)]
    along_rows = {0: mask}
    for w in range(1, max(widths) + 1):
        along_rows[w] = combine(combine(along_rows[w - 1], _shifted(mask, 0, w)), _shifted(mask, 0, -w))
    out = along_rows[widths[0]]
    for dy in range(1, radius + 1):
        segment = along_rows[widths[dy]]
        out = combine(combine(out, _shifted(segment, sign * dy, 0)), _shifted(segment, -sign * dy, 0))
    return out


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill background enclosed by foreground: background components not touching the border."""
    background, n = ndimage.label(~mask)
    if n == 0:
        return mask
    border = np.unique(np.concatenate([background[0], background[-1], background[:, 0], background[:, -1]]))
    enclosed = np.ones(n + 1, bool)
    enclosed[border] = False
    enclosed[0] = False
    return mask | enclosed[background]


def clean_mask(probability: np.ndarray, params: IsolationParams, pixel_size_nm: float | None) -> np.ndarray:
    """Threshold, open (removes speckle), close (joins fringe gaps), fill holes, drop small regions."""
    mask = probability >= params.threshold
    r_open = _radius_px(params.opening_radius_nm, pixel_size_nm)
    r_close = _radius_px(params.closing_radius_nm, pixel_size_nm)
    if r_open:
        mask = disk_morphology(disk_morphology(mask, r_open, erode=True), r_open, erode=False)
    if r_close:
        # pad so closing does not glue regions to the frame border
        padded = np.pad(mask, r_close, mode="edge")
        closed = disk_morphology(disk_morphology(padded, r_close, erode=False), r_close, erode=True)
        mask = closed[r_close:-r_close, r_close:-r_close]
    mask = fill_holes(mask)
    labels, n = ndimage.label(mask)
    if n:
        areas = np.bincount(labels.ravel(), minlength=n + 1)
        px_area = pixel_size_nm**2 if pixel_size_nm else 1.0
        keep = areas * px_area >= params.min_area_nm2
        keep[0] = False
        mask = keep[labels]
    return mask


def solidity(region: np.ndarray) -> float:
    """Pixel area over the area of the convex hull of the region's pixel squares.

    The hull is taken over the corners of the boundary pixels only, with scipy's Qhull: much
    cheaper than rasterising the hull (skimage's ``solidity`` took ~5 ms per large region).
    """
    boundary = region & ~ndimage.binary_erosion(region)
    ys, xs = np.nonzero(boundary)
    corners = np.concatenate([np.column_stack([ys + dy, xs + dx]) for dy in (0, 1) for dx in (0, 1)])
    try:
        hull_area = ConvexHull(corners).volume  # in 2-D, "volume" is the enclosed area
    except QhullError:  # all corners on one line cannot happen for pixel squares; be safe anyway
        return 1.0
    return float(np.count_nonzero(region) / hull_area)


def isolate(mask: np.ndarray) -> tuple[np.ndarray, list[IsolatedRegion]]:
    """Label a clean binary mask and measure each region (pixel units, model resolution).

    Examples
    --------
    >>> m = np.zeros((20, 20), bool); m[5:10, 5:10] = True
    >>> labels, regions = isolate(m)
    >>> regions[0].area_px, regions[0].touches_edge
    (25, False)
    """
    labels, _ = ndimage.label(mask)
    h, w = mask.shape
    regions = []
    for props in regionprops(labels):
        r0, c0, r1, c1 = props.bbox
        regions.append(
            IsolatedRegion(
                label=props.label,
                slice=props.slice,
                bbox=(r0, c0, r1, c1),
                centroid=tuple(float(v) for v in props.centroid),
                area_px=int(props.area),
                eccentricity=float(props.eccentricity),
                solidity=solidity(props.image),
                touches_edge=r0 == 0 or c0 == 0 or r1 == h or c1 == w,
            )
        )
    return labels, regions
