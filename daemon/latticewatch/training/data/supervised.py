"""Labelled micrographs made model-ready: preprocessed exactly as the analyser will preprocess
frames, masks resampled alongside, validation splits that keep each series on one side, and
train-only extra images (`ExtraData`: simulated or analytic frames mixed into the training crops).

Used by ``latticewatch train --images`` and ``latticewatch cross-validate``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from latticewatch.models.manifest import relative_path
from latticewatch.stages.preprocess import Normalisation, preprocess, resample
from latticewatch.training.data.augment import synthetic_segmentation_set
from latticewatch.training.data.labelled import (
    LabelledDataError,
    LabelledImage,
    group_folds,
    load_labelled,
    series_of,
)

log = logging.getLogger(__name__)

#: Pixel sizes within this relative spread count as one sampling.
PIXEL_SIZE_RTOL = 0.01


@dataclass(frozen=True)
class PreparedSet:
    """Preprocessed images (float32, at the model's sampling) and their boolean masks."""

    names: list[str]
    images: list[np.ndarray]
    masks: list[np.ndarray]
    pixel_size_nm: float | None

    def subset(self, names: Sequence[str]) -> "PreparedSet":
        """The images of ``names``, in that order."""
        index = {n: i for i, n in enumerate(self.names)}
        keep = [index[n] for n in names]
        return PreparedSet([self.names[i] for i in keep], [self.images[i] for i in keep],
                           [self.masks[i] for i in keep], self.pixel_size_nm)

    @property
    def n_pixels(self) -> int:
        return int(sum(m.size for m in self.masks))

    @property
    def foreground_fraction(self) -> float:
        return float(sum(int(m.sum()) for m in self.masks)) / max(1, self.n_pixels)


def resolve_pixel_size(data: Sequence[LabelledImage], requested: float | str | None) -> float | None:
    """The model's pixel size: ``requested`` (a number, or ``"none"`` for no resampling), else the
    images' own when they state one.

    Raises
    ------
    LabelledDataError
        When some images state a pixel size and others do not, or their sizes differ, and no
        size was requested: the model sampling would be a guess.

    Examples
    --------
    >>> resolve_pixel_size([], "none") is None, resolve_pixel_size([], 0.05)
    (True, 0.05)
    """
    if isinstance(requested, str):
        if requested.lower() != "none":
            raise LabelledDataError(f"pixel size must be a number of nm or 'none', got {requested!r}")
        return None
    if requested is not None:
        if requested <= 0:
            raise LabelledDataError(f"pixel size must be positive, got {requested}")
        return float(requested)
    known = [d.pixel_size_nm for d in data if d.pixel_size_nm]
    if not known:
        return None
    if len(known) != len(data):
        missing = [d.name for d in data if not d.pixel_size_nm][:3]
        raise LabelledDataError(f"{len(data) - len(known)} image(s) state no pixel size (e.g. {', '.join(missing)}) "
                                f"while {len(known)} do; pass --pixel-size-nm X (resample all known ones to X) or "
                                "--pixel-size-nm none")
    lo, hi = min(known), max(known)
    if hi > lo * (1 + PIXEL_SIZE_RTOL):
        raise LabelledDataError(f"images are sampled at {lo:.4g}–{hi:.4g} nm/px; pass --pixel-size-nm X to train at "
                                "X nm/px")
    return float(np.median(known))


def prepare_labelled(data: Sequence[LabelledImage], *, normalisation: Normalisation,
                     pixel_size_nm: float | None) -> PreparedSet:
    """Preprocess every image as `Analyser.prepare` would (resample when both pixel sizes are
    known, 3×3 median, normalise) and resample its mask with the same geometry (area fraction
    ≥ ½ after the same resampling), so image and mask stay aligned.

    Examples
    --------
    >>> item = LabelledImage("a", np.ones((64, 64), np.uint16), np.eye(64, dtype=bool), 0.025)
    >>> s = prepare_labelled([item], normalisation="max", pixel_size_nm=0.05)
    >>> s.images[0].shape == s.masks[0].shape == (32, 32)
    True
    """
    images, masks = [], []
    for item in data:
        pre = preprocess(item.pixels, item.pixel_size_nm, normalisation=normalisation,
                         model_pixel_size_nm=pixel_size_nm)
        mask = item.mask
        if pre.scale != 1.0:
            mask = resample(mask.astype(np.float32), pre.scale) >= 0.5
        if mask.shape != pre.image.shape:  # cannot happen with one resampler; guard the invariant anyway
            raise LabelledDataError(f"{item.name}: resampled mask {mask.shape} differs from image {pre.image.shape}")
        images.append(pre.image)
        masks.append(np.asarray(mask, bool))
    return PreparedSet([d.name for d in data], images, masks, pixel_size_nm)


@dataclass(frozen=True)
class ExtraData:
    """Train-only images asked for (``--extra-images``/``--extra-labels``, ``--extra-synthetic``):
    mixed into the training crops, never used for validation or as a test fold.

    ``seed`` is the run's; the analytic frames use ``seed + 1000`` (never the training set's own).
    """

    images_dir: Path | None = None
    labels_dir: Path | None = None
    n_synthetic: int = 0
    seed: int = 0


def prepare_extra(extra: ExtraData, *, normalisation: Normalisation, pixel_size_nm: float | None,
                  progress: bool = False) -> tuple[PreparedSet, str]:
    """The images of ``extra``, preprocessed like the training images, and a description of them.

    Labelled images from ``extra.images_dir``/``extra.labels_dir`` (e.g. `latticewatch simulate`
    output) are resampled to the model's pixel size like any labelled set; ``extra.n_synthetic``
    256² frames of the analytic generator are made at that pixel size.

    Raises
    ------
    LabelledDataError
        Analytic frames asked for while the model's pixel size is unknown.

    Examples
    --------
    >>> extra, text = prepare_extra(ExtraData(n_synthetic=2), normalisation="zscore", pixel_size_nm=0.05)
    >>> len(extra.images), extra.images[0].shape, text
    (2, (256, 256), '2 analytic 256² frames (seed 1000)')
    """
    parts: list[str] = []
    prepared = PreparedSet([], [], [], pixel_size_nm)
    if extra.images_dir is not None:
        images_dir = Path(extra.images_dir)
        prepared = prepare_labelled(load_labelled(images_dir, extra.labels_dir), normalisation=normalisation,
                                    pixel_size_nm=pixel_size_nm)
        parts.append(f"{len(prepared.names)} images from {relative_path(images_dir, images_dir.parent)}")
    if extra.n_synthetic:
        if not pixel_size_nm:
            raise LabelledDataError("analytic frames (--extra-synthetic) need a known model pixel size: "
                                    "pass --pixel-size-nm X")
        seed = extra.seed + 1000
        images, masks = synthetic_segmentation_set(extra.n_synthetic, seed, shape=(256, 256),
                                                   pixel_size_nm=pixel_size_nm, normalisation=normalisation,
                                                   progress=progress)
        prepared = PreparedSet(prepared.names + [f"analytic_{i:04d}" for i in range(extra.n_synthetic)],
                               prepared.images + list(images), prepared.masks + [m.astype(bool) for m in masks],
                               pixel_size_nm)
        parts.append(f"{extra.n_synthetic} analytic 256² frames (seed {seed})")
    return prepared, " + ".join(parts)


def validation_split(names: Sequence[str], fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """Hold out about ``fraction`` of the images for validation, whole series at a time.

    Returns ``(train, validation)``; ``fraction == 0`` returns no validation images.

    >>> train, val = validation_split([f"s{i}_layer_{j:04d}" for i in range(10) for j in range(2)], 0.2)
    >>> len(val), {n.split("_")[0] for n in train} & {n.split("_")[0] for n in val}
    (4, set())
    """
    names = sorted(names)
    if fraction <= 0:
        return names, []
    if fraction >= 1:
        raise LabelledDataError(f"validation fraction must be below 1, got {fraction}")
    n_series = len({series_of(n) for n in names})
    k = min(n_series, max(2, round(1 / fraction)))
    if n_series < 2:
        raise LabelledDataError(f"cannot hold out a validation set: all {len(names)} images belong to one series")
    val = group_folds(names, k, seed)[0]
    held = set(val)
    return [n for n in names if n not in held], val
