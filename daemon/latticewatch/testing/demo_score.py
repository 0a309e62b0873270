"""The demo's scoreboard: the daemon's answers about replayed labelled frames, held against their truth.

``latticewatch demo`` replays frames whose true particle masks and classes it knows
(`latticewatch.testing.replay.demo_frames`: the shipped abTEM frames, or the analytic generator's).
`DemoScore` is a sink of the running daemon: it gets each frame's events with the analysis they
were made from, so it pools the Dice overlap of the daemon's own class masks with the true masks
(no second analysis) and totals what a microscopist asks first: frames, particles, coverage,
defect fraction (with its interval, pooled over the frames), frames flagged. `format_summary`
prints it.

The statistics follow the daemon's rule (see `latticewatch.sinks.metrics`): a frame outside the
model's domain is counted as flagged and its particles, coverage and classes are left out; the
truth column covers the same frames. Dice pools every analysed frame whose truth is known.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from latticewatch.sinks.events import DEFECT_LABEL, ErrorEvent, Event, FrameEvent
from latticewatch.stages.defect_fraction import DefectConfusion, estimate_defect_fraction

#: The class a stacking fault is told apart from in the defect fraction.
NO_DEFECT_LABEL = "no_stacking_fault"


@dataclass(frozen=True)
class Truth:
    """What a replayed frame really holds: its particle mask (non-zero = particle) and each particle's class.

    Examples
    --------
    >>> truth = Truth(np.eye(4, dtype=np.uint8), ("stacking_fault", "misoriented"))
    >>> len(truth.labels), float(np.mean(truth.mask > 0))
    (2, 0.25)
    """

    mask: np.ndarray
    labels: tuple[str, ...]


def defect_fraction(counts: Counter[str]) -> float | None:
    """stacking_fault / (stacking_fault + no_stacking_fault); ``None`` when neither was found.

    Examples
    --------
    >>> defect_fraction(Counter(stacking_fault=1, no_stacking_fault=3, misoriented=5))
    0.25
    >>> defect_fraction(Counter(misoriented=2)) is None
    True
    """
    total = counts[DEFECT_LABEL] + counts[NO_DEFECT_LABEL]
    return counts[DEFECT_LABEL] / total if total else None


@dataclass
class _Side:
    """Totals of one column (the daemon's answers or the truth) over the frames in the model's domain."""

    frames: int = 0
    particles: int = 0
    coverage: float = 0.0  # summed over frames
    classes: Counter[str] = field(default_factory=Counter)

    def add(self, particles: int, coverage: float, classes: dict[str, int]) -> None:
        self.frames += 1
        self.particles += particles
        self.coverage += coverage
        self.classes.update(classes)

    def as_dict(self) -> dict[str, Any]:
        return {"particles": self.particles, "mean_coverage": self.coverage / self.frames if self.frames else None,
                "defect_fraction": defect_fraction(self.classes)}

    def estimate(self, confusion: DefectConfusion | None) -> dict[str, Any]:
        """`as_dict` with the defect fraction as the daemon gives it: corrected for ``confusion``, with its interval.

        The counts are pooled over the frames, so the interval is that of the whole run (not an average of the
        frames' intervals).
        """
        found = estimate_defect_fraction(self.classes[DEFECT_LABEL], self.classes[NO_DEFECT_LABEL], confusion)
        interval = None if found.estimate is None else [found.lower, found.upper]
        return {**self.as_dict(), "defect_fraction": found.estimate, "defect_interval": interval,
                "defect_corrected": found.corrected}


class DemoScore:
    """A sink that scores the daemon's frame events against the truth of the frames the demo replayed.

    Call `expect` with a frame's id and truth before the frame is written; `consume` gets the events.

    Examples
    --------
    >>> from latticewatch.frame import Analysis, Frame
    >>> from latticewatch.sinks.events import RunnerInfo, frame_events
    >>> from latticewatch.testing.replay import demo_frames
    >>> _, frames = demo_frames("synthetic:1", shape=(64, 64))
    >>> (frame, truth), = frames
    >>> score = DemoScore(); score.expect(frame.frame_id, truth)
    >>> perfect = Analysis(frame.frame_id, truth.mask, (), {}, {}, "demo", 0.05, 1.0)
    >>> score.consume(frame_events(frame, perfect, RunnerInfo(phases_s={}, latency_s=0, budget_ms=None,
    ...                                                        overrun=False)))
    >>> score.summary()["dice"]
    1.0
    """

    name = "demo-score"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._truths: dict[str, Truth] = {}  # replayed, not analysed yet
        self._replayed = 0
        self._confusion: DefectConfusion | None = None  # the profile's, from the first analysis
        self._daemon = _Side()
        self._truth = _Side()
        self._out_of_domain = 0
        self._quarantined = 0
        self._overlap = 0  # pixels in both the daemon's and the true mask, over the scored frames
        self._mask_pixels = 0  # pixels in either mask, counted once for each
        self._scored = 0

    def expect(self, frame_id: str, truth: Truth) -> None:
        """Hold the truth of a frame that is about to be replayed under ``frame_id``."""
        with self._lock:
            self._truths[frame_id] = truth
            self._replayed += 1

    def consume(self, events: Sequence[Event]) -> None:
        """Score the frame events (the analysis they carry) and count the quarantined frames."""
        for event in events:
            if isinstance(event, FrameEvent):
                self._score(event)
            elif isinstance(event, ErrorEvent) and event.event_id.endswith("/error"):
                with self._lock:
                    self._quarantined += 1
                    self._truths.pop(event.frame_id, None)

    def _score(self, event: FrameEvent) -> None:
        with self._lock:
            truth = self._truths.pop(event.frame_id, None)
            if event.out_of_domain:
                self._out_of_domain += 1
            else:
                self._daemon.add(event.particles, event.coverage, event.class_counts)
                if truth is not None:
                    self._truth.add(len(truth.labels), float(np.mean(truth.mask > 0)), Counter(truth.labels))
            if event.analysed is not None and self._confusion is None:
                self._confusion = event.analysed[1].defect_confusion
        # a frame read back from the ledger after a crash carries no analysis: it has no mask to score
        if truth is None or event.analysed is None:
            return
        found, true = event.analysed[1].mask > 0, truth.mask > 0
        overlap, pixels = int(np.count_nonzero(found & true)), int(np.count_nonzero(found) + np.count_nonzero(true))
        with self._lock:
            self._overlap += overlap
            self._mask_pixels += pixels
            self._scored += 1

    def summary(self) -> dict[str, Any]:
        """The totals so far, JSON-ready; ``None`` where a fraction is undefined.

        Keys: ``frames_replayed`` (handed to `expect`), ``frames_analysed``, ``out_of_domain``, ``quarantined``,
        ``daemon`` and ``truth`` (each ``particles``, ``mean_coverage``, ``defect_fraction`` over the frames in
        the model's domain; the daemon's also ``defect_interval``, the 95 % interval ``[lower, upper]`` of its
        estimate, and ``defect_corrected``, whether the estimate is corrected for the classifier's confusion),
        ``dice`` (pooled over ``dice_frames`` frames).
        """
        with self._lock:
            return {
                "frames_replayed": self._replayed,
                "frames_analysed": self._daemon.frames + self._out_of_domain,
                "out_of_domain": self._out_of_domain,
                "quarantined": self._quarantined,
                "daemon": self._daemon.estimate(self._confusion),
                "truth": self._truth.as_dict(),
                "dice": 2 * self._overlap / self._mask_pixels if self._mask_pixels else None,
                "dice_frames": self._scored,
            }


def _fraction(value: float | None, *, percent: bool = False) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.1f} %" if percent else f"{value:.2f}"


def _defect(side: dict[str, Any]) -> str:
    """``0.30 [0.09–0.61]``: the estimate with its interval where there is one."""
    interval = side.get("defect_interval")
    text = _fraction(side["defect_fraction"])
    return f"{text} [{interval[0]:.2f}–{interval[1]:.2f}]" if interval else text


def format_summary(summary: dict[str, Any]) -> str:
    """`DemoScore.summary` as the table the demo prints.

    Examples
    --------
    >>> side = {"particles": 12, "mean_coverage": 0.2, "defect_fraction": 0.25}
    >>> ours = {**side, "defect_fraction": 0.3, "defect_interval": [0.09, 0.61], "defect_corrected": False}
    >>> print(format_summary({"frames_replayed": 3, "frames_analysed": 2, "out_of_domain": 0, "quarantined": 1,
    ...                       "daemon": ours, "truth": side, "dice": 0.5, "dice_frames": 2}))
                                  daemon    truth
      frames                           2        3  (analysed, replayed)
      particles                       12       12
      mean coverage               20.0 %   20.0 %
      defect fraction   0.30 [0.09–0.61]     0.25  (95 % interval)
      Dice vs truth                 0.50           (particle masks, pooled over 2 frames)
      flagged           0 out of domain, 1 quarantined
    """
    daemon, truth = summary["daemon"], summary["truth"]
    defect_note = "95 % interval"
    if daemon.get("defect_corrected"):
        defect_note += "; corrected for the classifier's measured confusion"
    rows = [
        ("frames", str(summary["frames_analysed"]), str(summary["frames_replayed"]), "analysed, replayed"),
        ("particles", str(daemon["particles"]), str(truth["particles"]), ""),
        ("mean coverage", _fraction(daemon["mean_coverage"], percent=True),
         _fraction(truth["mean_coverage"], percent=True), ""),
        ("defect fraction", _defect(daemon), _fraction(truth["defect_fraction"]), defect_note),
        ("Dice vs truth", _fraction(summary["dice"]), "",
         f"particle masks, pooled over {summary['dice_frames']} frames"),
    ]
    lines = [f"  {'':<16}{'daemon':>18} {'truth':>8}"]
    lines += [f"  {name:<16}{ours:>18} {theirs:>8}" + (f"  ({note})" if note else "")
              for name, ours, theirs, note in rows]
    flagged = f"{summary['out_of_domain']} out of domain, {summary['quarantined']} quarantined"
    if summary["out_of_domain"]:
        flagged += " (out-of-domain frames are left out of the statistics above, not of Dice)"
    lines.append(f"  {'flagged':<18}{flagged}")
    return "\n".join(lines)
