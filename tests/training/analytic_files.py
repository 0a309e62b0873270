"""Real files for the evaluation/calibration/classifier tests: analytic frames as MRC (with the
voxel size in the header) and their exact masks as 0/255 PNG, and a writable profile copy."""

import shutil
from pathlib import Path

import mrcfile
import numpy as np
from PIL import Image

from latticewatch.testing.synthetic.frames import generate_frame, generate_region


def write_mrc(path: Path, pixels: np.ndarray, pixel_size_nm: float | None) -> None:
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.asarray(pixels))
        if pixel_size_nm:
            mrc.voxel_size = pixel_size_nm * 10.0  # Å


def write_png_mask(path: Path, mask: np.ndarray) -> None:
    Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255).save(path)


def write_analytic_set(root: Path, n: int, *, side: int, pixel_size_nm: float, seed: int) -> tuple[Path, Path]:
    """``root/images/frame_NNN.mrc`` + ``root/labels/frame_NNN.png`` from `generate_frame`."""
    images, labels = root / "images", root / "labels"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        frame = generate_frame(rng, shape=(side, side), pixel_size_nm=pixel_size_nm, dose_range=(50.0, 200.0))
        write_mrc(images / f"frame_{i:03d}.mrc", frame.image, pixel_size_nm)
        write_png_mask(labels / f"frame_{i:03d}.png", frame.mask)
    return images, labels


def write_crops_index(
    root: Path, n_images: int, *, size_px: int = 128, pixel_size_nm: float = 0.05, seed: int = 0,
) -> Path:
    """``root/crops/index.csv`` in the `latticewatch simulate` layout: each of ``n_images``
    source images contributes one region crop (MRC) + mask (PNG) of every class."""
    from latticewatch.frame import CLASSES

    crops = root / "crops"
    crops.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    rows = ["crop,mask,class,image,instance,pixel_size_nm"]
    for k in range(n_images):
        for instance, label in enumerate(CLASSES, start=1):
            region = generate_region(rng, label, size_px=size_px, pixel_size_nm=pixel_size_nm)
            stem = f"frame_{k:03d}_{instance:02d}"
            write_mrc(crops / f"{stem}.mrc", region.image, pixel_size_nm)
            write_png_mask(crops / f"{stem}_mask.png", region.mask)
            rows.append(f"{stem}.mrc,{stem}_mask.png,{label},images/frame_{k:03d}.mrc,{instance},{pixel_size_nm}")
    index = crops / "index.csv"
    index.write_text("\n".join(rows) + "\n")
    return index


def copy_profile(source: Path, target: Path) -> Path:
    """A writable copy of a profile directory (manifest + the files it lists)."""
    target.mkdir(parents=True)
    for item in source.iterdir():
        if item.is_file() and item.suffix in (".json", ".onnx", ".skops", ".safetensors"):
            shutil.copy2(item, target / item.name)
    return target
