"""Score a profile's region classifier, whatever its kind, on a labelled crops index.

`train-classifier` scores the classifier it trains on the test images of its own split; this scores
a shipped or trained profile on any crops index — a data set simulated with another seed, or the
training set's test images (``test_split``) so that the paper's forest and the CNN are compared on
the same particles. Probabilities come from the files the daemon loads (the forest's flattened
arrays, the CNN's ONNX through ONNX Runtime), from crops preprocessed as in training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from latticewatch.errors import ConfigError
from latticewatch.frame import CLASSES
from latticewatch.models.manifest import Manifest
from latticewatch.training.assess.classifier_metrics import classification_metrics, condition_tables, predicted_labels
from latticewatch.training.assess.defect_series import SeriesSpec, defect_series


@dataclass(frozen=True)
class CropScores:
    """Class probabilities (columns in `CLASSES` order) of the crops of an index, with their truth."""

    y: np.ndarray
    probabilities: np.ndarray
    groups: np.ndarray
    conditions: list[dict[str, Any]]
    skipped: tuple[str, ...]


def _in_class_order(proba: np.ndarray, classes: tuple[str, ...]) -> np.ndarray:
    if set(classes) != set(CLASSES):
        raise ConfigError(f"the classifier's classes {classes} are not {CLASSES}; crops cannot be scored")
    return proba[:, [classes.index(c) for c in CLASSES]]


def score_crops(directory: Path, manifest: Manifest, index: Path, *, threads: int | None = None,
                progress: bool = False) -> CropScores:
    """Probabilities of the profile's classifier for every usable crop of ``index``.

    >>> scores = score_crops(profile_dir, read_manifest(profile_dir), Path("sim/crops/index.csv"))  # doctest: +SKIP
    >>> scores.probabilities.shape  # doctest: +SKIP
    (812, 5)
    """
    from latticewatch.models.backends.onnxruntime import OnnxRuntimeBackend
    from latticewatch.stages.classify import FlatForest
    from latticewatch.training.assess.classifier_metrics import particle_conditions
    from latticewatch.training.fit.classifier import crops_dataset, features_from_index
    from latticewatch.training.fit.cnn_classifier import crop_input, crops_from_index

    section = manifest.classifier
    if section is None:
        raise ConfigError(f"{directory}: the profile has no classifier")
    if section.kind == "cnn":
        crops = crops_from_index(index, manifest, progress=progress)
        backend = OnnxRuntimeBackend(directory / section.onnx, threads=threads)
        proba = np.concatenate([backend.predict(np.stack([crop_input(crops, i, section.input)
                                                          for i in range(start, min(start + 64, len(crops.y)))]))
                                for start in range(0, len(crops.y), 64)])
        return CropScores(crops.y, _in_class_order(proba, section.classes), crops.groups, crops.conditions,
                          tuple(crops.skipped))
    features = features_from_index(index, manifest, progress=progress)
    if not section.arrays:
        raise ConfigError(f"{directory}: the forest has no flattened arrays; run `latticewatch models flatten-forest`")
    flat = FlatForest.load(directory / section.arrays)
    proba = np.zeros((len(features.y), len(section.classes)))
    proba[:, [int(c) for c in flat.classes_]] = flat.predict_proba(features.X)
    dataset = crops_dataset(index)
    conditions = [particle_conditions(dataset, g, int(i)) for g, i in zip(features.groups, features.instances)]
    return CropScores(features.y, _in_class_order(proba, section.classes), features.groups, conditions,
                      tuple(features.skipped))


def test_rows(scores: CropScores, test_fraction: float, seed: int) -> np.ndarray:
    """The rows of the test images of `train-classifier`'s split (same fraction and seed)."""
    from latticewatch.training.fit.classifier import split_by_image

    return split_by_image(scores.y, scores.groups, test_fraction, seed)[1]


def evaluate_classifier(scores: CropScores, manifest: Manifest, rows: np.ndarray | None = None) -> dict[str, Any]:
    """Scores, per-condition tables and the defect-fraction series of the crops ``rows`` (default: all).

    The profile's own ``uncertain_below`` and ``defect_confusion`` are used as the daemon uses them.
    """
    rows = np.arange(len(scores.y)) if rows is None else rows
    section = manifest.classifier
    y, proba = scores.y[rows], scores.probabilities[rows]
    threshold = section.uncertain_below
    result: dict[str, Any] = {
        "kind": section.kind,
        "n_crops": int(rows.size),
        "n_images": int(np.unique(scores.groups[rows]).size),
        "metrics": classification_metrics(y, proba, threshold),
        "tables": condition_tables(y, proba, threshold, [scores.conditions[i] for i in rows]),
    }
    try:
        result["defect_series"] = defect_series(y, predicted_labels(proba, threshold), section.defect_confusion,
                                                SeriesSpec())
    except ValueError as err:
        result["defect_series"] = {"skipped": str(err)}
    return result
