"""Region classification with the Groschner et al. (2021) random forest (500 trees, Gini).

The forest is trained with scikit-learn and stored with skops (never pickle). For inference its
trees are flattened into a handful of arrays and all trees × regions are walked together in
numpy: scikit-learn's per-tree Python loop costs ~45 ms per frame for 500 trees, this ~2 ms, with
identical probabilities.
"""

from __future__ import annotations

import os

import numpy as np

from latticewatch.stages.features import FEATURE_NAMES

#: The only types a latticewatch forest file may contain; skops refuses anything else.
TRUSTED_SKOPS_TYPES = [
    "sklearn.ensemble._forest.RandomForestClassifier",
    "sklearn.tree._classes.DecisionTreeClassifier",
    "sklearn.tree._tree.Tree",
    "numpy.dtype",
    "numpy.ndarray",
]


def load_forest(path: str | os.PathLike):
    """Load a skops forest, allowing only the types a random forest needs."""
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
    """A fitted ``RandomForestClassifier`` as flat arrays, evaluated vectorised.

    Examples
    --------
    >>> from sklearn.ensemble import RandomForestClassifier
    >>> X = np.random.default_rng(0).random((50, 5)); y = (X[:, 0] > 0.5).astype(int)
    >>> rf = RandomForestClassifier(10, random_state=0).fit(X, y)
    >>> np.allclose(FlatForest(rf).predict_proba(X), rf.predict_proba(X))
    True
    """

    def __init__(self, forest):
        trees = [estimator.tree_ for estimator in forest.estimators_]
        offsets = np.cumsum([0] + [t.node_count for t in trees])
        self.roots = offsets[:-1]
        self.feature = np.concatenate([t.feature for t in trees]).astype(np.intp)
        self.threshold = np.concatenate([t.threshold for t in trees])
        # child indices become global so all trees live in one set of arrays
        self.is_leaf = np.concatenate([t.children_left < 0 for t in trees])
        self.left = np.concatenate([t.children_left + o for t, o in zip(trees, offsets)])
        self.right = np.concatenate([t.children_right + o for t, o in zip(trees, offsets)])
        values = np.concatenate([t.value[:, 0, :] for t in trees])
        self.leaf_proba = values / values.sum(axis=1, keepdims=True)
        self.classes_ = forest.classes_
        self.n_features = forest.n_features_in_

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities, shape (n_samples, n_classes), equal to scikit-learn's."""
        # scikit-learn compares float32 inputs against float64 thresholds; so do we
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ValueError(f"expected {self.n_features} features per row, got shape {X.shape}")
        n_trees, n_samples = self.roots.size, X.shape[0]
        node = np.repeat(self.roots, n_samples)
        sample = np.tile(np.arange(n_samples), n_trees)
        walking = np.arange(node.size)  # paths that have not reached a leaf yet
        while walking.size:
            at, who = node[walking], sample[walking]
            go_left = X[who, self.feature[at]] <= self.threshold[at]
            at = np.where(go_left, self.left[at], self.right[at])
            node[walking] = at
            walking = walking[~self.is_leaf[at]]
        node = node.reshape(n_trees, n_samples)
        return self.leaf_proba[node].mean(axis=0)


class RegionClassifier:
    """Loads a skops forest and classifies feature dictionaries into the profile's classes."""

    def __init__(self, path: str | os.PathLike, class_names: tuple[str, ...]):
        forest = load_forest(path)
        self.flat = FlatForest(forest)
        self.class_names = tuple(class_names[int(c)] for c in forest.classes_)

    def __call__(self, features: list[dict[str, float]]) -> list[tuple[str, dict[str, float]]]:
        if not features:
            return []
        X = np.array([[f[name] for name in FEATURE_NAMES] for f in features])
        proba = self.flat.predict_proba(X)
        out = []
        for row in proba:
            probs = {name: float(p) for name, p in zip(self.class_names, row)}
            out.append((self.class_names[int(np.argmax(row))], probs))
        return out
