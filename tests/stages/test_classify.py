import numpy as np
import pytest
import skops.io as sio
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression

from latticewatch.frame import CLASSES
from latticewatch.stages.classify import FlatForest, RegionClassifier, load_forest
from latticewatch.stages.features import FEATURE_NAMES


@pytest.fixture(scope="module")
def forest():
    rng = np.random.default_rng(0)
    X = rng.random((400, 5))
    y = (X[:, 0] * 5).astype(int)  # five classes
    return RandomForestClassifier(60, random_state=0).fit(X, y)


def test_flat_forest_equals_scikit_learn(forest):
    X = np.random.default_rng(1).random((37, 5))
    np.testing.assert_array_equal(FlatForest(forest).predict_proba(X), forest.predict_proba(X))


def test_flat_forest_rejects_wrong_feature_count(forest):
    with pytest.raises(ValueError, match="expected 5 features"):
        FlatForest(forest).predict_proba(np.zeros((2, 3)))


def test_region_classifier_from_skops(tmp_path, forest):
    path = tmp_path / "forest.skops"
    sio.dump(forest, path)
    clf = RegionClassifier(path, CLASSES)
    feats = [dict(zip(FEATURE_NAMES, row)) for row in np.random.default_rng(2).random((4, 5))]
    verdicts = clf(feats)
    expected = forest.predict_proba(np.array([[f[n] for n in FEATURE_NAMES] for f in feats]))
    for (label, probs), row in zip(verdicts, expected):
        assert label == CLASSES[int(np.argmax(row))]
        assert list(probs.values()) == pytest.approx(list(row))
    assert clf([]) == []


def test_skops_file_with_another_estimator_is_refused(tmp_path):
    path = tmp_path / "other.skops"
    sio.dump(LogisticRegression().fit(np.random.rand(10, 5), [0, 1] * 5), path)
    with pytest.raises(ValueError, match="not a RandomForestClassifier"):
        load_forest(path)
