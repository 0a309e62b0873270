"""When a frame is archived whole and lossless instead of reduced: the archive's safety valve.

A frame is reduced only when reduction is on, it has an analysis whose mask matches it, the
analysis is inside the model's domain, and the profile's `UncertaintyRule` trusts it. Every other
frame is kept bit-exact, and the reason is stored with it (``lossless_reason``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from latticewatch.errors import ConfigError
from latticewatch.frame import Analysis, Frame

__all__ = ["UncertaintyRule", "lossless_reason"]


@dataclass(frozen=True)
class UncertaintyRule:
    """When to distrust a segmentation and archive the frame whole and lossless.

    The profile sets the thresholds; ``None`` switches a test off. A confidence that is not a
    finite number counts as uncertain: when in doubt, keep everything. A frame the analyser flagged
    as outside the model's domain is always kept whole, whatever the thresholds.

    Examples
    --------
    >>> rule = UncertaintyRule(min_mean_confidence=0.9)
    >>> rule.reason_for(None)
    'no analysis'
    """

    min_mean_confidence: float | None = 0.8
    max_uncertain_fraction: float | None = None
    uncertain_band: tuple[float, float] = (0.2, 0.8)
    on_warnings: bool = False

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> UncertaintyRule:
        """Build from a profile's ``[archive.uncertain]`` table (unknown keys are an error).

        Examples
        --------
        >>> UncertaintyRule.from_mapping({"on_warnings": True}).on_warnings
        True
        """
        data = dict(data or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown uncertainty rule keys {unknown}: allowed are {sorted(names)}")
        if "uncertain_band" in data:
            data["uncertain_band"] = tuple(data["uncertain_band"])
        return cls(**data)

    def reason_for(self, analysis: Analysis | None) -> str | None:
        """Why the frame must be kept whole, or ``None`` when it may be reduced."""
        if analysis is None:
            return "no analysis"
        if analysis.out_of_domain:
            return "model out of domain: " + "; ".join(analysis.out_of_domain)
        if self.min_mean_confidence is not None:
            confidence = float(analysis.mean_confidence)
            if not math.isfinite(confidence) or confidence < self.min_mean_confidence:
                return f"uncertain segmentation: mean confidence {confidence:.3g} < {self.min_mean_confidence:g}"
        if self.max_uncertain_fraction is not None and analysis.probability is not None:
            lo, hi = self.uncertain_band
            p = analysis.probability
            fraction = float(np.count_nonzero((p > lo) & (p < hi))) / max(p.size, 1)
            if fraction > self.max_uncertain_fraction:
                return f"uncertain segmentation: {fraction:.1%} of pixels with p in ({lo:g}, {hi:g})"
        if self.on_warnings and analysis.warnings:
            return "analysis warnings: " + "; ".join(analysis.warnings)
        return None


def lossless_reason(
    frame: Frame,
    analysis: Analysis | None,
    *,
    reduce: bool,
    rule: UncertaintyRule | Callable[[Analysis | None], str | None],
) -> str | None:
    """Why ``frame`` must be archived whole and lossless, or ``None`` when it may be reduced.

    ``rule`` is an `UncertaintyRule` or any callable with the signature of its ``reason_for``.

    Examples
    --------
    >>> frame = Frame("a.mrc", np.zeros((4, 4), np.int16))
    >>> lossless_reason(frame, None, reduce=True, rule=UncertaintyRule())
    'no analysis'
    """
    if not reduce:
        return "reduce = false"
    if analysis is None:
        return "no analysis"
    if analysis.mask.shape != frame.pixels.shape:
        return f"mask shape {analysis.mask.shape} != frame shape {frame.pixels.shape}"
    return rule.reason_for(analysis) if isinstance(rule, UncertaintyRule) else rule(analysis)
