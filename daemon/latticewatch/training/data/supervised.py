"""Labelled micrographs made model-ready: preprocessed exactly as the analyser will preprocess
frames, masks resampled alongside, and validation splits that keep each series on one side.

Used by ``latticewatch train --images`` and ``latticewatch cross-validate``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from latticewatch.stages.preprocess import Normalisation, preprocess, resample
from latticewatch.training.data.labelled import LabelledDataError, LabelledImage, group_folds, series_of

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
