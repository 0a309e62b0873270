"""Region classifiers: the flattened forest (safetensors, no scikit-learn at inference) and the crop CNN (ONNX)."""

from pathlib import Path

import numpy as np
import pytest
import skops.io as sio
from scipy import ndimage
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression

from latticewatch.errors import ModelError
from latticewatch.frame import CLASSES, UNCERTAIN
from latticewatch.models.backends.onnxruntime import OnnxRuntimeBackend
from latticewatch.models.manifest import read_manifest
from latticewatch.stages.classify import (
    CnnRegionClassifier,
    FlatForest,
    ForestRegionClassifier,
    load_forest,
    verdicts,
)
from latticewatch.stages.crops import CropSpec, classifier_input
from latticewatch.stages.features import FEATURE_NAMES
from latticewatch.stages.isolate import measure
from latticewatch_nanoparticles import profile_dir

RANDOM_CNN = Path(__file__).resolve().parents[1] / "fixtures" / "random_cnn.onnx"
CNN_SPEC = CropSpec(size_px=32)  # the fixture's crop side (fixtures/make_random_cnn.py)


@pytest.fixture(scope="module")
def forest():
    rng = np.random.default_rng(0)
    X = rng.random((400, 5))
    y = (X[:, 0] * 5).astype(int)  # five classes
    return RandomForestClassifier(60, random_state=0).fit(X, y)


def test_flat_forest_equals_scikit_learn(forest):
    X = np.random.default_rng(1).random((37, 5))
    np.testing.assert_array_equal(FlatForest.from_sklearn(forest).predict_proba(X), forest.predict_proba(X))


def test_flat_forest_rejects_wrong_feature_count(forest):
    with pytest.raises(ValueError, match="expected 5 features"):
        FlatForest.from_sklearn(forest).predict_proba(np.zeros((2, 3)))


def test_saved_arrays_give_the_same_probabilities(tmp_path, forest):
    path = tmp_path / "forest.safetensors"
    FlatForest.from_sklearn(forest).save(path)
    X = np.random.default_rng(2).normal(size=(50, 5)) * 3  # also far outside the training range
    np.testing.assert_array_equal(FlatForest.load(path).predict_proba(X), forest.predict_proba(X))


def test_a_tree_that_is_one_leaf_is_walked(tmp_path):
    X = np.random.default_rng(3).random((20, 5))
    pure = RandomForestClassifier(5, random_state=0).fit(X, np.zeros(20, int))  # every tree a single leaf
    np.testing.assert_array_equal(FlatForest.from_sklearn(pure).predict_proba(X), pure.predict_proba(X))


def test_inconsistent_or_foreign_arrays_are_refused(tmp_path, forest):
    arrays = FlatForest.from_sklearn(forest).to_arrays()
    broken = {**arrays, "left": np.where(arrays["left"] >= 0, arrays["left"] + 10**6, -1)}
    with pytest.raises(ModelError, match="inconsistent"):
        FlatForest(broken)
    with pytest.raises(ModelError, match="lacks the arrays"):
        FlatForest({k: v for k, v in arrays.items() if k != "leaf"})
    from safetensors.numpy import save_file

    other = tmp_path / "weights.safetensors"
    save_file({"w": np.zeros(3, np.float32)}, other)
    with pytest.raises(ModelError, match="not a flattened latticewatch forest"):
        FlatForest.load(other)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not safetensors")
    with pytest.raises(ModelError, match="cannot read"):
        FlatForest.load(garbage)


def test_shipped_forest_arrays_equal_the_skops_forest_bit_for_bit():
    clf = read_manifest(profile_dir).baseline_classifier  # the paper's forest, kept beside the CNN
    assert clf.kind == "forest" and clf.arrays == "forest.safetensors" and clf.skops == "forest.skops"
    flat, forest = FlatForest.load(profile_dir / clf.arrays), load_forest(profile_dir / clf.skops)
    rng = np.random.default_rng(4)
    X = np.concatenate([rng.random((300, 5)), rng.normal(size=(300, 5)) * 10])
    np.testing.assert_array_equal(flat.predict_proba(X), forest.predict_proba(X))


def test_forest_classifier_labels_and_uncertain(forest):
    flat = FlatForest.from_sklearn(forest)
    feats = [dict(zip(FEATURE_NAMES, row)) for row in np.random.default_rng(2).random((40, 5))]
    expected = forest.predict_proba(np.array([[f[n] for n in FEATURE_NAMES] for f in feats]))
    plain = ForestRegionClassifier(flat, CLASSES)(feats)
    for (label, probs), row in zip(plain, expected):
        assert label == CLASSES[int(np.argmax(row))]
        assert list(probs.values()) == list(row)
    cut = float(np.median(expected.max(axis=1)))
    doubtful = ForestRegionClassifier(flat, CLASSES, uncertain_below=cut)(feats)
    for (label, probs), (plain_label, _), row in zip(doubtful, plain, expected):
        assert label == (UNCERTAIN if row.max() < cut else plain_label)
        assert list(probs.values()) == list(row)  # still reported
    assert {label for label, _ in doubtful} >= {UNCERTAIN}
    assert ForestRegionClassifier(flat, CLASSES)([]) == []


def test_verdicts_at_the_threshold_keep_the_class():
    assert verdicts(np.array([[0.6, 0.4]]), ("a", "b"), uncertain_below=0.6)[0][0] == "a"
    assert verdicts(np.array([[0.59, 0.41]]), ("a", "b"), uncertain_below=0.6)[0][0] == UNCERTAIN


def test_skops_file_with_another_estimator_is_refused(tmp_path):
    path = tmp_path / "other.skops"
    sio.dump(LogisticRegression().fit(np.random.rand(10, 5), [0, 1] * 5), path)
    with pytest.raises(ValueError, match="not a RandomForestClassifier"):
        load_forest(path)


# ------------------------------------------------------------------------------------------------ CNN


@pytest.fixture(scope="module")
def frame_regions():
    """A model-resolution image with four blobs of different size, labelled and measured as the analyser does."""
    rng = np.random.default_rng(5)
    image = rng.normal(size=(128, 160)).astype(np.float32)
    yy, xx = np.mgrid[:128, :160]
    mask = np.zeros(image.shape, bool)
    for cy, cx, r in [(30, 30, 8), (40, 110, 14), (95, 50, 5), (100, 130, 11)]:
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        mask |= disc
        image[disc] += np.sin(xx[disc] * (0.6 + r / 20))  # each particle its own fringes
    labels = ndimage.label(mask)[0]
    regions = measure(labels)
    assert len(regions) == 4
    return image, labels, regions


@pytest.fixture(scope="module")
def cnn_backend():
    return OnnxRuntimeBackend(RANDOM_CNN, threads=1)


class CountingBackend:
    """The ONNX backend, counting its calls and the crops of each."""

    name = "counting"

    def __init__(self, backend):
        self.backend, self.batches = backend, []

    def predict(self, batch):
        self.batches.append(batch.shape)
        return self.backend.predict(batch)


def test_cnn_classifies_all_regions_of_a_frame_in_one_batch(frame_regions, cnn_backend):
    image, labels, regions = frame_regions
    counting = CountingBackend(cnn_backend)
    got = CnnRegionClassifier(counting, CLASSES, CNN_SPEC)(image, labels, regions)
    assert counting.batches == [(4, 3, 32, 32)]
    for (label, probs), region in zip(got, regions):
        # the same crop alone gives the same answer: the batch does not mix regions
        crop = classifier_input(image, labels == region.label, region.centroid, CNN_SPEC)
        alone = cnn_backend.predict(crop[None])[0]
        assert list(probs) == list(CLASSES) and label == CLASSES[int(np.argmax(alone))]
        np.testing.assert_allclose(list(probs.values()), alone, rtol=1e-5, atol=1e-6)
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
    assert len({tuple(p.values()) for _, p in got}) == 4  # each region its own crop
    assert CnnRegionClassifier(counting, CLASSES, CNN_SPEC)(image, labels, []) == []
    assert len(counting.batches) == 1  # no call without regions


def test_cnn_says_uncertain_below_the_threshold(frame_regions, cnn_backend):
    image, labels, regions = frame_regions
    plain = CnnRegionClassifier(cnn_backend, CLASSES, CNN_SPEC)(image, labels, regions)
    best = [max(p.values()) for _, p in plain]
    cut = float(np.median(best))
    doubtful = CnnRegionClassifier(cnn_backend, CLASSES, CNN_SPEC, uncertain_below=cut)(image, labels, regions)
    assert [label for label, _ in doubtful] == [UNCERTAIN if b < cut else label for b, (label, _) in zip(best, plain)]
    assert UNCERTAIN in {label for label, _ in doubtful} and [p for _, p in doubtful] == [p for _, p in plain]


def test_cnn_with_the_wrong_number_of_classes_is_a_model_error(frame_regions, cnn_backend):
    image, labels, regions = frame_regions
    with pytest.raises(ModelError, match=r"shape \(4, 5\) for 4 regions and 3 classes"):
        CnnRegionClassifier(cnn_backend, CLASSES[:3], CNN_SPEC)(image, labels, regions)


def test_committed_cnn_fixture_equals_a_fresh_export(frame_regions, cnn_backend):
    torch = pytest.importorskip("torch")
    from nets import randomised_cnn

    image, labels, regions = frame_regions
    crops = np.stack([classifier_input(image, labels == r.label, r.centroid, CNN_SPEC) for r in regions])
    with torch.no_grad():
        expected = randomised_cnn()(torch.from_numpy(crops)).numpy()
    assert np.abs(cnn_backend.predict(crops) - expected).max() < 1e-5, \
        "regenerate with: python tests/fixtures/make_random_cnn.py"
