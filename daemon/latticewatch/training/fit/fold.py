"""One cross-validation fold of a segmentation net, and what the folds' entries tell together.

A fold's net is trained from scratch on the other folds' images, with a series-grouped inner
validation split for early stopping (so the test fold never steers training), then scored on the
test fold, pooled and per image. `latticewatch.training.assess.cross_validation` deals the folds
and runs `train_fold` on each; a trained profile's manifest records the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from latticewatch.training.assess.metrics import PixelCounts, segmentation_metrics
from latticewatch.training.data.labelled import series_of
from latticewatch.training.data.supervised import PreparedSet, validation_split
from latticewatch.training.fit.unet import UNetTrainingConfig, evaluate_net, train_unet


def image_entry(counts: PixelCounts) -> dict[str, float]:
    """Per-image Dice and true / predicted foreground fractions (for ranking frames by content).

    >>> image_entry(PixelCounts(tp=8, fp=2, fn=2, tn=88))
    {'dice': 0.8, 'true_fraction': 0.1, 'predicted_fraction': 0.1}
    """
    c = counts
    n = c.tp + c.fp + c.fn + c.tn
    return {"dice": round(segmentation_metrics(c)["dice"], 4), "true_fraction": round((c.tp + c.fn) / n, 5),
            "predicted_fraction": round((c.tp + c.fp) / n, 5)}


def train_fold(
    prepared: PreparedSet,
    fold: int,
    test_names: Sequence[str],
    config: UNetTrainingConfig,
    *,
    val_fraction: float,
    progress: bool = False,
    desc: str = "fold",
    extra: PreparedSet | None = None,
) -> dict[str, Any]:
    """Train a net on every image of ``prepared`` but ``test_names`` and score it on those.

    Parameters
    ----------
    fold
        The fold's number, recorded in the entry.
    val_fraction
        Whole series of the training images held out for early stopping; 0 trains for exactly
        ``config.max_steps`` steps.
    extra
        Train-only images mixed into the fold's training crops (never validated or tested on).

    Returns
    -------
    dict
        ``fold``, image counts, ``test_series``, the run's steps and best step, pooled
        ``metrics`` of the test images and ``per_image`` entries (see `image_entry`).

    Examples
    --------
    >>> entry = train_fold(prepared, 1, fold_names[0], UNetTrainingConfig(), val_fraction=0.15)  # doctest: +SKIP
    >>> entry["metrics"]["jaccard"]  # doctest: +SKIP
    0.81
    """
    train_names = sorted(set(prepared.names) - set(test_names))
    fit_names, val_names = validation_split(train_names, val_fraction, config.seed)
    fit, val = prepared.subset(fit_names), prepared.subset(val_names)
    trained = train_unet((fit.images, fit.masks), (val.images, val.masks) if val_names else None, config,
                         progress=progress, desc=desc, extra=(extra.images, extra.masks) if extra else None)
    pooled, per_image = evaluate_net(trained.net, prepared.subset(test_names))
    return {"fold": fold, "n_test": len(test_names), "n_train": len(fit_names), "n_val": len(val_names),
            "test_series": sorted({series_of(n) for n in test_names}), "steps": trained.steps,
            "best_step": trained.best_step, "best_val_dice": trained.best_dice, "seconds": round(trained.seconds, 1),
            "metrics": segmentation_metrics(pooled),
            "per_image": {n: image_entry(c) for n, c in zip(test_names, per_image)}}


def content_ratio_spearman(result: dict[str, Any]) -> float | None:
    """Spearman rank correlation, over every held-out image, between the predicted and the
    labelled content ratio (1 − foreground fraction): how well ``latticewatch sort`` would rank
    frames the net has never seen.

    ``result`` is a cross-validation result (its ``model.per_fold`` entries of `train_fold`);
    ``None`` where the correlation is undefined (fewer than three images, or a constant ranking).

    >>> entries = {f"i{k}": {"true_fraction": k / 10, "predicted_fraction": k / 9} for k in range(4)}
    >>> content_ratio_spearman({"model": {"per_fold": [{"per_image": entries}]}})
    1.0
    """
    from scipy.stats import spearmanr

    pairs = [(e["true_fraction"], e["predicted_fraction"])
             for f in result["model"]["per_fold"] for e in f.get("per_image", {}).values()]
    truth, predicted = (np.array(v, float) for v in zip(*pairs)) if pairs else (np.zeros(0), np.zeros(0))
    if len(pairs) < 3 or np.ptp(truth) == 0 or np.ptp(predicted) == 0:  # undefined: say so rather than NaN
        return None
    return float(spearmanr(truth, predicted).statistic)
