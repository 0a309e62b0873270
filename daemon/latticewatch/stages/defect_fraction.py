"""The defect fraction with the classifier's measured confusion taken into account, and its interval.

The defect fraction is stacking faults among particles on zone axis: ``n_sf / (n_sf + n_nosf)``
over the particles the classifier labelled ``stacking_fault`` or ``no_stacking_fault``. The
classifier mislabels some of them, so the observed rate ``p`` is not the true fraction ``θ``:

    p = θ · Se + (1 − θ) · (1 − Sp)

with ``Se`` (sensitivity: a true fault labelled a fault) and ``Sp`` (specificity: a fault-free
particle labelled fault-free) measured on held-out data (`DefectConfusion`, the manifest's
``classifier.defect_confusion``). The point estimate inverts this (Rogan & Gladen 1978),
``θ = (p + Sp − 1) / (Se + Sp − 1)``, clipped to [0, 1].

The interval is Bayesian and counts both uncertainties, the frame's few particles and the
held-out set's finite size: Jeffreys Beta posteriors for ``p``, ``Se`` and ``Sp`` (independent
data), Monte-Carlo draws pushed through the inversion, equal-tailed percentiles. Draws use fixed
seeds, so the same counts and confusion always give the same interval; the confusion's draws are
made once per confusion and cached, so one frame costs well under a millisecond. Without a
confusion the interval is the Jeffreys interval of the raw counts.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, model_validator
from scipy.special import betaincinv

#: Monte-Carlo draws per interval: the 2.5 % percentile then moves by < 0.01 between seeds.
DRAWS = 4000
#: Fixed seeds: the same input gives the same interval, in every process.
_CONFUSION_SEED, _COUNTS_SEED = 1978, 2021
#: The Jeffreys prior Beta(½, ½) of every rate.
_PRIOR = 0.5


class DefectConfusion(BaseModel):
    """Held-out counts among particles truly stacking-fault or no-fault that the classifier labelled
    one of the two (confidently): the manifest's ``classifier.defect_confusion``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    true_stacking_fault: tuple[NonNegativeInt, NonNegativeInt] = Field(
        description="(labelled stacking_fault, labelled no_stacking_fault)")
    true_no_stacking_fault: tuple[NonNegativeInt, NonNegativeInt] = Field(
        description="(labelled stacking_fault, labelled no_stacking_fault)")
    data: str = Field("", description="the held-out set these counts come from")

    @model_validator(mode="after")
    def _both_classes_seen(self) -> DefectConfusion:
        # sensitivity and specificity are each measured on one row: an empty row measures nothing
        if not sum(self.true_stacking_fault) or not sum(self.true_no_stacking_fault):
            raise ValueError("defect_confusion needs held-out particles of both classes (a row sums to 0)")
        return self

    @property
    def sensitivity(self) -> float:
        """True stacking faults labelled ``stacking_fault``, as a fraction.

        Examples
        --------
        >>> c = DefectConfusion(true_stacking_fault=(90, 10), true_no_stacking_fault=(5, 95))
        >>> c.sensitivity, c.specificity
        (0.9, 0.95)
        """
        tp, fn = self.true_stacking_fault
        return tp / (tp + fn)

    @property
    def specificity(self) -> float:
        """True fault-free particles labelled ``no_stacking_fault``, as a fraction."""
        fp, tn = self.true_no_stacking_fault
        return tn / (fp + tn)


@dataclass(frozen=True)
class DefectEstimate:
    """The defect fraction of some particles (one frame, or frames pooled), with its interval.

    ``stacking_fault`` and ``no_stacking_fault`` are the particles that entered it; ``raw`` is
    their plain ratio, ``estimate`` the fraction corrected for the classifier's confusion (``raw``
    when there is none), ``lower`` and ``upper`` the ``level`` interval. With no particles every
    fraction is ``None``.
    """

    stacking_fault: int
    no_stacking_fault: int
    raw: float | None
    estimate: float | None
    lower: float | None
    upper: float | None
    level: float = 0.95
    corrected: bool = False

    @property
    def counted(self) -> int:
        """Particles in the estimate."""
        return self.stacking_fault + self.no_stacking_fault

    def __str__(self) -> str:
        """``0.31 [0.18–0.47]``, or ``–`` without particles."""
        if self.estimate is None:
            return "–"
        return f"{self.estimate:.2f} [{self.lower:.2f}–{self.upper:.2f}]"


def estimate_defect_fraction(n_sf: int, n_nosf: int, confusion: DefectConfusion | None, *,
                             level: float = 0.95) -> DefectEstimate:
    """The defect fraction of ``n_sf`` stacking-fault and ``n_nosf`` fault-free particles, with an interval.

    Parameters
    ----------
    n_sf, n_nosf
        Particles labelled ``stacking_fault`` and ``no_stacking_fault`` (others do not count).
    confusion
        The classifier's held-out confusion; ``None``: no correction, Jeffreys interval on the counts.
    level
        Probability mass of the interval.

    Examples
    --------
    >>> str(estimate_defect_fraction(3, 7, None))
    '0.30 [0.09–0.61]'
    >>> c = DefectConfusion(true_stacking_fault=(80, 20), true_no_stacking_fault=(10, 90))
    >>> e = estimate_defect_fraction(30, 70, c)
    >>> e.raw, round(e.estimate, 3), e.lower < e.estimate < e.upper
    (0.3, 0.286, True)
    >>> estimate_defect_fraction(0, 0, c).estimate is None
    True
    """
    if n_sf < 0 or n_nosf < 0:
        raise ValueError(f"particle counts must be >= 0, got {n_sf}, {n_nosf}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    n = n_sf + n_nosf
    if n == 0:
        return DefectEstimate(0, 0, None, None, None, None, level, confusion is not None)
    raw = n_sf / n
    tail = (1 - level) / 2
    if confusion is None:
        lower = 0.0 if n_sf == 0 else float(betaincinv(n_sf + _PRIOR, n_nosf + _PRIOR, tail))
        upper = 1.0 if n_nosf == 0 else float(betaincinv(n_sf + _PRIOR, n_nosf + _PRIOR, 1 - tail))
        return DefectEstimate(n_sf, n_nosf, raw, raw, lower, upper, level, False)
    draws = _fraction_draws(n_sf, n_nosf, confusion)
    lower, upper = (float(q) for q in np.quantile(draws, (tail, 1 - tail)))
    youden = confusion.sensitivity + confusion.specificity - 1
    # a classifier no better than chance says nothing about θ: its draws already hold the prior
    point = (raw + confusion.specificity - 1) / youden if youden > 0 else float(np.median(draws))
    return DefectEstimate(n_sf, n_nosf, raw, min(max(point, 0.0), 1.0), lower, upper, level, True)


def _fraction_draws(n_sf: int, n_nosf: int, confusion: DefectConfusion) -> np.ndarray:
    """Posterior draws of the true fraction θ given the counts and the confusion."""
    false_positive, youden, prior = _confusion_draws(confusion)
    observed = np.random.default_rng(_COUNTS_SEED).beta(n_sf + _PRIOR, n_nosf + _PRIOR, DRAWS)
    with np.errstate(divide="ignore", invalid="ignore"):
        theta = (observed - false_positive) / youden
    # draws where Se + Sp ≤ 1 cannot be inverted: θ is then unconstrained by the counts
    theta = np.where(youden > 0, theta, prior)
    return np.clip(theta, 0.0, 1.0)


@functools.lru_cache(maxsize=8)
def _confusion_draws(confusion: DefectConfusion) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draws of 1 − Sp and Se + Sp − 1 from their Jeffreys posteriors, and of a uniform prior on θ.

    A profile has one confusion, so this runs once per process; the arrays are read-only.
    """
    rng = np.random.default_rng(_CONFUSION_SEED)
    tp, fn = confusion.true_stacking_fault
    fp, tn = confusion.true_no_stacking_fault
    sensitivity = rng.beta(tp + _PRIOR, fn + _PRIOR, DRAWS)
    specificity = rng.beta(tn + _PRIOR, fp + _PRIOR, DRAWS)
    out = (1.0 - specificity, sensitivity + specificity - 1.0, rng.uniform(size=DRAWS))
    for array in out:
        array.flags.writeable = False
    return out
