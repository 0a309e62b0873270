"""Train a profile's stacking-fault forest on region crops (Groschner et al. 2021).

Crops come from a crops index written by ``latticewatch simulate`` (``DIR/crops/index.csv``)
or from the analytic generator. Each crop is preprocessed with the profile's own preprocessing
(resampled to its pixel size, median, normalisation), cut to its region's bounding box — the
crop the analyser hands to the features stage — and described by the paper's five features.
The forest (500 trees, Gini, balanced class weights) is trained on the crops of some source
images and tested on the crops of the others: crops of one micrograph never straddle the
split, since they share dose, focus and carbon and would flatter the score.

Crops are normalised on their own (as ``train`` does for synthetic regions), not with the
whole frame's maximum; the analyser normalises the frame. For ``max`` normalisation that
scales ``real_mean``/``real_std`` by the ratio of crop to frame maximum — close to one where
the frame's brightest pixels are carbon around the particle, as usual.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from latticewatch.errors import ConfigError, InputError
from latticewatch.frame import CLASSES
from latticewatch.models.manifest import (
    Manifest,
    read_manifest,
    relative_path,
    sha256_of,
    update_manifest,
    write_manifest,
)
from latticewatch.stages.features import FEATURE_NAMES, FFT_SIZE, region_features
from latticewatch.stages.preprocess import Normalisation, preprocess
from latticewatch.training.assess.classifier_metrics import defect_confusion

log = logging.getLogger(__name__)
T = TypeVar("T")

INDEX_COLUMNS = ("crop", "mask", "class", "image", "instance", "pixel_size_nm")


class CropIndexError(InputError):
    """A crops index that cannot be used; the message names the file, row and column."""


class CropRow(BaseModel):
    """One row of ``crops/index.csv``: a region crop (MRC) with its mask (PNG) and class."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    crop: str = Field(description="MRC file of the crop, relative to the index")
    mask: str = Field(description="PNG mask of the region (non-zero = region), relative to the index")
    label: str = Field(alias="class", description="one of latticewatch.frame.CLASSES")
    image: str = Field(description="source micrograph: crops of one image stay on one side of the split")
    instance: int = Field(ge=0)
    pixel_size_nm: float | None = Field(None, gt=0, description="crop sampling; empty = take it from the MRC header")

    @field_validator("label")
    @classmethod
    def _known_class(cls, value: str) -> str:
        if value not in CLASSES:
            raise ValueError(f"class {value!r} is not one of {', '.join(CLASSES)}")
        return value

    @field_validator("pixel_size_nm", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value in ("", None) else value


def read_crop_index(path: Path) -> list[CropRow]:
    """Validate every row of a crops index; errors name the file, the row and the column.

    Examples
    --------
    >>> rows = read_crop_index(Path("sim/crops/index.csv"))  # doctest: +SKIP
    >>> rows[0].label, rows[0].image  # doctest: +SKIP
    ('stacking_fault', 'images/frame_0000.mrc')
    """
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in INDEX_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise CropIndexError(f"{path}: missing column(s) {', '.join(missing)}; "
                                     f"expected {', '.join(INDEX_COLUMNS)}")
            rows = []
            for line, record in enumerate(reader, start=2):
                try:
                    rows.append(CropRow.model_validate({k: record[k] for k in INDEX_COLUMNS}))
                except ValidationError as err:
                    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
                    raise CropIndexError(f"{path}, line {line}: {problems}") from None
    except FileNotFoundError:
        raise CropIndexError(f"{path}: crops index not found") from None
    if not rows:
        raise CropIndexError(f"{path}: no crops listed")
    return rows


def feature_normalisation(manifest: Manifest) -> Normalisation:
    """How a profile's forest sees intensities: as its manifest says, else ``max`` (Groschner et al.), whatever
    normalisation the segmentation network uses."""
    clf = manifest.classifier
    return clf.normalisation if clf and clf.kind == "forest" else "max"


def crop_features(pixels: np.ndarray, mask: np.ndarray, pixel_size_nm: float | None,
                  manifest: Manifest) -> dict[str, float]:
    """The five features of one region crop, preprocessed as the profile's analyser would.

    Examples
    --------
    >>> from latticewatch.testing.synthetic.frames import generate_region
    >>> from latticewatch.models.manifest import read_manifest
    >>> from latticewatch_nanoparticles import profile_dir
    >>> crop = generate_region(np.random.default_rng(0), "misoriented", size_px=96)
    >>> sorted(crop_features(crop.image, crop.mask > 0, 0.05, read_manifest(profile_dir)))
    ['fft_com', 'fft_mean', 'fft_std', 'real_mean', 'real_std']
    """
    from latticewatch.training.assess.evaluate import resize_nearest

    seg = manifest.segmentation
    pre = preprocess(pixels, pixel_size_nm, normalisation=feature_normalisation(manifest),
                     model_pixel_size_nm=seg.pixel_size_nm)
    region = resize_nearest(np.asarray(mask, bool), pre.image.shape)
    rows, cols = np.nonzero(region)
    if rows.size == 0:
        raise InputError("the region mask is empty at the model's pixel size")
    box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    return region_features(pre.image[box], region[box], pre.pixel_size_nm)


@dataclass
class FeatureSet:
    X: np.ndarray  # (n, 5) in FEATURE_NAMES order
    y: np.ndarray  # class indices into CLASSES
    groups: np.ndarray  # source image of each row
    skipped: list[str]
    source: str = ""  # where the crops came from, as the manifest's ``data`` records it
    instances: np.ndarray | None = None  # the crop's instance in its source image (index rows only)


def crops_dataset(index: Path) -> Path:
    """The data set a crops index belongs to: ``simulate`` writes ``DIR/crops/index.csv``, so ``DIR``."""
    index = Path(index)
    return index.parent.parent if index.parent.name == "crops" else index.parent


def read_index_crops(index: Path, describe: Callable[[np.ndarray, np.ndarray, float | None], T], *,
                     progress: bool = False) -> tuple[list[tuple[CropRow, T]], list[str]]:
    """``describe(pixels, mask, pixel_size_nm)`` of every crop of ``index``, with its row; a crop that cannot
    be read or described is skipped and named with its problem (the second list). Raises `CropIndexError`
    when none could be used. The one loop over a crops index, for the forest's features and the CNN's crops.
    """
    from tqdm import tqdm

    from latticewatch.io.readers import ReadError, read_frames
    from latticewatch.training.data.labelled import LabelledDataError, read_mask

    index = Path(index)
    rows = read_crop_index(index)
    described, skipped = [], []
    for row in tqdm(rows, desc="crops", unit="crop", disable=not progress):
        crop_path, mask_path = index.parent / row.crop, index.parent / row.mask
        try:
            frame = next(iter(read_frames(crop_path)))
            mask = read_mask(mask_path)
            if mask.shape != frame.pixels.shape:
                raise InputError(f"mask {mask_path} is {mask.shape}, crop is {frame.pixels.shape}")
            described.append((row, describe(frame.pixels, mask, row.pixel_size_nm or frame.pixel_size_nm)))
        except (ReadError, OSError, StopIteration, LabelledDataError, ValueError) as err:  # InputError included
            skipped.append(f"{crop_path}: {err}")
    if not described:
        raise CropIndexError(f"{index}: none of the {len(rows)} crops could be used; first problem: {skipped[0]}")
    return described, skipped


def features_from_index(index: Path, manifest: Manifest, *, progress: bool = False) -> FeatureSet:
    """Features of every crop listed in ``index``; unreadable crops are skipped and listed."""
    described, skipped = read_index_crops(
        index, lambda pixels, mask, px: crop_features(pixels, mask, px, manifest), progress=progress)
    return FeatureSet(np.array([[feats[f] for f in FEATURE_NAMES] for _, feats in described]),
                      np.array([CLASSES.index(row.label) for row, _ in described]),
                      np.array([row.image for row, _ in described]), skipped,
                      f"crops index {relative_path(index, crops_dataset(index))}",
                      np.array([row.instance for row, _ in described]))


def synthetic_features(n_per_class: int, seed: int, manifest: Manifest, *, progress: bool = False) -> FeatureSet:
    """Features of ``n_per_class`` analytic region crops per class, each its own source image."""
    from tqdm import tqdm

    from latticewatch.testing.synthetic.frames import generate_region

    rng = np.random.default_rng(seed)
    pixel_size = manifest.segmentation.pixel_size_nm or 0.05
    X, y, groups = [], [], []
    jobs = [name for name in CLASSES for _ in range(n_per_class)]
    for i, name in enumerate(tqdm(jobs, desc="synthetic regions", unit="region", disable=not progress)):
        sample = generate_region(rng, name, size_px=FFT_SIZE, pixel_size_nm=pixel_size)
        feats = crop_features(sample.image, sample.mask > 0, pixel_size, manifest)
        X.append([feats[f] for f in FEATURE_NAMES])
        y.append(CLASSES.index(name))
        groups.append(f"synthetic_{i:05d}")
    return FeatureSet(np.array(X), np.array(y), np.array(groups), [],
                      f"analytic generator, {n_per_class} regions per class, seed {seed}")


def split_by_image(y: np.ndarray, groups: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and test row indices with no source image on both sides, classes stratified.

    The test set is one fold of ``round(1 / test_fraction)`` stratified group folds.

    >>> y = np.array([0, 0, 1, 1, 0, 1, 0, 1, 0, 1])
    >>> g = np.array(["a", "a", "b", "b", "c", "c", "d", "d", "e", "e"])
    >>> train, test = split_by_image(y, g, 0.2, seed=0)
    >>> set(g[train]).isdisjoint(g[test]), len(test)
    (True, 2)
    """
    from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold

    if not 0 < test_fraction < 1:
        raise ConfigError(f"test fraction must lie between 0 and 1, got {test_fraction}")
    n_groups = len(set(groups.tolist()))
    if n_groups < 2:
        raise InputError(f"all crops come from one image ({groups[0]}): cannot hold out a test image")
    k = max(2, min(n_groups, int(round(1 / test_fraction))))
    try:
        folds = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        train, test = next(folds.split(np.zeros(len(y)), y, groups))
    except ValueError:  # fewer members of a class than folds: plain group split
        shuffle = GroupShuffleSplit(n_splits=1, test_size=test_fraction, random_state=seed)
        train, test = next(shuffle.split(np.zeros(len(y)), y, groups))
    return np.sort(train), np.sort(test)


@dataclass(frozen=True)
class ClassifierResult:
    manifest: Manifest
    metrics: dict[str, Any]
    skipped: tuple[str, ...]


def train_classifier(
    out: Path,
    features: FeatureSet,
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    command: str = "",
) -> ClassifierResult:
    """Train the forest on the training images' crops, test it on the others, write it into ``out``.

    ``out`` must be a profile directory (its segmentation stays as it is). The forest is saved
    with skops (deflate-compressed, the training artefact) and as flattened arrays (safetensors,
    what inference loads); the manifest's ``classifier`` section (``kind = "forest"``, the
    held-out stacking-fault confusion), ``files`` sha256 and ``training["classifier"]`` (balanced
    accuracy, confusion matrix on the held-out images, this command, the features' source) are
    updated; every file is replaced atomically.

    Examples
    --------
    >>> fs = synthetic_features(40, 0, read_manifest(Path("profiles/np")))  # doctest: +SKIP
    >>> train_classifier(Path("profiles/np"), fs).metrics["balanced_accuracy"]  # doctest: +SKIP
    0.62
    """
    from latticewatch.training.fit.forest import FOREST_ARRAYS, FOREST_SKOPS, forest_files, forest_metrics, train_forest

    out = Path(out)
    manifest = read_manifest(out)  # refuses a directory that is not a verified profile
    train, test = split_by_image(features.y, features.groups, test_fraction, seed)
    absent = [CLASSES[c] for c in sorted(set(features.y[test].tolist()) - set(features.y[train].tolist()))]
    if absent:
        log.warning("classes %s occur only in the test images; the forest cannot predict them", absent)
    forest = train_forest(features.X[train], features.y[train], seed=seed)
    predicted = forest.predict(features.X[test])
    metrics = forest_metrics(features.y[test], predicted)
    confusion = defect_confusion(features.y[test], predicted, features.source)
    metrics.update(_split_summary(features, train, test, test_fraction, seed))
    forest.n_jobs = 1  # inference runs single-threaded inside the pipeline
    old = manifest.classifier if manifest.classifier and manifest.classifier.kind == "forest" else None
    skops, arrays = (old.skops or FOREST_SKOPS, old.arrays or FOREST_ARRAYS) if old else (FOREST_SKOPS, FOREST_ARRAYS)

    def change(m: dict[str, Any]) -> None:
        m["files"].update(digests)
        m["classifier"] = {"kind": "forest", "arrays": arrays, "skops": skops, "classes": list(CLASSES),
                           "features": list(FEATURE_NAMES), "normalisation": feature_normalisation(manifest),
                           "defect_confusion": None if confusion is None else confusion.model_dump(mode="json")}
        m["training"]["classifier"] = {"command": command, "data": features.source, "metrics": metrics}

    with forest_files(out, forest, skops=skops, arrays=arrays) as digests:
        # an update that would be invalid raises here, before the forest replaces the old one
        updated = update_manifest(out, change, dry_run=True)
    write_manifest(out, updated)
    return ClassifierResult(updated, metrics, tuple(features.skipped))


def write_forest_arrays(directory: Path) -> Manifest:
    """Add the flattened arrays to a profile whose forest exists only as skops (profiles before the arrays).

    The arrays are checked to give scikit-learn's probabilities bit for bit; the manifest gains
    ``classifier.arrays`` and its sha256, nothing else changes.

    Examples
    --------
    >>> write_forest_arrays(Path("profiles/np")).classifier.arrays  # doctest: +SKIP
    'forest.safetensors'
    """
    from latticewatch.io.atomic import atomic_path
    from latticewatch.stages.classify import FlatForest, load_forest
    from latticewatch.training.fit.forest import FOREST_ARRAYS, check_flattened

    directory = Path(directory)
    clf = read_manifest(directory).classifier
    if clf is None or clf.kind != "forest" or clf.skops is None:
        raise ConfigError(f"{directory}: the profile has no skops forest to flatten")
    arrays = clf.arrays or FOREST_ARRAYS
    forest = load_forest(directory / clf.skops)

    def change(m: dict[str, Any]) -> None:
        m["files"][arrays] = digest
        m["classifier"].update(kind="forest", arrays=arrays)

    with atomic_path(directory / arrays) as tmp:
        FlatForest.from_sklearn(forest).save(tmp)
        check_flattened(forest, FlatForest.load(tmp))
        digest = sha256_of(tmp)
        updated = update_manifest(directory, change, dry_run=True)
    return write_manifest(directory, updated)


def _split_summary(features: FeatureSet, train: np.ndarray, test: np.ndarray, test_fraction: float,
                   seed: int) -> dict[str, Any]:
    """How the crops were split, for the manifest: sizes, images on each side, class counts."""
    return {
        "n_train": int(train.size),
        "n_images_train": len(set(features.groups[train].tolist())),
        "n_images_test": len(set(features.groups[test].tolist())),
        "test_fraction": test_fraction,
        "seed": seed,
        "train_class_counts": {CLASSES[c]: int(n) for c, n in zip(*np.unique(features.y[train], return_counts=True))},
        "features": list(FEATURE_NAMES),
        "split": "by source image (stratified group folds)",
    }


__all__ = ["CropRow", "FeatureSet", "crop_features", "features_from_index", "read_crop_index",
           "split_by_image", "synthetic_features", "train_classifier", "write_forest_arrays"]
