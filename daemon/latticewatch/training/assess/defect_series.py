"""Does the rolling defect fraction find the truth? Series of frames made of held-out particles.

Each series has a defect fraction ``f`` drawn uniformly from ``fraction_range``; each of its frames
holds ``particles_per_frame`` particles drawn with replacement from the held-out particles that are
truly stacking_fault (with probability ``f``) or no_stacking_fault. A particle brings the label the
classifier gave it (stacking_fault, no_stacking_fault, another class or uncertain), so the series
sees exactly the classifier's mistakes and abstentions on those particles. The truth of a series is
the share of truly faulted particles among all it drew (what a perfect classifier would report);
the rolling estimate is `latticewatch.stages.defect_fraction.estimate_defect_fraction` of the
counts labelled stacking_fault and no_stacking_fault over all its frames, corrected with the
manifest's ``defect_confusion``. A series is as long as the daemon's default rolling window
(``[metrics] rolling_frames``, 100 frames), and the check runs at 2, 4 and 10 particles a frame: how
close the rolling estimate gets depends on how many particles the window holds.

The confusion should come from other held-out data than the particles resampled here (the trainer
uses the validation images for it and the test images here), or the check flatters itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from latticewatch.frame import CLASSES
from latticewatch.stages.defect_fraction import DefectConfusion, estimate_defect_fraction

SF, NOSF = CLASSES.index("stacking_fault"), CLASSES.index("no_stacking_fault")


@dataclass(frozen=True)
class SeriesSpec:
    """How the series are drawn: ``frames`` is the daemon's default ``rolling_frames``; the result is
    reported for ``particles_per_frame`` and, in a table beside it, for ``compare_particles_per_frame``,
    since how close the rolling estimate gets depends on how many particles its window holds."""

    n_series: int = 200
    frames: int = 100
    particles_per_frame: int = 4
    compare_particles_per_frame: tuple[int, ...] = (2, 10)
    fraction_range: tuple[float, float] = (0.05, 0.95)
    tolerance: float = 0.05
    level: float = 0.95
    seed: int = 0


def defect_series(y: np.ndarray, predicted: np.ndarray, confusion: DefectConfusion | None,
                  spec: SeriesSpec = SeriesSpec()) -> dict[str, Any]:
    """Fraction of series whose rolling estimate is within ``spec.tolerance`` of the truth and whose
    interval covers it; ``y`` true and ``predicted`` class indices of held-out particles (-1 = uncertain).

    The top-level scores are those at ``spec.particles_per_frame``; ``table`` holds one row per
    particles-per-frame setting (the same series fractions and seed for each).

    Examples
    --------
    >>> y = np.array([0] * 50 + [1] * 50)
    >>> r = defect_series(y, y.copy(), None, SeriesSpec(n_series=20, frames=20))
    >>> r["within_tolerance"], r["interval_covers"], [row["particles_per_frame"] for row in r["table"]]
    (1.0, 1.0, [2, 4, 10])
    """
    sf, nosf = np.flatnonzero(y == SF), np.flatnonzero(y == NOSF)
    if not sf.size or not nosf.size:
        raise ValueError("the defect series need held-out particles of both stacking_fault and no_stacking_fault")
    settings = sorted({spec.particles_per_frame, *spec.compare_particles_per_frame})
    table = [_series_scores(sf, nosf, predicted, confusion, spec, n) for n in settings]
    headline = next(row for row in table if row["particles_per_frame"] == spec.particles_per_frame)
    return {
        "n_series": spec.n_series, "frames": spec.frames, "fraction_range": list(spec.fraction_range),
        "tolerance": spec.tolerance, "level": spec.level, **headline, "table": table,
        "corrected": confusion is not None,
        "held_out_particles": {"stacking_fault": int(sf.size), "no_stacking_fault": int(nosf.size)},
    }


def _series_scores(sf: np.ndarray, nosf: np.ndarray, predicted: np.ndarray, confusion: DefectConfusion | None,
                   spec: SeriesSpec, particles_per_frame: int) -> dict[str, Any]:
    """One row of the table: ``spec.n_series`` series of ``spec.frames`` frames of ``particles_per_frame``."""
    rng = np.random.default_rng(spec.seed)
    errors, covered, widths = [], [], []
    n = spec.frames * particles_per_frame
    for _ in range(spec.n_series):
        fraction = rng.uniform(*spec.fraction_range)
        faulted = rng.random(n) < fraction
        drawn = np.where(faulted, rng.choice(sf, n), rng.choice(nosf, n))
        labels = predicted[drawn]
        estimate = estimate_defect_fraction(int(np.sum(labels == SF)), int(np.sum(labels == NOSF)), confusion,
                                            level=spec.level)
        truth = float(faulted.mean())
        if estimate.estimate is None:  # nothing labelled SF or no-SF: a miss on both counts
            errors.append(np.inf)
            covered.append(False)
            continue
        errors.append(abs(estimate.estimate - truth))
        covered.append(estimate.lower <= truth <= estimate.upper)
        widths.append(estimate.upper - estimate.lower)
    errors_arr, covered_arr = np.array(errors), np.array(covered)
    return {
        "particles_per_frame": particles_per_frame, "particles_per_series": n,
        "within_tolerance": float(np.mean(errors_arr <= spec.tolerance)),
        "interval_covers": float(np.mean(covered_arr)),
        "within_and_covers": float(np.mean((errors_arr <= spec.tolerance) & covered_arr)),
        "median_abs_error": float(np.median(errors_arr)),
        "median_interval_width": float(np.median(widths)) if widths else None,
    }


def format_series_table(result: dict[str, Any]) -> str:
    """The result's table as aligned text for the terminal.

    >>> row = {"particles_per_frame": 4, "particles_per_series": 400, "within_tolerance": 0.9,
    ...        "interval_covers": 0.96, "median_abs_error": 0.021, "median_interval_width": 0.12}
    >>> print(format_series_table({"tolerance": 0.05, "table": [row]}))  # doctest: +NORMALIZE_WHITESPACE
    particles/frame  particles/series  within ±0.05  interval covers  median |error|  median width
                  4               400          0.90             0.96           0.021          0.12
    """
    def number(value: float | None, digits: int) -> str:
        return "–" if value is None else f"{value:.{digits}f}"

    tolerance = f"within ±{result['tolerance']}"
    lines = [f"particles/frame  particles/series  {tolerance}  interval covers  median |error|  median width"]
    for row in result["table"]:
        lines.append(f"{row['particles_per_frame']:>15}  {row['particles_per_series']:>16}  "
                     f"{number(row['within_tolerance'], 2):>{len(tolerance)}}  "
                     f"{number(row['interval_covers'], 2):>15}  {number(row['median_abs_error'], 3):>14}  "
                     f"{number(row['median_interval_width'], 2):>12}")
    return "\n".join(lines)
