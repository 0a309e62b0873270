"""Segmentation metrics as the papers report them: counted over all pixels of a set.

Per-image metrics are also available, but the headline numbers (Dice 0.80 in Groschner et al.
2021, Jaccard 0.812 / F1 0.884 in Sadre et al. 2021) are pooled over every pixel, so a set's
score is computed from summed confusion counts, never as a mean of per-image scores.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

METRIC_KEYS = ("dice", "jaccard", "precision", "recall", "accuracy", "balanced_accuracy")


@dataclass(frozen=True)
class PixelCounts:
    """Confusion counts of a binary segmentation (foreground = positive)."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    @classmethod
    def of(cls, predicted: np.ndarray, truth: np.ndarray) -> "PixelCounts":
        p, t = np.asarray(predicted, bool), np.asarray(truth, bool)
        if p.shape != t.shape:
            raise ValueError(f"prediction shape {p.shape} differs from truth shape {t.shape}")
        tp = int(np.count_nonzero(p & t))
        n_p, n_t = int(np.count_nonzero(p)), int(np.count_nonzero(t))
        return cls(tp, n_p - tp, n_t - tp, p.size - n_p - n_t + tp)

    @classmethod
    def pooled(cls, predictions: Iterable[np.ndarray], truths: Iterable[np.ndarray]) -> "PixelCounts":
        """Counts summed over every (prediction, truth) pair of a set."""
        return sum((cls.of(p, t) for p, t in zip(predictions, truths)), cls())

    def __add__(self, other: "PixelCounts") -> "PixelCounts":
        return PixelCounts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn)


def _ratio(num: int, den: int, empty: float) -> float:
    return num / den if den else empty


def segmentation_metrics(counts: PixelCounts) -> dict:
    """Dice (= F1), Jaccard (IoU), precision, recall, pixel accuracy, balanced accuracy and the
    confusion matrix ``[[tn, fp], [fn, tp]]`` (rows: truth background/foreground).

    Ratios with an empty denominator are 1.0 when nothing was there to find and nothing was
    predicted (a perfect empty result), otherwise 0.0.

    >>> m = segmentation_metrics(PixelCounts(tp=8, fp=2, fn=2, tn=88))
    >>> round(m["dice"], 3), round(m["jaccard"], 3)
    (0.8, 0.667)
    """
    tp, fp, fn, tn = counts.tp, counts.fp, counts.fn, counts.tn
    nothing = 1.0 if tp + fp + fn == 0 else 0.0
    recall = _ratio(tp, tp + fn, nothing)
    specificity = _ratio(tn, tn + fp, 1.0)
    return {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn, nothing),
        "jaccard": _ratio(tp, tp + fp + fn, nothing),
        "precision": _ratio(tp, tp + fp, nothing),
        "recall": recall,
        "accuracy": _ratio(tp + tn, tp + fp + fn + tn, 1.0),
        "balanced_accuracy": (recall + specificity) / 2,
        "confusion_matrix": [[tn, fp], [fn, tp]],
    }


def pooled_dice(predictions: Iterable[np.ndarray], truths: Iterable[np.ndarray]) -> float:
    """Dice over all pixels of a set (not a mean of per-image Dice)."""
    return segmentation_metrics(PixelCounts.pooled(predictions, truths))["dice"]


def counts_above(scores: Sequence[np.ndarray], truths: Sequence[np.ndarray],
                 thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    """For every ``t`` of the sorted ``thresholds``: the foreground and the background pixels with
    ``score >= t``, pooled over the set, and the totals of each.

    One ``searchsorted`` per image gives the counts at every threshold, so a whole sweep costs
    about as much as one histogram.

    Returns
    -------
    (fg_above, bg_above, n_fg, n_bg)
    """
    thresholds = np.asarray(thresholds)
    k = thresholds.size
    fg_bins, bg_bins = np.zeros(k + 1, np.int64), np.zeros(k + 1, np.int64)
    for s, m in zip(scores, truths):
        m = np.asarray(m, bool)
        # bin j holds scores with exactly j thresholds <= score, so score >= t_i  <=>  bin > i
        # (side="right": a score equal to a threshold is foreground, as `p >= t` elsewhere)
        fg_bins += np.bincount(np.searchsorted(thresholds, s[m], side="right"), minlength=k + 1)
        bg_bins += np.bincount(np.searchsorted(thresholds, s[~m], side="right"), minlength=k + 1)
    fg_above = np.cumsum(fg_bins[::-1])[::-1][1:]
    bg_above = np.cumsum(bg_bins[::-1])[::-1][1:]
    return fg_above, bg_above, int(fg_bins.sum()), int(bg_bins.sum())
