"""Domain check: does a segmentation look like the model understood the frame?

A network trained on particles on thin carbon, shown something else (graphene, a thick film, a
frame at a wrong scale), does not answer "no particles": it typically paints the whole frame as one
"particle", or hovers near p = 0.5 everywhere. Both are visible in the probability map and the
labelled mask alone, so the check is a pure function of them and the profile's `DomainRules`.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator


class DomainRules(BaseModel):
    """When a frame is out of the model's domain (the manifest's ``domain`` table); ``None`` switches a test off.

    The defaults were checked on the real tiles of ``shared/data/real-nanoparticles`` and the demo's
    synthetic frames with the shipped nanoparticle profiles (0.1.0, max normalisation, and 0.2.0,
    z-score): the largest true particle fraction there is 0.86 (Au5nm_c31_r1, one particle touching
    all four edges, which 0.2.0 segments as 0.92), so a frame is flagged only where the segmentation
    itself is implausible: a region filling ≥ 95 % of the frame, or most pixels undecided.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_spanning_region_fraction: float | None = Field(
        0.95, gt=0, le=1,
        description="flag when the largest region touches all four edges and covers more than this fraction")
    max_foreground_fraction: float | None = Field(
        0.98, gt=0, le=1, description="flag when the foreground as a whole covers more than this fraction")
    uncertain_band: tuple[float, float] = Field(
        (0.3, 0.7), description="probabilities in this closed interval count as undecided")
    max_uncertain_fraction: float | None = Field(
        0.5, ge=0, le=1, description="flag when more than this fraction of pixels is undecided")

    @model_validator(mode="after")
    def _ordered_band(self) -> DomainRules:
        lo, hi = self.uncertain_band
        if not 0 <= lo <= hi <= 1:
            raise ValueError(f"uncertain_band must be 0 ≤ low ≤ high ≤ 1, got {self.uncertain_band}")
        return self


def _percent(fraction: float, digits: int = 1) -> str:
    return f"{100 * fraction:.{digits}f} %"


def _touches_all_edges(region: np.ndarray) -> bool:
    return bool(region[0].any() and region[-1].any() and region[:, 0].any() and region[:, -1].any())


def out_of_domain(probability: np.ndarray, labels: np.ndarray, rules: DomainRules) -> tuple[str, ...]:
    """Why the segmentation of a frame is not to be trusted; empty when it looks like the model's domain.

    Parameters
    ----------
    probability
        Foreground probability at model resolution.
    labels
        The isolated regions (0 background, 1…n regions) at the same resolution.
    rules
        The profile's thresholds.

    Examples
    --------
    >>> rules = DomainRules()
    >>> labels = np.ones((64, 64), np.int32)  # one "particle" filling the frame
    >>> out_of_domain(np.full((64, 64), 0.62, np.float32), labels, rules)[0]
    'one region spans the frame: 100.0 % of it, touching all four edges (limit 95 %)'
    >>> out_of_domain(np.zeros((64, 64), np.float32), np.zeros((64, 64), np.int32), rules)
    ()
    """
    reasons = []
    size = max(labels.size, 1)
    if rules.max_spanning_region_fraction is not None and labels.any():
        areas = np.bincount(labels.ravel())
        areas[0] = 0
        largest = int(areas.argmax())
        fraction = areas[largest] / size
        if fraction > rules.max_spanning_region_fraction and _touches_all_edges(labels == largest):
            reasons.append(f"one region spans the frame: {_percent(fraction)} of it, touching all four edges "
                           f"(limit {_percent(rules.max_spanning_region_fraction, 0)})")
    if rules.max_foreground_fraction is not None:
        fraction = np.count_nonzero(labels) / size
        if fraction > rules.max_foreground_fraction:
            reasons.append(f"foreground covers {_percent(fraction)} of the frame "
                           f"(limit {_percent(rules.max_foreground_fraction, 0)})")
    if rules.max_uncertain_fraction is not None:
        lo, hi = rules.uncertain_band
        fraction = np.count_nonzero((probability >= lo) & (probability <= hi)) / max(probability.size, 1)
        if fraction > rules.max_uncertain_fraction:
            reasons.append(f"probability near 0.5: {_percent(fraction)} of pixels with p in [{lo:g}, {hi:g}] "
                           f"(limit {_percent(rules.max_uncertain_fraction, 0)})")
    return tuple(reasons)
