"""Write the demo's labelled frames from a ``latticewatch simulate`` output folder.

Usage (from the repository root)::

    latticewatch simulate --n 20 --out sim-holdout --size 320 --pixel-size-nm 0.04 0.05 --particle-size-nm 2 8 \
        --particles-per-image 1 3 --max-sim-sampling 0.25 --seed 2 --workers 1
    python examples/make_demo_frames.py sim-holdout daemon/latticewatch/testing/demo_frames

Each selected image (`INDICES`) becomes a 16-bit TIFF (the electron counts rounded, deflate with
the horizontal predictor, the pixel size in the resolution tags); its mask PNG and its particle
JSON are copied as they are. The frames' README.md is written by hand, not by this script.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import mrcfile
import numpy as np
import tifffile

#: The first eleven images of the hold-out and its only frame without particles (17); no image was
#: picked for its score.
INDICES = (*range(11), 17)


def write_frame(sim: Path, out: Path, index: int) -> None:
    """Convert image ``index`` of the simulated set ``sim`` into ``out`` (images/, labels/, particles/)."""
    stem = f"sim_{index:06d}"
    with mrcfile.open(sim / "images" / f"{stem}.mrc", permissive=True) as mrc:
        counts = np.asarray(mrc.data, dtype=np.float64)
        pixel_size_nm = float(mrc.voxel_size.x) / 10  # Å → nm
    pixels = np.clip(np.rint(counts), 0, np.iinfo(np.uint16).max).astype(np.uint16)
    per_cm = 1e7 / pixel_size_nm
    tifffile.imwrite(out / "images" / f"{stem}.tif", pixels, photometric="minisblack", compression="zlib",
                     compressionargs={"level": 9}, predictor=2, resolution=(per_cm, per_cm),
                     resolutionunit="CENTIMETER")
    shutil.copyfile(sim / "labels" / f"{stem}.png", out / "labels" / f"{stem}.png")
    shutil.copyfile(sim / "particles" / f"{stem}.json", out / "particles" / f"{stem}.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sim", type=Path, help="output folder of latticewatch simulate (images/, labels/, particles/)")
    parser.add_argument("out", type=Path, help="where the demo frames go")
    args = parser.parse_args()
    for folder in ("images", "labels", "particles"):
        (args.out / folder).mkdir(parents=True, exist_ok=True)
    for index in INDICES:
        write_frame(args.sim, args.out, index)


if __name__ == "__main__":
    main()
