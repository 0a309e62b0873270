"""Labelled data sets written as real files (PNG, MRC) for the training and cross-validation tests."""

from pathlib import Path

import numpy as np
import pytest


def lattice_with_patches(rng: np.random.Generator, side: int) -> tuple[np.ndarray, np.ndarray]:
    """A small graphene-like frame: a hexagonal lattice (three cosines, period ~5 px) with a few
    amorphous patches (smooth noise, no lattice) as the labelled foreground."""
    yy, xx = np.mgrid[:side, :side].astype(np.float64)
    angle = rng.uniform(0, np.pi / 3)
    lattice = sum(np.cos(2 * np.pi / 5.0 * (xx * np.cos(angle + k * np.pi / 3) + yy * np.sin(angle + k * np.pi / 3)))
                  for k in range(3))
    mask = np.zeros((side, side), bool)
    for _ in range(int(rng.integers(1, 4))):
        cy, cx, r = rng.uniform(0, side), rng.uniform(0, side), rng.uniform(side / 10, side / 4)
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
    from scipy import ndimage

    amorphous = ndimage.gaussian_filter(rng.standard_normal((side, side)), 1.5) * 6
    image = np.where(mask, amorphous, lattice) + 0.3 * rng.standard_normal((side, side))
    return image, mask


def write_labelled(root: Path, n: int, *, fmt: str = "png", side: int = 96, pixel_size_nm: float | None = None,
                   seed: int = 0) -> tuple[Path, Path]:
    """``root/images`` and ``root/labels`` with ``n`` frames, two per series (``sK_layer_000J``)."""
    from PIL import Image

    images, labels = root / "images", root / "labels"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        image, mask = lattice_with_patches(rng, side)
        name = f"s{i // 2:02d}_layer_{i % 2:04d}"
        scaled = ((image - image.min()) / np.ptp(image) * 200 + 20).astype(np.uint8)
        if fmt == "png":
            Image.fromarray(scaled).save(images / f"{name}.png")
        else:
            import mrcfile

            with mrcfile.new(images / f"{name}.mrc") as mrc:
                mrc.set_data(scaled.astype(np.int16) * 10)
                mrc.voxel_size = pixel_size_nm * 10  # Å
        Image.fromarray(mask.astype(np.uint8) * 255).save(labels / f"{name}.png")
    return images, labels


@pytest.fixture
def labelled_png(tmp_path):
    return write_labelled(tmp_path / "png", 12)


@pytest.fixture
def write_labelled_set():
    """``write_labelled_set(root, n, fmt=..., side=..., pixel_size_nm=..., seed=...)``."""
    return write_labelled


@pytest.fixture
def lattice_frame():
    """``lattice_frame(rng, side) -> (image, mask)``."""
    return lattice_with_patches
