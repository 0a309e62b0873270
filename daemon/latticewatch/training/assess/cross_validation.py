"""k-fold cross-validation of a segmentation net (and classical baselines) on labelled images,
grouped by acquisition series, as in Sadre et al. (2021) (fivefold).

Each fold's net is trained from scratch on the other folds (with a series-grouped inner
validation split for early stopping, so the test fold never steers training), then scored on
the test fold. Baselines are fitted on the same training folds and scored on the same test fold.
Metrics are counted over pixels: per fold (pooled over the fold's images), pooled over every test
pixel of all folds, and as mean ± sample standard deviation of the per-fold values.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from latticewatch.io.atomic import write_atomic
from latticewatch.stages.preprocess import Normalisation
from latticewatch.training.data.labelled import LabelledImage, group_folds, series_of
from latticewatch.training.assess.metrics import METRIC_KEYS, PixelCounts, segmentation_metrics
from latticewatch.training.data.supervised import prepare_labelled, resolve_pixel_size, validation_split

log = logging.getLogger("latticewatch.training.assess.cross_validation")

#: Settings that must agree for folds of an earlier (interrupted) run to be reused.
_SAME_RUN_KEYS = ("architecture", "widths", "folds", "fold_seed", "normalisation", "pixel_size_nm", "val_fraction", "config", "fold_names")


def summarise(fold_counts: Sequence[PixelCounts]) -> dict[str, Any]:
    """Pooled metrics over all folds' pixels, and mean / sample std of the per-fold metrics.

    >>> s = summarise([PixelCounts(8, 2, 2, 88), PixelCounts(6, 2, 2, 90)])
    >>> round(s["pooled"]["dice"], 3), round(s["mean"]["dice"], 3)
    (0.778, 0.775)
    """
    per_fold = [segmentation_metrics(c) for c in fold_counts]
    pooled = segmentation_metrics(sum(fold_counts, PixelCounts()))
    values = {k: np.array([m[k] for m in per_fold], float) for k in METRIC_KEYS}
    return {
        "pooled": pooled,
        "mean": {k: float(v.mean()) for k, v in values.items()},
        "std": {k: float(v.std(ddof=1)) if v.size > 1 else 0.0 for k, v in values.items()},
    }


def _counts_of(entry: dict) -> PixelCounts:
    (tn, fp), (fn, tp) = entry["metrics"]["confusion_matrix"]
    return PixelCounts(tp, fp, fn, tn)


def _image_entry(c: PixelCounts) -> dict[str, float]:
    """Per-image Dice and true / predicted foreground fractions (for ranking frames by content)."""
    n = c.tp + c.fp + c.fn + c.tn
    return {"dice": round(segmentation_metrics(c)["dice"], 4), "true_fraction": round((c.tp + c.fn) / n, 5),
            "predicted_fraction": round((c.tp + c.fp) / n, 5)}


def content_ratio_spearman(result: dict[str, Any]) -> float | None:
    """Spearman rank correlation, over every held-out image, between the predicted and the
    labelled content ratio (1 − foreground fraction): how well ``latticewatch sort`` would rank
    frames the net has never seen."""
    from scipy.stats import spearmanr

    pairs = [(e["true_fraction"], e["predicted_fraction"]) for f in result["model"]["per_fold"] for e in f.get("per_image", {}).values()]
    truth, predicted = (np.array(v, float) for v in zip(*pairs)) if pairs else (np.zeros(0), np.zeros(0))
    if len(pairs) < 3 or np.ptp(truth) == 0 or np.ptp(predicted) == 0:  # undefined: say so rather than NaN
        return None
    return float(spearmanr(truth, predicted).statistic)


def _fmt(metrics: dict) -> str:
    return f"Jaccard {metrics['jaccard']:.3f}  F1 {metrics['dice']:.3f}"


def cross_validate(
    data: Sequence[LabelledImage],
    config,
    *,
    folds: int = 5,
    fold_seed: int = 0,
    normalisation: Normalisation = "max",
    pixel_size_nm: float | str | None = None,
    val_fraction: float = 0.15,
    baselines: Sequence[str] = (),
    out_json: Path | None = None,
    resume: bool = False,
    command: str = "",
    progress: bool = True,
    report: Callable[[str], None] = log.info,
) -> dict[str, Any]:
    """Cross-validate ``config``'s architecture (and ``baselines``) on ``data``.

    Parameters
    ----------
    config
        `UNetTrainingConfig` of every fold's net (same seed each fold).
    folds, fold_seed
        Number of series-grouped folds and the seed that deals series to folds.
    val_fraction
        Inner validation split (whole series) of each fold's training images for early stopping;
        0 trains for exactly ``config.max_steps`` steps.
    baselines
        Names of ``training.baselines`` (e.g. ``"bragg"``), fitted on each training split.
    out_json
        Written after every fold, so an interrupted run keeps its finished folds; with
        ``resume`` the finished folds of a matching earlier run are reused.
    report
        Called with one line per finished fold (the CLI prints them).

    Returns
    -------
    dict
        Settings, fold assignment, and for ``model`` and each baseline: ``per_fold`` entries and
        ``pooled``, ``mean``, ``std`` metrics (see `summarise`).

    Examples
    --------
    >>> data = load_labelled(Path("images"), Path("labels"))  # doctest: +SKIP
    >>> cv = cross_validate(data, UNetTrainingConfig(augment="rotate"), baselines=["bragg"])  # doctest: +SKIP
    >>> cv["model"]["pooled"]["jaccard"], cv["baselines"]["bragg"]["pooled"]["jaccard"]  # doctest: +SKIP
    """
    from latticewatch.training.assess.baselines import make_baseline
    from latticewatch.training.fit.profile import evaluate_net
    from latticewatch.training.fit.unet import train_unet

    model_px = resolve_pixel_size(data, pixel_size_nm)
    prepared = prepare_labelled(data, normalisation=normalisation, pixel_size_nm=model_px)
    fold_names = group_folds(prepared.names, folds, fold_seed)
    run: dict[str, Any] = {
        "architecture": config.architecture, "widths": list(config.widths), "folds": folds, "fold_seed": fold_seed,
        "normalisation": normalisation, "pixel_size_nm": model_px, "val_fraction": val_fraction,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items() if k != "threads"},
        "fold_names": fold_names,
    }
    done: dict[int, dict] = {}
    done_baselines: dict[str, dict[int, dict]] = {}
    if resume and out_json is not None and out_json.is_file():
        earlier = json.loads(out_json.read_text())
        if all(earlier.get(k) == run[k] for k in _SAME_RUN_KEYS):
            done = {f["fold"]: f for f in earlier.get("model", {}).get("per_fold", [])}
            done_baselines = {name: {f["fold"]: f for f in b.get("per_fold", [])} for name, b in earlier.get("baselines", {}).items()}
            report(f"resuming: folds {sorted(done)} already done in {out_json}")
        else:
            report(f"{out_json} holds a run with other settings; starting afresh")
    result: dict[str, Any] = {
        **run, "command": command, "n_images": len(prepared.names), "n_series": len({series_of(n) for n in prepared.names}),
        "data": f"{len(prepared.names)} images, {len({series_of(n) for n in prepared.names})} series",
        "model": {"per_fold": []}, "baselines": {name: {"per_fold": []} for name in baselines},
    }
    for k, test_names in enumerate(fold_names, start=1):
        train_names = sorted(set(prepared.names) - set(test_names))
        test = prepared.subset(test_names)
        start = time.perf_counter()
        if k in done:
            entry = done[k]
        else:
            fit_names, val_names = validation_split(train_names, val_fraction, config.seed)
            fit, val = prepared.subset(fit_names), prepared.subset(val_names)
            trained = train_unet((fit.images, fit.masks), (val.images, val.masks) if val_names else None, config,
                                 progress=progress, desc=f"fold {k}/{folds} {config.architecture}")
            pooled, per_image = evaluate_net(trained.net, test)
            entry = {"fold": k, "n_test": len(test_names), "n_train": len(fit_names), "n_val": len(val_names),
                     "test_series": sorted({series_of(n) for n in test_names}), "steps": trained.steps, "best_step": trained.best_step,
                     "best_val_dice": trained.best_dice, "seconds": round(trained.seconds, 1), "metrics": segmentation_metrics(pooled),
                     "per_image": {n: _image_entry(c) for n, c in zip(test_names, per_image)}}
        result["model"]["per_fold"].append(entry)
        line = f"fold {k}/{folds}: {len(test_names)} test images — {config.architecture} {_fmt(entry['metrics'])}"
        for name in baselines:
            if k in done_baselines.get(name, {}):
                b_entry = done_baselines[name][k]
            else:
                train = prepared.subset(train_names)
                baseline = make_baseline(name).fit(train.images, train.masks)
                b_counts = PixelCounts.pooled((baseline.predict(x) for x in test.images), test.masks)
                b_entry = {"fold": k, "n_test": len(test_names), "n_train": len(train_names), "params": baseline.to_dict(),
                           "metrics": segmentation_metrics(b_counts)}
            result["baselines"][name]["per_fold"].append(b_entry)
            line += f" | {name} {_fmt(b_entry['metrics'])}"
        report(line + f" ({time.perf_counter() - start:.0f} s)")
        if out_json is not None:
            write_atomic(out_json, (json.dumps(result, indent=2) + "\n").encode())
    result["model"].update(summarise([_counts_of(f) for f in result["model"]["per_fold"]]))
    for name in baselines:
        result["baselines"][name].update(summarise([_counts_of(f) for f in result["baselines"][name]["per_fold"]]))
    result["model"]["content_ratio_spearman"] = content_ratio_spearman(result)
    best_steps = [f["best_step"] for f in result["model"]["per_fold"] if f.get("best_step")]
    result["model"]["median_best_step"] = int(np.median(best_steps)) if best_steps else None
    if out_json is not None:
        write_atomic(out_json, (json.dumps(result, indent=2) + "\n").encode())
    return result


def format_table(result: dict[str, Any]) -> str:
    """Human-readable table: per fold and overall Jaccard / F1 / precision / recall / accuracy."""
    rows = [("", "fold", "jaccard", "F1", "precision", "recall", "accuracy", "bal. acc.")]

    def add(method: str, block: dict) -> None:
        for f in block["per_fold"]:
            m = f["metrics"]
            rows.append((method, str(f["fold"]), *(f"{m[k]:.3f}" for k in ("jaccard", "dice", "precision", "recall", "accuracy", "balanced_accuracy"))))
        p, mean, std = block["pooled"], block["mean"], block["std"]
        rows.append((method, "pooled", *(f"{p[k]:.3f}" for k in ("jaccard", "dice", "precision", "recall", "accuracy", "balanced_accuracy"))))
        rows.append((method, "mean±sd", *(f"{mean[k]:.3f}±{std[k]:.3f}" for k in ("jaccard", "dice", "precision", "recall", "accuracy", "balanced_accuracy"))))

    add(result["architecture"], result["model"])
    for name, block in result.get("baselines", {}).items():
        add(name, block)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows)
