"""Does the rolling defect fraction find the truth? Series of frames made of held-out particles.

Each series has a defect fraction ``f`` drawn uniformly from ``fraction_range``; each of its frames
holds ``particles_per_frame`` particles drawn with replacement from the held-out particles that are
truly stacking_fault (with probability ``f``) or no_stacking_fault. A particle brings the label the
classifier gave it (stacking_fault, no_stacking_fault, another class or uncertain), so the series
sees exactly the classifier's mistakes and abstentions on those particles. The truth of a series is
the share of truly faulted particles among all it drew (what a perfect classifier would report);
the rolling estimate is `latticewatch.stages.defect_fraction.estimate_defect_fraction` of the
counts labelled stacking_fault and no_stacking_fault over all its frames, corrected with the
manifest's ``defect_confusion``.

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
    """How the series are drawn."""

    n_series: int = 200
    frames: int = 50
    particles_per_frame: int = 4
    fraction_range: tuple[float, float] = (0.05, 0.95)
    tolerance: float = 0.05
    level: float = 0.95
    seed: int = 0


def defect_series(y: np.ndarray, predicted: np.ndarray, confusion: DefectConfusion | None,
                  spec: SeriesSpec = SeriesSpec()) -> dict[str, Any]:
    """Fraction of series whose rolling estimate is within ``spec.tolerance`` of the truth and whose
    interval covers it; ``y`` true and ``predicted`` class indices of held-out particles (-1 = uncertain).

    Examples
    --------
    >>> y = np.array([0] * 50 + [1] * 50)
    >>> r = defect_series(y, y.copy(), None, SeriesSpec(n_series=20, frames=20))
    >>> r["within_tolerance"], r["interval_covers"]
    (1.0, 1.0)
    """
    sf, nosf = np.flatnonzero(y == SF), np.flatnonzero(y == NOSF)
    if not sf.size or not nosf.size:
        raise ValueError("the defect series need held-out particles of both stacking_fault and no_stacking_fault")
    rng = np.random.default_rng(spec.seed)
    errors, covered, widths = [], [], []
    n = spec.frames * spec.particles_per_frame
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
    errors_arr = np.array(errors)
    return {
        "n_series": spec.n_series, "frames": spec.frames, "particles_per_frame": spec.particles_per_frame,
        "fraction_range": list(spec.fraction_range), "tolerance": spec.tolerance, "level": spec.level,
        "within_tolerance": float(np.mean(errors_arr <= spec.tolerance)),
        "interval_covers": float(np.mean(covered)),
        "within_and_covers": float(np.mean((errors_arr <= spec.tolerance) & np.array(covered))),
        "median_abs_error": float(np.median(errors_arr)),
        "median_interval_width": float(np.median(widths)) if widths else None,
        "corrected": confusion is not None,
        "held_out_particles": {"stacking_fault": int(sf.size), "no_stacking_fault": int(nosf.size)},
    }
