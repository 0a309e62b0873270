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
    scale: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """A ``crop``×``crop`` window centred on ``centre`` (row, col), rotated by ``angle_deg``
    (counter-clockwise as displayed, rows pointing down) and optionally mirrored left–right.

    Image and mask are sampled at the same coordinates, the image with linear interpolation, the
    mask with nearest neighbour (so it stays a clean label map); outside the frame both are
    mirrored (``reflect``), which continues a lattice plausibly rather than padding it with a
    constant the network would learn to recognise. ``scale`` > 1 samples a larger field of view
    (the content shrinks: a coarser pixel size), < 1 a smaller one.

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
    matrix = scale * rotation @ np.diag([1.0, -1.0 if flip else 1.0])
    half = (crop - 1) / 2.0
    offset = np.asarray(centre, float) - matrix @ np.array([half, half])
    x = ndimage.affine_transform(image.astype(np.float32, copy=False), matrix, offset=offset, output_shape=(crop, crop),
                                 order=1, mode="reflect")
    y = ndimage.affine_transform(mask.astype(np.uint8, copy=False), matrix, offset=offset, output_shape=(crop, crop),
                                 order=0, mode="reflect")
    return x, y


def random_rotation_crop(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, crop: int,
                         scale_jitter: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """`rotate_crop` with a uniform angle in [0°, 360°), a random left–right flip and a random
    centre at which an unrotated crop would fit (the image centre when the crop is as large as
    the image; the rotated corners then come from the mirrored surroundings). ``scale_jitter``
    j > 0 also rescales by a factor log-uniform in [1/(1+j), 1+j] (pixel-size uncertainty).

    Examples
    --------
    >>> x, y = random_rotation_crop(np.random.default_rng(0), np.ones((96, 96)), np.ones((96, 96), bool), 64, 0.2)
    >>> x.shape, y.shape
    ((64, 64), (64, 64))
    """
    # the order of the draws is part of every recorded run: without jitter centre, angle, flip (as
    # before jitter existed); with it scale, angle, flip, centre (as the recipe's runs drew them)
    jitter = np.log1p(scale_jitter) if scale_jitter > 0 else None
    scale, angle, flip = 1.0, None, False
    if jitter is not None:
        scale = float(np.exp(rng.uniform(-jitter, jitter)))
        angle, flip = float(rng.uniform(0.0, 360.0)), bool(rng.integers(2))
    h, w = image.shape
    lo_r, hi_r = sorted((min(crop / 2, h / 2), max(h - crop / 2, h / 2)))
    lo_c, hi_c = sorted((min(crop / 2, w / 2), max(w - crop / 2, w / 2)))
    centre = (float(rng.uniform(lo_r, hi_r)) - 0.5, float(rng.uniform(lo_c, hi_c)) - 0.5)
    if angle is None:
        angle, flip = float(rng.uniform(0.0, 360.0)), bool(rng.integers(2))
    return rotate_crop(image, mask, angle_deg=angle, flip=flip, centre=centre, crop=crop, scale=scale)


def random_intensity(rng: np.random.Generator, crop: np.ndarray) -> np.ndarray:
    """Photometric domain randomisation of one normalised training crop, so the net cannot key on
    contrast amplitude or grey-level distribution instead of lattice structure: with independent
    probabilities a gamma curve (0.6–1.6), an illumination gradient (up to ±0.5 σ across the
    crop), Gaussian blur (σ 0.3–1.2 px: defocus spread, resampling), additive white noise (up to
    0.6 σ: dose) and display clipping at ±2.5–4 σ. The result is mapped back to the crop's own
    mean and standard deviation, so it stays in the range the profile's normalisation produces.

    Examples
    --------
    >>> x = np.random.default_rng(0).normal(3.0, 2.0, (64, 64)).astype(np.float32)
    >>> y = random_intensity(np.random.default_rng(1), x)
    >>> y.dtype, bool(abs(y.mean() - x.mean()) < 1e-3 and abs(y.std() - x.std()) < 1e-3)
    (dtype('float32'), True)
    """
    x = crop.astype(np.float64)
    mean, sigma = x.mean(), x.std()
    if sigma <= 0:
        return crop
    z = (x - mean) / sigma
    if rng.random() < 0.5:  # gamma on the 0–1 range of the crop
        lo, hi = z.min(), z.max()
        z = ((z - lo) / max(hi - lo, 1e-9)) ** float(np.exp(rng.uniform(np.log(0.6), np.log(1.6))))
    if rng.random() < 0.3:  # illumination / thickness gradient
        h, w = z.shape
        a = rng.uniform(0, 2 * np.pi)
        ramp = np.cos(a) * (np.arange(h)[:, None] / h - 0.5) + np.sin(a) * (np.arange(w)[None, :] / w - 0.5)
        z = z + rng.uniform(0, 1.0) * z.std() * ramp
    if rng.random() < 0.3:
        z = ndimage.gaussian_filter(z, rng.uniform(0.3, 1.2))
    if rng.random() < 0.5:
        z = z + rng.normal(0.0, rng.uniform(0.0, 0.6) * z.std(), z.shape)
    z = (z - z.mean()) / max(z.std(), 1e-9)
    if rng.random() < 0.3:  # display pipeline: clipped at a few σ
        k = rng.uniform(2.5, 4.0)
        z = np.clip(z, -k, k)
        z = (z - z.mean()) / max(z.std(), 1e-9)
    return (mean + sigma * z).astype(np.float32)
