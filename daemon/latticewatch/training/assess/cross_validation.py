"""k-fold cross-validation of a segmentation net (and classical baselines) on labelled images,
grouped by acquisition series, as in Sadre et al. (2021) (fivefold).

Each fold's net is trained from scratch on the other folds (`latticewatch.training.fit.fold`: a
series-grouped inner validation split for early stopping, so the test fold never steers
training), then scored on the test fold. Baselines are fitted on the same training folds and
scored on the same test fold. Metrics are counted over pixels: per fold (pooled over the fold's
images), pooled over every test pixel of all folds, and as mean ± sample standard deviation of the
per-fold values.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from latticewatch.io.atomic import write_atomic
from latticewatch.stages.preprocess import Normalisation
from latticewatch.training.assess.baselines import make_baseline
from latticewatch.training.assess.metrics import METRIC_KEYS, PixelCounts, segmentation_metrics
from latticewatch.training.data.labelled import LabelledImage, group_folds, series_of
from latticewatch.training.data.supervised import (
    ExtraData,
    PreparedSet,
    prepare_extra,
    prepare_labelled,
    resolve_pixel_size,
)
from latticewatch.training.fit.fold import content_ratio_spearman, train_fold
from latticewatch.training.fit.unet import UNetTrainingConfig, recorded_config

log = logging.getLogger(__name__)

#: Settings that must agree for folds of an earlier (interrupted) run to be reused.
_SAME_RUN_KEYS = ("architecture", "widths", "folds", "fold_seed", "normalisation", "pixel_size_nm", "val_fraction",
                  "config", "fold_names", "extra_train")


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


def _fmt(metrics: dict) -> str:
    return f"Jaccard {metrics['jaccard']:.3f}  F1 {metrics['dice']:.3f}"


def _earlier_folds(out_json: Path | None, run: dict[str, Any], resume: bool,
                   report: Callable[[str], None]) -> tuple[dict[int, dict], dict[str, dict[int, dict]]]:
    """Finished model and baseline folds of an earlier run with the same settings (when resuming)."""
    if not (resume and out_json is not None and out_json.is_file()):
        return {}, {}
    earlier = json.loads(out_json.read_text())
    if not all(earlier.get(k) == run[k] for k in _SAME_RUN_KEYS):
        report(f"{out_json} holds a run with other settings; starting afresh")
        return {}, {}
    done = {f["fold"]: f for f in earlier.get("model", {}).get("per_fold", [])}
    done_baselines = {name: {f["fold"]: f for f in b.get("per_fold", [])}
                      for name, b in earlier.get("baselines", {}).items()}
    report(f"resuming: folds {sorted(done)} already done in {out_json}")
    return done, done_baselines


def _baseline_fold(name: str, prepared: PreparedSet, fold: int, test_names: Sequence[str]) -> dict[str, Any]:
    """A baseline fitted on the fold's training images and scored on its test images."""
    train_names = sorted(set(prepared.names) - set(test_names))
    train, test = prepared.subset(train_names), prepared.subset(test_names)
    baseline = make_baseline(name).fit(train.images, train.masks)
    counts = PixelCounts.pooled((baseline.predict(x) for x in test.images), test.masks)
    return {"fold": fold, "n_test": len(test_names), "n_train": len(train_names), "params": baseline.to_dict(),
            "metrics": segmentation_metrics(counts)}


def _summarise_result(result: dict[str, Any]) -> None:
    """Add pooled / mean / std metrics, the content-ratio ranking and the median best step."""
    result["model"].update(summarise([_counts_of(f) for f in result["model"]["per_fold"]]))
    for block in result["baselines"].values():
        block.update(summarise([_counts_of(f) for f in block["per_fold"]]))
    result["model"]["content_ratio_spearman"] = content_ratio_spearman(result)
    best_steps = [f["best_step"] for f in result["model"]["per_fold"] if f.get("best_step")]
    result["model"]["median_best_step"] = int(np.median(best_steps)) if best_steps else None


def _fold(k: int, test_names: Sequence[str], prepared: PreparedSet, config: UNetTrainingConfig, result: dict[str, Any],
          earlier: tuple[dict[int, dict], dict[str, dict[int, dict]]], *, val_fraction: float,
          extra: PreparedSet | None, progress: bool) -> str:
    """Fold ``k``: train (or reuse from ``earlier``) its net and baselines, add their entries to
    ``result``; the fold's report line."""
    done, done_baselines = earlier
    folds = len(result["fold_names"])
    entry = done.get(k) or train_fold(prepared, k, test_names, config, val_fraction=val_fraction, progress=progress,
                                      desc=f"fold {k}/{folds} {config.architecture}", extra=extra)
    result["model"]["per_fold"].append(entry)
    line = f"fold {k}/{folds}: {len(test_names)} test images — {config.architecture} {_fmt(entry['metrics'])}"
    for name, block in result["baselines"].items():
        b_entry = done_baselines.get(name, {}).get(k) or _baseline_fold(name, prepared, k, test_names)
        block["per_fold"].append(b_entry)
        line += f" | {name} {_fmt(b_entry['metrics'])}"
    return line


def _write_json(out_json: Path | None, result: dict[str, Any]) -> None:
    if out_json is not None:
        write_atomic(out_json, (json.dumps(result, indent=2) + "\n").encode())


def cross_validate(
    data: Sequence[LabelledImage],
    config: UNetTrainingConfig,
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
    extra: ExtraData | None = None,
    dataset: Path | None = None,
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
    extra
        Train-only images (e.g. simulated frames) mixed into every fold's training crops; never
        validated or tested on, and not given to the baselines.
    dataset
        The folder of the data read, against which a path in ``config.init`` is recorded.
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
    model_px = resolve_pixel_size(data, pixel_size_nm)
    prepared = prepare_labelled(data, normalisation=normalisation, pixel_size_nm=model_px)
    fold_names = group_folds(prepared.names, folds, fold_seed)
    extra_set, extra_source = (prepare_extra(extra, normalisation=normalisation, pixel_size_nm=model_px,
                                             progress=progress) if extra else (None, None))
    run: dict[str, Any] = {
        "architecture": config.architecture, "widths": list(config.widths), "folds": folds, "fold_seed": fold_seed,
        "normalisation": normalisation, "pixel_size_nm": model_px, "val_fraction": val_fraction,
        "config": {k: v for k, v in recorded_config(config, dataset).items() if k != "threads"},
        "fold_names": fold_names, "extra_train": extra_source,
    }
    earlier = _earlier_folds(out_json, run, resume, report)
    n_series = len({series_of(n) for n in prepared.names})
    result: dict[str, Any] = {
        **run, "command": command, "n_images": len(prepared.names), "n_series": n_series,
        "data": f"{len(prepared.names)} images, {n_series} series"
                + (f"; train-only extra: {extra_source}" if extra_source else ""),
        "model": {"per_fold": []}, "baselines": {name: {"per_fold": []} for name in baselines},
    }
    for k, test_names in enumerate(fold_names, start=1):
        start = time.perf_counter()
        line = _fold(k, test_names, prepared, config, result, earlier, val_fraction=val_fraction, extra=extra_set,
                     progress=progress)
        report(line + f" ({time.perf_counter() - start:.0f} s)")
        _write_json(out_json, result)
    _summarise_result(result)
    _write_json(out_json, result)
    return result


#: Metric columns of `format_table`, in order.
_TABLE_KEYS = ("jaccard", "dice", "precision", "recall", "accuracy", "balanced_accuracy")


def format_table(result: dict[str, Any]) -> str:
    """Human-readable table: per fold and overall Jaccard / F1 / precision / recall / accuracy.

    >>> print(format_table(cv))  # doctest: +SKIP
         fold  jaccard     F1  precision  recall  accuracy  bal. acc.
    fpn  1       0.802  0.890      0.871   0.910     0.952      0.936
    """
    rows = [("", "fold", "jaccard", "F1", "precision", "recall", "accuracy", "bal. acc.")]

    def add(method: str, block: dict) -> None:
        for f in block["per_fold"]:
            rows.append((method, str(f["fold"]), *(f"{f['metrics'][k]:.3f}" for k in _TABLE_KEYS)))
        p, mean, std = block["pooled"], block["mean"], block["std"]
        rows.append((method, "pooled", *(f"{p[k]:.3f}" for k in _TABLE_KEYS)))
        rows.append((method, "mean±sd", *(f"{mean[k]:.3f}±{std[k]:.3f}" for k in _TABLE_KEYS)))

    add(result["architecture"], result["model"])
    for name, block in result.get("baselines", {}).items():
        add(name, block)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)
