"""Region classification: the Groschner et al. (2021) random forest on five features, or a CNN on crops.

The forest is trained with scikit-learn and stored with skops (never pickle) as the training
artefact. For inference its trees are flattened into a handful of arrays, saved as safetensors,
and all trees × regions are walked together in numpy: loading needs neither scikit-learn nor
skops (importing them and ``skops.io.load`` took ~10 s of every cold start), and the walk costs
~2 ms per frame for 500 trees where scikit-learn's per-tree loop costs ~45 ms, with identical
probabilities.

The CNN sees each region's crop (`latticewatch.stages.crops.classifier_input`); all regions of a
frame go through its backend in one batch. Both classifiers label a particle whose largest class
probability is below ``uncertain_below`` as `latticewatch.frame.UNCERTAIN`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from latticewatch.errors import ModelError
from latticewatch.frame import UNCERTAIN
from latticewatch.stages.crops import CropSpec, labelled_inputs
from latticewatch.stages.features import FEATURE_NAMES
from latticewatch.stages.isolate import IsolatedRegion

#: A region's label and its probability per class.
Verdict = tuple[str, dict[str, float]]

#: The only types a latticewatch forest file may contain; skops refuses anything else.
TRUSTED_SKOPS_TYPES = [
    "sklearn.ensemble._forest.RandomForestClassifier",
    "sklearn.tree._classes.DecisionTreeClassifier",
    "sklearn.tree._tree.Tree",
    "numpy.dtype",
    "numpy.ndarray",
]

#: ``format`` in the metadata of a flattened forest's safetensors file.
FLAT_FOREST_FORMAT = "latticewatch.flat_forest/1"
_ARRAYS = ("roots", "feature", "threshold", "left", "right", "leaf", "leaf_proba", "classes", "n_features")


def load_forest(path: str | os.PathLike):
    """Load a skops forest, allowing only the types a random forest needs (training and inspection only).

    >>> forest = load_forest("profiles/np/forest.skops")  # doctest: +SKIP
    >>> forest.n_estimators  # doctest: +SKIP
    500
    """
    import skops.io as sio
    from sklearn.ensemble import RandomForestClassifier

    untrusted = set(sio.get_untrusted_types(file=path)) - set(TRUSTED_SKOPS_TYPES)
    if untrusted:
        raise ValueError(f"{path}: forest file contains unexpected types {sorted(untrusted)}; refusing to load it")
    forest = sio.load(path, trusted=TRUSTED_SKOPS_TYPES)
    if not isinstance(forest, RandomForestClassifier):
        raise ValueError(f"{path}: holds a {type(forest).__name__}, not a RandomForestClassifier")
    return forest


class FlatForest:
    """A random forest as flat arrays, evaluated vectorised.

    All trees share one set of node arrays: ``left``/``right`` are global node indices (-1 at a
    leaf), ``leaf`` a leaf's row in ``leaf_proba`` (-1 at a split), ``roots`` each tree's first node.

    Examples
    --------
    >>> from sklearn.ensemble import RandomForestClassifier
    >>> X = np.random.default_rng(0).random((50, 5)); y = (X[:, 0] > 0.5).astype(int)
    >>> rf = RandomForestClassifier(10, random_state=0).fit(X, y)
    >>> flat = FlatForest(FlatForest.from_sklearn(rf).to_arrays())
    >>> np.array_equal(flat.predict_proba(X), rf.predict_proba(X))
    True
    """

    def __init__(self, arrays: dict[str, np.ndarray]):
        missing = [name for name in _ARRAYS if name not in arrays]
        if missing:
            raise ModelError(f"flattened forest lacks the arrays {missing}")
        self.roots, self.feature, self.left, self.right, self.leaf = (
            np.asarray(arrays[name], dtype=np.intp) for name in ("roots", "feature", "left", "right", "leaf"))
        self.threshold = np.asarray(arrays["threshold"], dtype=np.float64)
        self.leaf_proba = np.asarray(arrays["leaf_proba"], dtype=np.float64)
        self.classes_ = np.asarray(arrays["classes"])
        self.n_features = int(arrays["n_features"])
        if not self._consistent():
            raise ModelError("flattened forest arrays are inconsistent (shapes or node indices out of range)")

    def _consistent(self) -> bool:
        # a walk over inconsistent arrays would index out of range or loop; refuse them up front
        n_nodes, splits = self.feature.size, self.left >= 0
        return bool(
            all(a.shape == (n_nodes,) for a in (self.threshold, self.left, self.right, self.leaf))
            and self.leaf_proba.shape == (int(np.count_nonzero(~splits)), self.classes_.size)
            and np.all((self.right >= 0) == splits) and np.all((self.leaf >= 0) != splits)
            and np.all(self.left < n_nodes) and np.all(self.right < n_nodes)
            and np.all((self.roots >= 0) & (self.roots < n_nodes)) and np.all(self.leaf < self.leaf_proba.shape[0])
            and np.all((self.feature[splits] >= 0) & (self.feature[splits] < self.n_features))
        )

    @classmethod
    def from_sklearn(cls, forest) -> FlatForest:
        """Flatten a fitted ``RandomForestClassifier``."""
        trees = [estimator.tree_ for estimator in forest.estimators_]
        offsets = np.cumsum([0] + [t.node_count for t in trees])
        is_leaf = np.concatenate([t.children_left < 0 for t in trees])
        # child indices become global so all trees live in one set of arrays
        left = np.concatenate([np.where(t.children_left < 0, -1, t.children_left + o) for t, o in zip(trees, offsets)])
        right = np.concatenate([np.where(t.children_right < 0, -1, t.children_right + o)
                                for t, o in zip(trees, offsets)])
        # scikit-learn's classification trees store class fractions, which it uses as they are
        values = np.concatenate([t.value[:, 0, :] for t in trees])[is_leaf]
        leaf = np.full(is_leaf.size, -1)
        leaf[is_leaf] = np.arange(int(is_leaf.sum()))
        return cls({
            "roots": offsets[:-1], "feature": np.concatenate([t.feature for t in trees]),
            "threshold": np.concatenate([t.threshold for t in trees]), "left": left, "right": right, "leaf": leaf,
            "leaf_proba": values, "classes": forest.classes_,
            "n_features": np.array(forest.n_features_in_),
        })

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The arrays ``FlatForest(arrays)`` takes back, in compact dtypes (what the safetensors file holds)."""
        index = np.int32 if self.feature.size < 2**31 else np.int64
        return {
            "roots": self.roots.astype(index), "feature": self.feature.astype(np.int32),
            "threshold": self.threshold, "left": self.left.astype(index), "right": self.right.astype(index),
            "leaf": self.leaf.astype(index), "leaf_proba": self.leaf_proba,
            "classes": self.classes_.astype(np.int64), "n_features": np.array(self.n_features, dtype=np.int64),
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the arrays as safetensors (no code, no pickle), tagged with `FLAT_FOREST_FORMAT`."""
        from safetensors.numpy import save_file

        save_file(self.to_arrays(), path, metadata={"format": FLAT_FOREST_FORMAT})

    @classmethod
    def load(cls, path: str | os.PathLike) -> FlatForest:
        """Read a file written by `save`; raises `ModelError` naming the file if it is not one.

        >>> FlatForest.load("profiles/np/forest.safetensors").predict_proba(np.zeros((1, 5))).shape  # doctest: +SKIP
        (1, 5)
        """
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="np") as fh:
                if (fh.metadata() or {}).get("format") != FLAT_FOREST_FORMAT:
                    raise ModelError(f"{path}: not a flattened latticewatch forest (format {FLAT_FOREST_FORMAT})")
                arrays = {name: fh.get_tensor(name) for name in fh.keys()}
        except SafetensorError as err:
            raise ModelError(f"{path}: cannot read the flattened forest: {err}") from None
        try:
            return cls(arrays)
        except ModelError as err:
            raise ModelError(f"{path}: {err}") from None

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities, shape (n_samples, n_classes), equal to scikit-learn's."""
        # scikit-learn compares float32 inputs against float64 thresholds; so do we
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ValueError(f"expected {self.n_features} features per row, got shape {X.shape}")
        n_trees, n_samples = self.roots.size, X.shape[0]
        node = np.repeat(self.roots, n_samples)
        sample = np.tile(np.arange(n_samples), n_trees)
        walking = np.flatnonzero(self.left[node] >= 0)  # paths that have not reached a leaf yet
        while walking.size:
            at, who = node[walking], sample[walking]
            go_left = X[who, self.feature[at]] <= self.threshold[at]
            at = np.where(go_left, self.left[at], self.right[at])
            node[walking] = at
            walking = walking[self.left[at] >= 0]
        # the mean over the first axis adds tree by tree, in scikit-learn's order: identical sums
        return self.leaf_proba[self.leaf[node]].reshape(n_trees, n_samples, -1).mean(axis=0)


def verdicts(proba: np.ndarray, class_names: Sequence[str], uncertain_below: float | None = None) -> list[Verdict]:
    """Label and probabilities per row of ``proba``; `UNCERTAIN` where the best class is below ``uncertain_below``.

    >>> verdicts(np.array([[0.9, 0.1], [0.55, 0.45]]), ("a", "b"), uncertain_below=0.6)
    [('a', {'a': 0.9, 'b': 0.1}), ('uncertain', {'a': 0.55, 'b': 0.45})]
    """
    out = []
    for row in proba:
        best = int(np.argmax(row))
        label = UNCERTAIN if uncertain_below is not None and row[best] < uncertain_below else class_names[best]
        out.append((label, {name: float(p) for name, p in zip(class_names, row)}))
    return out


class CropBackend(Protocol):
    """Runs the CNN: (N, C, S, S) float32 crops → (N, n_classes) probabilities (`OnnxRuntimeBackend` does)."""

    name: str

    def predict(self, batch: np.ndarray) -> np.ndarray: ...


class ForestRegionClassifier:
    """Classifies regions' feature dictionaries with a `FlatForest` into the profile's classes.

    Examples
    --------
    >>> clf = ForestRegionClassifier(FlatForest.load("forest.safetensors"), CLASSES)  # doctest: +SKIP
    >>> clf([features])  # doctest: +SKIP
    [('no_stacking_fault', {'stacking_fault': 0.21, ...})]
    """

    def __init__(self, flat: FlatForest, class_names: Sequence[str], *, uncertain_below: float | None = None):
        self.flat = flat
        self.class_names = tuple(class_names[int(c)] for c in flat.classes_)
        self.uncertain_below = uncertain_below

    def __call__(self, features: list[dict[str, float]]) -> list[Verdict]:
        if not features:
            return []
        X = np.array([[f[name] for name in FEATURE_NAMES] for f in features])
        return verdicts(self.flat.predict_proba(X), self.class_names, self.uncertain_below)


class CnnRegionClassifier:
    """Classifies regions from their crops with a CNN: one backend call per frame for all its regions.

    Parameters
    ----------
    backend
        Maps (N, C, S, S) float32 crops to (N, n_classes) probabilities (a `CropBackend`).
    class_names
        The network's classes, in the order of its outputs.
    spec
        How a region becomes a crop (the manifest's ``classifier.input``).
    uncertain_below
        Below this largest probability the label is `UNCERTAIN`.

    Examples
    --------
    >>> clf = CnnRegionClassifier(OnnxRuntimeBackend("cnn.onnx"), CLASSES, CropSpec())  # doctest: +SKIP
    >>> clf(pre.image, labels, regions)  # doctest: +SKIP
    [('stacking_fault', {'stacking_fault': 0.93, ...}), ...]
    """

    def __init__(self, backend: CropBackend, class_names: Sequence[str], spec: CropSpec, *,
                 uncertain_below: float | None = None):
        self.backend, self.class_names, self.spec = backend, tuple(class_names), spec
        self.uncertain_below = uncertain_below

    def __call__(self, image: np.ndarray, labels: np.ndarray, regions: Sequence[IsolatedRegion]) -> list[Verdict]:
        """Verdicts for ``regions`` of ``labels`` (same shape as the model-resolution ``image``)."""
        if not regions:
            return []
        crops = labelled_inputs(image, labels, [(r.label, r.centroid) for r in regions], self.spec)
        proba = np.asarray(self.backend.predict(crops))
        if proba.shape != (len(regions), len(self.class_names)):
            raise ModelError(f"classifier returned probabilities of shape {proba.shape} for {len(regions)} regions "
                             f"and {len(self.class_names)} classes")
        return verdicts(proba, self.class_names, self.uncertain_below)
