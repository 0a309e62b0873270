"""Training data: synthetic frames turned into model-ready (image, mask) pairs."""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from latticewatch.stages.preprocess import Normalisation, preprocess
from latticewatch.training.synthetic import generate_frame


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
        images[i] = preprocess(sample.image, pixel_size_nm, normalisation=normalisation, model_pixel_size_nm=pixel_size_nm).image
        masks[i] = sample.mask
    return images, masks


def random_dihedral(rng: np.random.Generator, *arrays: np.ndarray) -> list[np.ndarray]:
    """The same random 90° rotation and flip applied to every array (last two axes)."""
    k, flip = int(rng.integers(4)), bool(rng.integers(2))
    out = [np.rot90(a, k, axes=(-2, -1)) for a in arrays]
    return [np.flip(a, -1) if flip else a for a in out]
