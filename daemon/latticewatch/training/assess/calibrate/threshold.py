"""``latticewatch calibrate threshold`` and ``calibrate baselines``: a profile's settings fitted on
a labelled set and written into its manifest (`latticewatch.models.manifest.update_manifest`: the
model files and their sha256 stay as they are, so the profile stays verifiable).

* `calibrate_threshold` — the decision threshold on the particle probability that maximises the
  Dice pooled over the set.
* `calibrate_baselines` — the classical baselines fitted once, so ``latticewatch evaluate``
  scores every data set with the same parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from latticewatch.models.manifest import MANIFEST_NAME, relative_path, update_manifest
from latticewatch.training.assess.metrics import PixelCounts, counts_above, pooled_dice, segmentation_metrics

#: Thresholds tried by ``calibrate threshold``.
THRESHOLD_GRID = np.round(np.arange(0.05, 0.9501, 0.01), 2)


def profile_directory(profile: str | Path) -> Path:
    """The directory of a profile given by name or path (calibration writes into it).

    >>> profile_directory("nanoparticles").name
    'latticewatch_nanoparticles'
    """
    from latticewatch.runtime.plugins import resolve_profile

    return resolve_profile(str(profile))[0]


def threshold_counts(probabilities: Sequence[np.ndarray], truths: Sequence[np.ndarray],
                     thresholds: np.ndarray) -> list[PixelCounts]:
    """Pooled confusion counts of ``p >= t`` for every ``t`` in (sorted) ``thresholds``.

    Returns
    -------
    list of PixelCounts
        One per threshold, summed over all images.

    Examples
    --------
    >>> threshold_counts([np.array([0.2, 0.7])], [np.array([False, True])], np.array([0.5, 0.8]))
    [PixelCounts(tp=1, fp=0, fn=0, tn=1), PixelCounts(tp=0, fp=0, fn=1, tn=1)]
    """
    fg_above, bg_above, n_fg, n_bg = counts_above(probabilities, truths, np.asarray(thresholds, np.float64))
    return [PixelCounts(int(tp), int(fp), n_fg - int(tp), n_bg - int(fp)) for tp, fp in zip(fg_above, bg_above)]


def _labelled_set(images_dir: Path, labels_dir: Path, n: int) -> str:
    """The manifest's ``data`` text of a calibration on a labelled set."""
    dataset = Path(images_dir).parent
    return (f"{n} labelled images in {relative_path(images_dir, dataset)} "
            f"(labels {relative_path(labels_dir, dataset)})")


@dataclass(frozen=True)
class ThresholdResult:
    old: float
    new: float
    dice_before: float
    dice_after: float
    n_images: int
    curve: list[tuple[float, float]]  # (threshold, pooled Dice)
    written: bool
    manifest_path: Path


def calibrate_threshold(
    profile: str | Path,
    images_dir: Path,
    labels_dir: Path,
    *,
    dry_run: bool = False,
    command: str = "",
    threads: int | None = None,
    progress: bool = False,
) -> ThresholdResult:
    """Choose the decision threshold (0.05–0.95, step 0.01) maximising pooled Dice; write it.

    The probability map is the one ``process`` computes (same analyser path as ``evaluate``).
    Both ``segmentation.threshold`` and ``isolation.threshold`` are set: the first is the
    network's pixel decision that ``evaluate`` scores, the second the one ``process`` isolates
    regions with, and they must not disagree. Ties go to the threshold nearest the old one.

    Examples
    --------
    >>> result = calibrate_threshold("profiles/np", Path("val/images"), Path("val/labels"))  # doctest: +SKIP
    >>> result.old, result.new, round(result.dice_after - result.dice_before, 3)  # doctest: +SKIP
    (0.5, 0.41, 0.012)
    """
    from latticewatch.runtime.analyser import Analyser
    from latticewatch.training.assess.evaluate import run_model
    from latticewatch.training.data.labelled import load_labelled

    directory = profile_directory(profile)
    analyser = Analyser(directory, threads=threads)
    old = analyser.manifest.segmentation.threshold
    data = load_labelled(Path(images_dir), Path(labels_dir))
    probabilities, truths = [], []
    for scored in run_model(analyser, data, progress=progress):
        probabilities.append(scored.probability)
        truths.append(scored.truth)
    counts = threshold_counts(probabilities, truths, THRESHOLD_GRID)
    dice = np.array([segmentation_metrics(c)["dice"] for c in counts])
    best = np.flatnonzero(dice >= dice.max() - 1e-12)
    new = float(THRESHOLD_GRID[best[np.argmin(np.abs(THRESHOLD_GRID[best] - old))]])
    dice_before = pooled_dice([p >= old for p in probabilities], truths)
    dice_after = float(dice.max())

    def change(m: dict[str, Any]) -> None:
        m["segmentation"]["threshold"] = new
        m.setdefault("isolation", {})["threshold"] = new
        m.setdefault("training", {})["threshold"] = {
            "command": command,
            "data": _labelled_set(images_dir, labels_dir, len(data)),
            "metrics": {"old": old, "new": new, "dice_before": round(dice_before, 6),
                        "dice_after": round(dice_after, 6), "n_images": len(data),
                        "searched": [float(THRESHOLD_GRID[0]), float(THRESHOLD_GRID[-1]), 0.01]},
        }

    update_manifest(directory, change, dry_run=dry_run)
    return ThresholdResult(old, new, dice_before, dice_after, len(data),
                           list(zip(THRESHOLD_GRID.tolist(), dice.tolist())), not dry_run, directory / MANIFEST_NAME)


def calibrate_baselines(
    profile: str | Path,
    images_dir: Path,
    labels_dir: Path,
    *,
    names: Sequence[str],
    dry_run: bool = False,
    command: str = "",
) -> dict[str, dict[str, Any]]:
    """Fit the named baselines on a labelled set (at the model's sampling) and store them.

    Returns the fitted parameters by name (as written to ``manifest.baselines``).

    >>> calibrate_baselines("nanoparticles", Path("fit/images"), Path("fit/labels"),
    ...                     names=["bragg"])["bragg"]["fitted_dice"]  # doctest: +SKIP
    0.71
    """
    from latticewatch.runtime.analyser import Analyser
    from latticewatch.training.assess.evaluate import fit_baselines, prepared_images
    from latticewatch.training.data.labelled import load_labelled

    directory = profile_directory(profile)
    analyser = Analyser(directory)
    data = load_labelled(Path(images_dir), Path(labels_dir))
    images, masks = prepared_images(analyser, data)
    fitted = {name: b.to_dict() for name, b in fit_baselines(names, images, masks).items()}

    def change(m: dict[str, Any]) -> None:
        m.setdefault("baselines", {}).update(fitted)
        m.setdefault("training", {})["baselines"] = {
            "command": command,
            "data": _labelled_set(images_dir, labels_dir, len(data)),
            "metrics": {name: {"fitted_dice": p["fitted_dice"]} for name, p in fitted.items()},
        }

    update_manifest(directory, change, dry_run=dry_run)
    return fitted
