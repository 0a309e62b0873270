"""Random-forest training on region features (Groschner et al. 2021: 500 trees, Gini)."""

from __future__ import annotations

import numpy as np
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import balanced_accuracy_score, confusion_matrix
from tqdm import tqdm

from latticewatch.frame import CLASSES
from latticewatch.stages.features import FEATURE_NAMES, FFT_SIZE, region_features
from latticewatch.stages.preprocess import Normalisation, preprocess
from latticewatch.testing.synthetic.frames import generate_region


def synthetic_region_features(
    n_per_class: int,
    seed: int,
    *,
    pixel_size_nm: float = 0.05,
    normalisation: Normalisation = "max",
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Feature matrix (n, 5) and class indices of ``n_per_class`` synthetic regions per class."""
    rng = np.random.default_rng(seed)
    rows, labels = [], []
    jobs = [(index, name) for name in CLASSES for index in [CLASSES.index(name)] for _ in range(n_per_class)]
    for index, name in tqdm(jobs, desc="synthetic regions", disable=not progress, unit="region"):
        # crops as large as the feature FFT, so regions span the full 2–10 nm size range
        sample = generate_region(rng, name, size_px=FFT_SIZE, pixel_size_nm=pixel_size_nm)
        image = preprocess(sample.image, pixel_size_nm, normalisation=normalisation,
                           model_pixel_size_nm=pixel_size_nm).image
        feats = region_features(image, sample.mask.astype(bool), pixel_size_nm)
        rows.append([feats[f] for f in FEATURE_NAMES])
        labels.append(index)
    return np.array(rows), np.array(labels)


def train_forest(X: np.ndarray, y: np.ndarray, *, seed: int = 0, n_trees: int = 500) -> RandomForestClassifier:
    """The paper's forest: ``n_trees`` trees, Gini impurity, classes weighted to balance them."""
    forest = RandomForestClassifier(
        n_estimators=n_trees, criterion="gini", class_weight="balanced", random_state=seed, n_jobs=-1,
        min_samples_leaf=2,
    )
    return forest.fit(X, y)


def forest_metrics(forest: RandomForestClassifier, X: np.ndarray, y: np.ndarray) -> dict:
    """Balanced accuracy and confusion matrix (rows: true class) of ``forest`` on a test set.

    >>> forest_metrics(train_forest(X, y), X_test, y_test)["balanced_accuracy"]  # doctest: +SKIP
    0.62
    """
    predicted = forest.predict(X)
    return {
        "balanced_accuracy": float(balanced_accuracy_score(y, predicted)),
        "confusion_matrix": confusion_matrix(y, predicted, labels=list(range(len(CLASSES)))).tolist(),
        "classes": list(CLASSES),
        "n_test": int(len(y)),
    }
