"""Training data: synthetic frames turned into model-ready (image, mask) pairs, and augmentation."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from latticewatch.stages.preprocess import Normalisation, preprocess
from latticewatch.testing.synthetic.frames import generate_frame


def synthetic_segmentation_set(
    n: int,
    seed: int,
    *,
    shape: tuple[int, int] = (512, 512),
    pixel_size_nm: float = 0.05,
    normalisation: Normalisation = "max",
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` preprocessed synthetic frames (float32, N×H×W) and their particle masks (uint8).

    Frames are generated at the model's pixel size, so preprocessing only filters and normalises.
    """
    rng = np.random.default_rng(seed)
    images = np.empty((n, *shape), np.float32)
    masks = np.empty((n, *shape), np.uint8)
    for i in tqdm(range(n), desc="synthetic frames", disable=not progress, unit="frame"):
        sample = generate_frame(rng, shape=shape, pixel_size_nm=pixel_size_nm)
        images[i] = preprocess(sample.image, pixel_size_nm, normalisation=normalisation,
                               model_pixel_size_nm=pixel_size_nm).image
        masks[i] = sample.mask
    return images, masks


def random_dihedral(rng: np.random.Generator, *arrays: np.ndarray) -> list[np.ndarray]:
    """The same random 90° rotation and flip applied to every array (last two axes)."""
    k, flip = int(rng.integers(4)), bool(rng.integers(2))
    out = [np.rot90(a, k, axes=(-2, -1)) for a in arrays]
    return [np.flip(a, -1) if flip else a for a in out]


def rotate_crop(
    image: np.ndarray,
    mask: np.ndarray,
    *,
    angle_deg: float,
    flip: bool,
    centre: tuple[float, float],
    crop: int,
) -> tuple[np.ndarray, np.ndarray]:
    """A ``crop``×``crop`` window centred on ``centre`` (row, col), rotated by ``angle_deg``
    (counter-clockwise as displayed, rows pointing down) and optionally mirrored left–right.

    Image and mask are sampled at the same coordinates, the image with linear interpolation, the
    mask with nearest neighbour (so it stays a clean label map); outside the frame both are
    mirrored (``reflect``), which continues a lattice plausibly rather than padding it with a
    constant the network would learn to recognise.

    Examples
    --------
    >>> mask = np.zeros((8, 8), bool); mask[0, :] = True  # the top row
    >>> x, y = rotate_crop(mask.astype(np.float32), mask, angle_deg=90, flip=False, centre=(3.5, 3.5), crop=8)
    >>> bool(y[:, 0].all()), int(y.sum())  # turned counter-clockwise: now the left column
    (True, 8)
    """
    a = np.deg2rad(angle_deg)
    # output offset (r, c) from the crop centre samples the input at centre + M·(r, c): a rotation
    # of the sampling grid by +a appears as the content turning by −a, hence the sign choice
    rotation = np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])
    matrix = rotation @ np.diag([1.0, -1.0 if flip else 1.0])
    half = (crop - 1) / 2.0
    offset = np.asarray(centre, float) - matrix @ np.array([half, half])
    x = ndimage.affine_transform(image.astype(np.float32, copy=False), matrix, offset=offset, output_shape=(crop, crop),
                                 order=1, mode="reflect")
    y = ndimage.affine_transform(mask.astype(np.uint8, copy=False), matrix, offset=offset, output_shape=(crop, crop),
                                 order=0, mode="reflect")
    return x, y


def random_rotation_crop(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray,
                         crop: int) -> tuple[np.ndarray, np.ndarray]:
    """`rotate_crop` with a uniform angle in [0°, 360°), a random left–right flip and a random
    centre at which an unrotated crop would fit (the image centre when the crop is as large as
    the image; the rotated corners then come from the mirrored surroundings)."""
    h, w = image.shape
    lo_r, hi_r = sorted((min(crop / 2, h / 2), max(h - crop / 2, h / 2)))
    lo_c, hi_c = sorted((min(crop / 2, w / 2), max(w - crop / 2, w / 2)))
    centre = (float(rng.uniform(lo_r, hi_r)) - 0.5, float(rng.uniform(lo_c, hi_c)) - 0.5)
    return rotate_crop(image, mask, angle_deg=float(rng.uniform(0.0, 360.0)), flip=bool(rng.integers(2)), centre=centre,
                       crop=crop)
