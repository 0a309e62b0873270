"""Labelled micrographs on disk: an images folder and a labels folder paired by file stem.

Any format ``latticewatch process`` reads is accepted for images (MRC, TIFF, DM, SER, EMD, PNG);
labels are PNG or TIFF masks in which every non-zero pixel is foreground. This is the layout of
``latticewatch simulate`` output (``DIR/images``, ``DIR/labels``) and of the graphene data of
Sadre et al. (``images/``, ``labels/``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from latticewatch.errors import InputError
from latticewatch.io.readers import ReadError, read_frames

LABEL_SUFFIXES = (".png", ".tif", ".tiff")
IMAGE_SUFFIXES = (".mrc", ".mrcs", ".tif", ".tiff", ".png", ".dm3", ".dm4", ".ser", ".emd")

#: Sadre et al.'s graphene images from one focal/time series share a stem up to ``_layer_NNNN``;
#: the sections of a stack (``<stem>#<section>`` in ``evaluate``) are one series too.
_SERIES_SUFFIX = re.compile(r"(_layer_\d+)?(#\d+)?$")


class LabelledDataError(InputError):
    """A labelled data set is unusable; the message names the file and the problem."""


@dataclass(frozen=True)
class LabelledImage:
    name: str
    pixels: np.ndarray
    mask: np.ndarray  # bool, same shape as pixels
    pixel_size_nm: float | None


def series_of(name: str) -> str:
    """The acquisition series an image belongs to: images of one series must share a fold.

    >>> series_of("2014_0601_Gr_FS_Dyna1_01_layer_0007"), series_of("grid1#3")
    ('2014_0601_Gr_FS_Dyna1_01', 'grid1')
    """
    return _SERIES_SUFFIX.sub("", name)


def read_mask(path: Path) -> np.ndarray:
    """A PNG/TIFF label as a bool mask (any non-zero pixel, any non-black colour is foreground).

    Raises `LabelledDataError` naming the file when it cannot be read or is not 2-D.
    """
    try:
        if path.suffix.lower() == ".png":
            from PIL import Image

            with Image.open(path) as img:
                mask = np.asarray(img)
        else:
            import tifffile

            mask = tifffile.imread(path)
    except (OSError, ValueError, SyntaxError) as err:  # PIL reports some corrupt PNGs as SyntaxError
        raise LabelledDataError(f"{path}: unreadable label: {err}") from err
    if mask.ndim == 3:  # an RGB(A) drawing: any non-black colour is foreground
        mask = mask[..., :3].max(axis=-1)
    if mask.ndim != 2:
        raise LabelledDataError(f"{path}: label must be a 2-D mask, got shape {mask.shape}")
    return mask != 0


def labelled_files(images_dir: Path, labels_dir: Path, *,
                   names: list[str] | None = None) -> list[tuple[str, Path, Path]]:
    """``(stem, image, label)`` for every image in ``images_dir`` with its mask in ``labels_dir``, by stem.

    Parameters
    ----------
    names
        Only these stems (e.g. one cross-validation fold); default all images, sorted.

    Raises
    ------
    LabelledDataError
        When a folder is missing, has no images, or an image has no label.

    Examples
    --------
    >>> [stem for stem, _, _ in labelled_files(Path("sim/images"), Path("sim/labels"))][:2]  # doctest: +SKIP
    ['sim_000000', 'sim_000001']
    """
    images_dir, labels_dir = Path(images_dir), Path(labels_dir)
    if not images_dir.is_dir():
        raise LabelledDataError(f"{images_dir}: not a directory of images")
    if not labels_dir.is_dir():
        raise LabelledDataError(f"{labels_dir}: not a directory of labels")
    images = {p.stem: p for p in sorted(images_dir.iterdir())
              if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")}
    labels = {p.stem: p for p in sorted(labels_dir.iterdir())
              if p.suffix.lower() in LABEL_SUFFIXES and not p.name.startswith(".")}
    wanted = sorted(images) if names is None else list(names)
    if not wanted:
        raise LabelledDataError(f"{images_dir}: no images ({', '.join(IMAGE_SUFFIXES)})")
    for name in wanted:
        if name not in images:
            raise LabelledDataError(f"{images_dir}: no image named {name}")
        if name not in labels:
            raise LabelledDataError(f"{images[name]}: no label {name}.png/.tif in {labels_dir}")
    return [(name, images[name], labels[name]) for name in wanted]


def load_labelled(images_dir: Path, labels_dir: Path, *, names: list[str] | None = None) -> list[LabelledImage]:
    """Read every image in ``images_dir`` (its first frame) with its mask from ``labels_dir`` (same stem).

    Parameters
    ----------
    names
        Only these stems (e.g. one cross-validation fold); default all images, sorted by name.

    Raises
    ------
    LabelledDataError
        When the folder has no images, an image has no label, a file cannot be read, or shapes differ.

    Examples
    --------
    >>> data = load_labelled(Path("sim/images"), Path("sim/labels"))  # doctest: +SKIP
    >>> data[0].mask.mean()  # doctest: +SKIP
    """
    out = []
    for name, image, label in labelled_files(images_dir, labels_dir, names=names):
        try:
            frame = next(iter(read_frames(image)))
        except (ReadError, OSError, StopIteration) as err:
            raise LabelledDataError(f"{image}: unreadable image: {err}") from err
        mask = read_mask(label)
        if mask.shape != frame.pixels.shape:
            raise LabelledDataError(f"{label}: mask shape {mask.shape} differs from image shape {frame.pixels.shape}")
        out.append(LabelledImage(name, frame.pixels, mask, frame.pixel_size_nm))
    return out


def group_folds(names: list[str], k: int, seed: int = 0) -> list[list[str]]:
    """Split ``names`` into ``k`` folds so that no acquisition series straddles two folds.

    Series are shuffled with ``seed`` and dealt greedily to the fold with the fewest images,
    so folds are near-equal in size.
    """
    by_series: dict[str, list[str]] = {}
    for name in sorted(names):
        by_series.setdefault(series_of(name), []).append(name)
    if k < 2 or k > len(by_series):
        raise LabelledDataError(f"cannot make {k} folds from {len(by_series)} series")
    order = sorted(by_series)
    np.random.default_rng(seed).shuffle(order)
    order.sort(key=lambda s: -len(by_series[s]))  # big series first keeps the folds balanced
    folds: list[list[str]] = [[] for _ in range(k)]
    for series in order:
        min(folds, key=len).extend(by_series[series])
    return [sorted(f) for f in folds]
