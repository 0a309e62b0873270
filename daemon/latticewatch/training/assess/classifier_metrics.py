"""How well a region classifier does on held-out crops, overall and per bin of the imaging conditions.

A classifier with an ``uncertain_below`` threshold abstains on some particles; the scores here are
of the particles it labels (the *confident* ones), next to the *coverage* (the share it labels) and
the scores it would have had labelling everything by its largest probability. The stacking-fault
question is scored on its own: among particles truly stacking_fault or no_stacking_fault, the
balanced accuracy of calling one of the two (by whichever of the two has the larger probability).

Conditions per particle (dose, size, defocus, material) come from the ``particles/NAME.json``
records of a `latticewatch simulate` data set.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from latticewatch.frame import CLASSES
from latticewatch.stages.defect_fraction import DefectConfusion

log = logging.getLogger(__name__)

SF, NOSF = CLASSES.index("stacking_fault"), CLASSES.index("no_stacking_fault")
#: Predicted index of a particle the classifier abstains on.
UNCERTAIN_INDEX = -1

#: Bin edges of the per-condition tables (a value on an edge goes to the upper bin).
BINS: dict[str, tuple[float, ...]] = {
    "dose_e_per_a2": (0, 500, 1000, 2000, 5000, np.inf),
    "size_nm": (0, 3, 4, 5, 6, np.inf),
    "abs_defocus_nm": (0, 10, 20, 35, np.inf),
}


def predicted_labels(probabilities: np.ndarray, uncertain_below: float | None) -> np.ndarray:
    """Class index of the largest probability, or `UNCERTAIN_INDEX` where it is below the threshold.

    >>> predicted_labels(np.array([[0.9, 0.1], [0.55, 0.45]]), 0.6).tolist()
    [0, -1]
    """
    predicted = probabilities.argmax(axis=1)
    if uncertain_below is not None:
        predicted = np.where(probabilities.max(axis=1) < uncertain_below, UNCERTAIN_INDEX, predicted)
    return predicted


def balanced_accuracy(y: np.ndarray, predicted: np.ndarray, classes: Sequence[int]) -> float | None:
    """Mean recall over the ``classes`` present in ``y`` (None when none is).

    >>> balanced_accuracy(np.array([0, 0, 1]), np.array([0, 1, 1]), [0, 1])
    0.75
    """
    recalls = [float(np.mean(predicted[y == c] == c)) for c in classes if np.any(y == c)]
    return float(np.mean(recalls)) if recalls else None


def _defect_part(y: np.ndarray, probabilities: np.ndarray, predicted: np.ndarray) -> dict[str, Any]:
    """Scores of the stacking-fault question among particles truly SF or no-SF."""
    two = (y == SF) | (y == NOSF)
    forced = np.where(probabilities[:, SF] >= probabilities[:, NOSF], SF, NOSF)
    labelled = two & ((predicted == SF) | (predicted == NOSF))
    return {
        "sf_vs_nosf_balanced_accuracy": balanced_accuracy(y[labelled], predicted[labelled], (SF, NOSF)),
        "sf_vs_nosf_balanced_accuracy_forced": balanced_accuracy(y[two], forced[two], (SF, NOSF)),
        "sf_vs_nosf_coverage": float(labelled.sum() / two.sum()) if two.any() else None,
        "defect_confusion": defect_confusion_counts(y, predicted),
    }


def defect_confusion_counts(y: np.ndarray, predicted: np.ndarray) -> dict[str, list[int]]:
    """The manifest's ``defect_confusion`` counts: truly SF / no-SF particles labelled SF, no-SF or anything else.

    The third count (another class or uncertain) matters: only the first two reach a frame's defect
    fraction, and the two classes lose different shares to the third.

    >>> defect_confusion_counts(np.array([0, 0, 0, 1, 1]), np.array([0, 1, 3, 1, -1]))
    {'true_stacking_fault': [1, 1, 1], 'true_no_stacking_fault': [0, 1, 1]}
    """
    def row(true: int) -> list[int]:
        labels = predicted[y == true]
        sf, nosf = int(np.sum(labels == SF)), int(np.sum(labels == NOSF))
        return [sf, nosf, int(labels.size) - sf - nosf]

    return {"true_stacking_fault": row(SF), "true_no_stacking_fault": row(NOSF)}


def defect_confusion(y: np.ndarray, predicted: np.ndarray, data: str) -> DefectConfusion | None:
    """The manifest's ``classifier.defect_confusion`` from held-out particles (``predicted`` −1 = uncertain);
    ``None``, with a warning, when the truly SF or the truly no-SF particles were never labelled one of the
    two: such a row measures nothing.

    >>> defect_confusion(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 3]), "held-out crops").true_no_stacking_fault
    (0, 1, 1)
    """
    counts = defect_confusion_counts(y, predicted)
    if not sum(counts["true_stacking_fault"][:2]) or not sum(counts["true_no_stacking_fault"][:2]):
        log.warning("the held-out images hold too few stacking-fault / no-fault particles labelled as either to "
                    "measure the classifier's confusion; the defect fraction will not be corrected for it")
        return None
    return DefectConfusion(**counts, data=data)


def classification_metrics(y: np.ndarray, probabilities: np.ndarray, uncertain_below: float | None) -> dict[str, Any]:
    """Scores of one held-out set: balanced accuracy (confident / all), coverage, confusion, SF-vs-no-SF.

    The confusion matrix has a row per true class and a column per class plus a last column
    ``uncertain``.

    Examples
    --------
    >>> p = np.eye(5)[[0, 1, 2, 3, 4, 0]] * 0.9 + 0.02
    >>> m = classification_metrics(np.array([0, 1, 2, 3, 4, 1]), p, 0.5)
    >>> m["balanced_accuracy_all"], m["coverage"], m["sf_vs_nosf_balanced_accuracy"]
    (0.9, 1.0, 0.75)
    """
    y = np.asarray(y)
    predicted = predicted_labels(probabilities, uncertain_below)
    confident = predicted != UNCERTAIN_INDEX
    everything = range(len(CLASSES))
    confusion = np.zeros((len(CLASSES), len(CLASSES) + 1), dtype=int)
    for true, pred in zip(y, predicted):
        confusion[true, pred] += 1  # UNCERTAIN_INDEX = -1 lands in the last column
    return {
        "n": int(y.size),
        "uncertain_below": uncertain_below,
        "coverage": float(confident.mean()) if y.size else None,
        "balanced_accuracy": balanced_accuracy(y[confident], predicted[confident], everything),
        "balanced_accuracy_all": balanced_accuracy(y, probabilities.argmax(axis=1), everything),
        "confusion_matrix": confusion.tolist(),
        "confusion_columns": [*CLASSES, "uncertain"],
        **_defect_part(y, probabilities, predicted),
    }


def particle_conditions(dataset: Path, image: str, instance: int) -> dict[str, Any]:
    """Dose, particle size, |defocus| and material of one crop, from ``dataset/particles/<image>.json``.

    Bare-carbon crops (instance 0) have material ``none`` and no size; an unreadable record gives {}.

    >>> particle_conditions(Path("sim/cls"), "sim_000000", 1)  # doctest: +SKIP
    {'dose_e_per_a2': 1928.8, 'abs_defocus_nm': 36.6, 'size_nm': 5.39, 'material': 'CdSe'}
    """
    try:
        record = json.loads((Path(dataset) / "particles" / f"{Path(image).stem}.json").read_text())
    except (OSError, ValueError):
        return {}
    out: dict[str, Any] = {"dose_e_per_a2": record.get("dose_e_per_a2"), "abs_defocus_nm": abs(record["defocus_nm"])
                           if record.get("defocus_nm") is not None else None, "size_nm": None, "material": "none"}
    for particle in record.get("particles", []):
        if particle.get("instance") == instance:
            out["size_nm"] = particle.get("size_nm", particle.get("equivalent_diameter_nm"))
            out["material"] = particle.get("material", "unknown")
    return out


def _bin_names(edges: Sequence[float]) -> list[str]:
    return [f"{lo:g}–{hi:g}" if np.isfinite(hi) else f"≥{lo:g}" for lo, hi in zip(edges[:-1], edges[1:])]


def condition_tables(y: np.ndarray, probabilities: np.ndarray, uncertain_below: float | None,
                     conditions: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per-bin scores (`classification_metrics` without the matrices) for dose, size, |defocus|, material.

    Examples
    --------
    >>> p = np.eye(5)[[0, 1]] * 0.9 + 0.02
    >>> t = condition_tables(np.array([0, 1]), p, None, [{"material": "Au"}, {"material": "Pd"}])
    >>> [row["bin"] for row in t["material"]]
    ['Au', 'Pd']
    """
    tables: dict[str, list[dict[str, Any]]] = {}
    keys = {**{name: None for name in BINS}, "material": None}
    for name in keys:
        values = [c.get(name) for c in conditions]
        if name in BINS:
            numeric = np.array([np.nan if v is None else float(v) for v in values])
            which = np.digitize(numeric, BINS[name][1:-1])
            groups = {label: (which == i) & np.isfinite(numeric) for i, label in enumerate(_bin_names(BINS[name]))}
        else:
            groups = {label: np.array([v == label for v in values]) for label in sorted({v for v in values if v})}
        rows = []
        for label, members in groups.items():
            if not members.any():
                continue
            m = classification_metrics(y[members], probabilities[members], uncertain_below)
            rows.append({"bin": label, **{k: v for k, v in m.items()
                                          if k not in ("confusion_matrix", "confusion_columns", "uncertain_below")}})
        tables[name] = rows
    return tables


def format_table(rows: list[dict[str, Any]], title: str) -> str:
    """A per-bin table as aligned text for the terminal.

    >>> print(format_table([{"bin": "Au", "n": 3, "coverage": 1.0, "balanced_accuracy": 0.5,
    ...                      "sf_vs_nosf_balanced_accuracy": None}], "material"))  # doctest: +NORMALIZE_WHITESPACE
    material        n  coverage  bal.acc  SF-vs-noSF
    Au              3      1.00     0.50           –
    """
    def number(value: float | None) -> str:
        return "–" if value is None else f"{value:.2f}"

    lines = [f"{title:<12} {'n':>4}  coverage  bal.acc  SF-vs-noSF"]
    for row in rows:
        lines.append(f"{row['bin']:<12} {row['n']:>4}  {number(row['coverage']):>8}  "
                     f"{number(row['balanced_accuracy']):>7}  {number(row['sf_vs_nosf_balanced_accuracy']):>10}")
    return "\n".join(lines)
