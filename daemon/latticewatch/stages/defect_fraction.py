"""The defect fraction with the classifier's measured confusion taken into account, and its interval.

The defect fraction is stacking faults among particles on zone axis. A frame counts only the
particles the classifier labelled ``stacking_fault`` (``n_sf``) or ``no_stacking_fault``
(``n_nosf``), and the classifier errs in two ways: it swaps the two labels, and it labels some
particles of either class as another class or ``uncertain`` (it *abstains*), at different rates for
the two. With the rates measured on held-out data (`DefectConfusion`, the manifest's
``classifier.defect_confusion``),

    a = P(labelled SF | SF),  b = P(labelled no-SF | SF),  c = P(labelled SF | no-SF),  d = P(labelled no-SF | no-SF),

the labelled share ``q = n_sf / (n_sf + n_nosf)`` of a population whose true fraction is ``f`` is

    q = (f a + (1 − f) c) / (f (a + b) + (1 − f)(c + d)),

so ``f = (c − q (c + d)) / (q (a + b) − q (c + d) − a + c)``, computed as
``f = (c + d)(q − q₀) / ((c + d)(q − q₀) + (a + b)(q₁ − q))`` with ``q₀ = c / (c + d)`` and
``q₁ = a / (a + b)`` (the labelled shares at ``f = 0`` and ``f = 1``) and ``q`` clipped to
[q₀, q₁], which keeps ``f`` in [0, 1]. Without abstentions (a + b = c + d = 1) it is Rogan & Gladen
(1978), ``(q + Sp − 1) / (Se + Sp − 1)``; a correction that ignored the abstentions would be
biased whenever the two classes abstain at different rates.

The point estimate uses the held-out counts' rates. The interval is Bayesian and counts both
uncertainties, the frame's few particles and the held-out set's finite size: a Jeffreys Beta
posterior for ``q``, a Dirichlet(counts + ½) posterior for each row of the confusion (independent
data), Monte-Carlo draws pushed through the inversion, equal-tailed percentiles. Draws use fixed
seeds, so the same counts and confusion always give the same interval; the confusion's draws are
made once per confusion and cached, so one frame costs well under a millisecond. A classifier
whose labels say nothing about the class (``a d ≤ b c``: q₁ ≤ q₀) cannot be inverted; such draws
take ``f`` from a uniform prior. Without a confusion the interval is the Jeffreys interval of the
raw counts.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, field_validator, model_validator
from scipy.special import betaincinv

#: Monte-Carlo draws per interval: the 2.5 % percentile then moves by < 0.01 between seeds.
DRAWS = 4000
#: Fixed seeds: the same input gives the same interval, in every process.
_CONFUSION_SEED, _COUNTS_SEED = 1978, 2021
#: The Jeffreys prior Beta(½, ½) of every rate.
_PRIOR = 0.5


class DefectConfusion(BaseModel):
    """Held-out counts of particles truly stacking-fault or no-fault, by the label the classifier gave
    them: the manifest's ``classifier.defect_confusion``.

    Each row is (labelled ``stacking_fault``, labelled ``no_stacking_fault``, labelled anything else
    including ``uncertain``). Rows of two counts, written before the third column existed, read with
    a third count of 0.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    true_stacking_fault: tuple[NonNegativeInt, NonNegativeInt, NonNegativeInt] = Field(
        description="(labelled stacking_fault, labelled no_stacking_fault, labelled another class or uncertain)")
    true_no_stacking_fault: tuple[NonNegativeInt, NonNegativeInt, NonNegativeInt] = Field(
        description="(labelled stacking_fault, labelled no_stacking_fault, labelled another class or uncertain)")
    data: str = Field("", description="the held-out set these counts come from")

    @field_validator("true_stacking_fault", "true_no_stacking_fault", mode="before")
    @classmethod
    def _abstentions_default_to_none(cls, row: Any) -> Any:
        # manifests written before the third column recorded only the two labels
        if isinstance(row, (list, tuple)) and len(row) == 2:
            return (*row, 0)
        return row

    @model_validator(mode="after")
    def _both_classes_seen(self) -> DefectConfusion:
        # each class's rates are measured on its row: a row with no particle labelled SF or no-SF measures nothing
        if not sum(self.true_stacking_fault[:2]) or not sum(self.true_no_stacking_fault[:2]):
            raise ValueError("defect_confusion needs held-out particles of both classes labelled stacking_fault "
                             "or no_stacking_fault (a row's first two counts sum to 0)")
        return self

    @property
    def rates(self) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        """Each row as fractions: ((a, b, abstained), (c, d, abstained)) in the module's notation.

        Examples
        --------
        >>> c = DefectConfusion(true_stacking_fault=(15, 3, 2), true_no_stacking_fault=[3, 28])
        >>> c.true_no_stacking_fault
        (3, 28, 0)
        >>> c.rates[0]
        (0.75, 0.15, 0.1)
        """
        def fractions(row: tuple[int, int, int]) -> tuple[float, float, float]:
            total = sum(row)
            return (row[0] / total, row[1] / total, row[2] / total)

        return fractions(self.true_stacking_fault), fractions(self.true_no_stacking_fault)


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

    True faults abstain more often than fault-free particles here (10 % against 0 %), so fewer of
    them reach the count and the fraction is higher than Rogan–Gladen on the labelled two columns says:

    >>> c3 = DefectConfusion(true_stacking_fault=(75, 15, 10), true_no_stacking_fault=(10, 90, 0))
    >>> round(estimate_defect_fraction(30, 70, c3).estimate, 3)
    0.294
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
    (a, b, _), (c, d, _) = confusion.rates
    informative, point = _invert(raw, a, b, c, d)
    # a classifier whose labels say nothing about the class says nothing about f: its draws already hold the prior
    estimate = float(point) if informative else float(np.median(draws))
    return DefectEstimate(n_sf, n_nosf, raw, estimate, lower, upper, level, True)


def _invert(q: ArrayLike, a: ArrayLike, b: ArrayLike, c: ArrayLike, d: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Where the rates can be inverted, and there the true fraction f whose labelled share is ``q`` (module docstring).

    Scalars (the point estimate) or arrays of draws alike; ``a + b`` and ``c + d`` must be positive.
    ``q`` is clipped to [q₀, q₁] first: a share beyond what f = 0 or f = 1 gives means 0 or 1, and the
    form below then cannot leave [0, 1] nor divide by 0. Where the rates cannot be inverted f is NaN.
    """
    labelled_sf, labelled_nosf = a + b, c + d
    with np.errstate(divide="ignore", invalid="ignore"):
        q0, q1 = c / labelled_nosf, a / labelled_sf
        informative = q1 > q0  # ⇔ a d > b c
        q = np.clip(q, q0, np.maximum(q0, q1))
        towards_sf, towards_nosf = labelled_nosf * (q - q0), labelled_sf * (q1 - q)
        fraction = np.where(informative, towards_sf / (towards_sf + towards_nosf), np.nan)
    return informative, np.clip(fraction, 0.0, 1.0)


def _fraction_draws(n_sf: int, n_nosf: int, confusion: DefectConfusion) -> np.ndarray:
    """Posterior draws of the true fraction f given the counts and the confusion."""
    a, b, c, d, prior = _confusion_draws(confusion)
    observed = np.random.default_rng(_COUNTS_SEED).beta(n_sf + _PRIOR, n_nosf + _PRIOR, DRAWS)
    informative, fraction = _invert(observed, a, b, c, d)
    # draws that cannot be inverted leave f unconstrained by the counts
    return np.where(informative, fraction, prior)


@functools.lru_cache(maxsize=8)
def _confusion_draws(confusion: DefectConfusion) -> tuple[np.ndarray, ...]:
    """Draws of a, b, c, d from each row's Dirichlet(counts + ½) posterior, and of a uniform prior on f.

    A profile has one confusion, so this runs once per process; the arrays are read-only.
    """
    rng = np.random.default_rng(_CONFUSION_SEED)
    stacking_fault = rng.dirichlet(np.add(confusion.true_stacking_fault, _PRIOR), DRAWS)
    no_stacking_fault = rng.dirichlet(np.add(confusion.true_no_stacking_fault, _PRIOR), DRAWS)
    out = (stacking_fault[:, 0].copy(), stacking_fault[:, 1].copy(), no_stacking_fault[:, 0].copy(),
           no_stacking_fault[:, 1].copy(), rng.uniform(size=DRAWS))
    for array in out:
        array.flags.writeable = False
    return out
