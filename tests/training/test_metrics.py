"""Segmentation metrics against scikit-learn on random masks; pooling is over pixels."""

import numpy as np
import pytest
from sklearn import metrics as skm

from latticewatch.training.assess.metrics import METRIC_KEYS, PixelCounts, counts_above, segmentation_metrics


def _sklearn(pred: np.ndarray, truth: np.ndarray) -> dict:
    p, t = pred.ravel().astype(int), truth.ravel().astype(int)
    return {
        "dice": skm.f1_score(t, p, zero_division=0),
        "jaccard": skm.jaccard_score(t, p, zero_division=0),
        "precision": skm.precision_score(t, p, zero_division=0),
        "recall": skm.recall_score(t, p, zero_division=0),
        "accuracy": skm.accuracy_score(t, p),
        "balanced_accuracy": skm.balanced_accuracy_score(t, p),
        "confusion_matrix": skm.confusion_matrix(t, p, labels=[0, 1]).tolist(),
    }


@pytest.mark.parametrize("seed", range(5))
def test_metrics_equal_sklearn_on_random_masks(seed):
    rng = np.random.default_rng(seed)
    truth = rng.random((64, 48)) < rng.uniform(0.05, 0.6)
    pred = np.where(rng.random((64, 48)) < 0.8, truth, rng.random((64, 48)) < 0.5)  # mostly right
    ours = segmentation_metrics(PixelCounts.of(pred, truth))
    reference = _sklearn(pred, truth)
    assert set(METRIC_KEYS) | {"confusion_matrix"} == set(ours)
    for key in METRIC_KEYS:
        assert ours[key] == pytest.approx(reference[key], abs=1e-12), key
    assert ours["confusion_matrix"] == reference["confusion_matrix"]


def test_set_metrics_are_pooled_over_pixels_not_averaged_over_images():
    rng = np.random.default_rng(7)
    preds, truths = [], []
    for size in (16, 40, 90):  # unequal sizes: a mean of per-image scores would differ
        truth = rng.random((size, size)) < 0.3
        preds.append(np.where(rng.random((size, size)) < 0.7, truth, ~truth))
        truths.append(truth)
    pooled = sum((PixelCounts.of(p, t) for p, t in zip(preds, truths)), PixelCounts())
    ours = segmentation_metrics(pooled)
    flat_p = np.concatenate([p.ravel() for p in preds])
    flat_t = np.concatenate([t.ravel() for t in truths])
    assert ours["dice"] == pytest.approx(skm.f1_score(flat_t, flat_p), abs=1e-12)
    assert ours["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(flat_t, flat_p), abs=1e-12)
    mean_of_images = np.mean([skm.f1_score(t.ravel(), p.ravel()) for p, t in zip(preds, truths)])
    assert ours["dice"] != pytest.approx(mean_of_images, abs=1e-6)


def test_empty_truth_and_prediction_is_perfect_and_misses_score_zero():
    empty = np.zeros((8, 8), bool)
    perfect = segmentation_metrics(PixelCounts.of(empty, empty))
    assert perfect["dice"] == perfect["jaccard"] == perfect["precision"] == perfect["recall"] == 1.0
    assert perfect["confusion_matrix"] == [[64, 0], [0, 0]]
    truth = empty.copy()
    truth[2:4, 2:4] = True
    missed = segmentation_metrics(PixelCounts.of(empty, truth))
    assert missed["dice"] == missed["recall"] == missed["precision"] == 0.0
    assert missed["balanced_accuracy"] == pytest.approx(0.5)


def test_counts_add_and_shapes_must_match():
    a, b = PixelCounts(1, 2, 3, 4), PixelCounts(10, 20, 30, 40)
    assert a + b == PixelCounts(11, 22, 33, 44)
    with pytest.raises(ValueError, match="shape"):
        PixelCounts.of(np.zeros((4, 4)), np.zeros((4, 5)))


def test_counts_above_equal_thresholding_each_image():
    rng = np.random.default_rng(4)
    scores = [rng.random((20, 30)).astype(np.float32) for _ in range(3)]
    truths = [rng.random((20, 30)) < 0.3 for _ in range(3)]
    thresholds = np.array([0.1, 0.25, 0.5, 0.9])
    fg_above, bg_above, n_fg, n_bg = counts_above(scores, truths, thresholds)
    for i, t in enumerate(thresholds):
        pooled = PixelCounts.pooled([s >= t for s in scores], truths)
        assert (fg_above[i], bg_above[i]) == (pooled.tp, pooled.fp)
        assert (n_fg, n_bg) == (pooled.tp + pooled.fn, pooled.fp + pooled.tn)
