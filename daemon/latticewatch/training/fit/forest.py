"""Random-forest training on region features (Groschner et al. 2021: 500 trees, Gini), and the forest's
two files: the skops training artefact and the flattened arrays inference loads."""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import skops.io as sio
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import balanced_accuracy_score, confusion_matrix
from tqdm import tqdm

from latticewatch.frame import CLASSES
from latticewatch.io.atomic import atomic_path
from latticewatch.models.manifest import sha256_of
from latticewatch.stages.classify import FlatForest, load_forest
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


def forest_metrics(y: np.ndarray, predicted: np.ndarray) -> dict:
    """Balanced accuracy and confusion matrix (rows: true class) of a forest's ``predicted`` classes on a test set.

    >>> forest_metrics(y_test, train_forest(X, y).predict(X_test))["balanced_accuracy"]  # doctest: +SKIP
    0.62
    """
    return {
        "balanced_accuracy": float(balanced_accuracy_score(y, predicted)),
        "confusion_matrix": confusion_matrix(y, predicted, labels=list(range(len(CLASSES)))).tolist(),
        "classes": list(CLASSES),
        "n_test": int(len(y)),
    }


#: File names of a profile's forest: the scikit-learn artefact and the flattened arrays.
FOREST_SKOPS, FOREST_ARRAYS = "forest.skops", "forest.safetensors"


def check_flattened(forest: RandomForestClassifier, flat: FlatForest, *, seed: int = 0) -> None:
    """Raise ``ValueError`` unless ``flat`` gives ``forest``'s probabilities bit for bit on random features."""
    probe = np.random.default_rng(seed).normal(size=(256, forest.n_features_in_)) * 10
    if not np.array_equal(flat.predict_proba(probe), forest.predict_proba(probe)):
        raise ValueError("the flattened forest's probabilities differ from scikit-learn's")


@contextmanager
def forest_files(directory: Path, forest: RandomForestClassifier, *, skops: str = FOREST_SKOPS,
                 arrays: str = FOREST_ARRAYS) -> Iterator[dict[str, str]]:
    """Write ``forest`` as ``skops`` and ``arrays`` in ``directory``; yields their sha256 by name.

    Both files are temporary inside the block and replace the old ones only when it ends without
    an error, so a caller can validate the manifest that will list them first. Each is read back
    as the pipeline reads it, and the arrays must give scikit-learn's probabilities exactly.

    Examples
    --------
    >>> with forest_files(Path("profiles/np"), train_forest(X, y)) as digests:  # doctest: +SKIP
    ...     sorted(digests)
    ['forest.safetensors', 'forest.skops']
    """
    directory = Path(directory)
    with atomic_path(directory / skops) as skops_tmp, atomic_path(directory / arrays) as arrays_tmp:
        # 500 full-depth trees are tens of MB raw; deflate brings them to a few MB
        sio.dump(forest, skops_tmp, compression=zipfile.ZIP_DEFLATED, compresslevel=9)
        load_forest(skops_tmp)  # what we ship must load with the types we trust
        FlatForest.from_sklearn(forest).save(arrays_tmp)
        check_flattened(forest, FlatForest.load(arrays_tmp))
        yield {skops: sha256_of(skops_tmp), arrays: sha256_of(arrays_tmp)}
