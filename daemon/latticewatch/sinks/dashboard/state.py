"""What the live dashboard shows, aggregated in memory (bounded) from the events of the durable log.

`DashboardState.add_analysis` (a frame event's analysis) and `DashboardState.add_runner_event` are
called from the event log's writers (the pipeline's threads), so they only append to bounded
deques and bump counters under a lock; histograms and the snapshot sent to the page are
computed on demand by the HTTP side (`snapshot`), at most a few times a second.

`Verdict` is the closed loop to acquisition: keep or skip the area a frame came from, by a
configurable rule on particle count and coverage.

A frame outside the model's domain (``Analysis.out_of_domain``) is counted and marked, and its
particles are left out of every statistic (class totals, sizes, defect fractions): its verdict is
``unknown``, since the model's particles there cannot be trusted either way.

Every defect fraction shown is the estimate corrected for the classifier's confusion with its 95 %
interval (`latticewatch.stages.defect_fraction`); the rolling one pools the particle counts of the
last ``rolling`` frames and is computed once per frame, as it arrives.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from latticewatch.frame import CLASSES, Analysis, Frame
from latticewatch.sinks.events import ErrorEvent, Event, FrameEvent, WarningEvent
from latticewatch.stages.defect_fraction import DefectConfusion, DefectEstimate, estimate_defect_fraction

#: The classes of the defect fraction: stacking fault among particles on zone axis.
FAULT, NO_FAULT = "stacking_fault", "no_stacking_fault"


@dataclass(frozen=True)
class VerdictRule:
    """Skip a frame's area when it has fewer than ``min_particles`` particles or less than ``min_coverage``.

    Examples
    --------
    >>> rule = VerdictRule(min_particles=3, min_coverage=0.02)
    >>> rule.decide(particle_count=5, coverage=0.1)
    'keep'
    >>> rule.decide(particle_count=2, coverage=0.1)
    'skip'
    >>> str(rule)
    'skip when particle_count < 3 or coverage < 0.02'
    """

    min_particles: int = 1
    min_coverage: float = 0.0

    def decide(self, *, particle_count: int, coverage: float) -> str:
        return "skip" if particle_count < self.min_particles or coverage < self.min_coverage else "keep"

    def __str__(self) -> str:
        return f"skip when particle_count < {self.min_particles} or coverage < {self.min_coverage:g}"


def verdict_for(frame: Frame, analysis: Analysis, rule: VerdictRule) -> dict[str, Any]:
    """The JSON answered by ``GET /api/verdict/latest`` (and written to the verdict file).

    ``verdict`` is ``keep`` or ``skip`` by the rule, or ``unknown`` for a frame outside the model's
    domain (``out_of_domain`` says why).

    Examples
    --------
    >>> verdict_for(frame, analysis, VerdictRule())  # doctest: +SKIP
    {'frame_id': 'scope:grid1.mrc#3', 'particle_count': 12, 'coverage': 0.081, 'defect_fraction': 0.25,
     'verdict': 'keep', 'rule': 'skip when particle_count < 1 or coverage < 0', ...}
    """
    count, coverage, defect = len(analysis.regions), analysis.coverage, analysis.defect
    return {
        "frame_id": frame.frame_id,
        "particle_count": count,
        "coverage": round(coverage, 6),
        "defect_fraction": defect.estimate,
        "defect_fraction_lower": defect.lower,
        "defect_fraction_upper": defect.upper,
        "verdict": "unknown" if analysis.out_of_domain else rule.decide(particle_count=count, coverage=coverage),
        "rule": str(rule),
        "out_of_domain": list(analysis.out_of_domain),
        "origin": frame.origin,
        "analysed_at": time.time(),
    }


def _nice_width(span: float, bins: int) -> float:
    """A 1-2-5 bin width so that about ``bins`` bins cover ``span``."""
    raw = max(span / max(bins, 1), 1e-9)
    exp = 10 ** math.floor(math.log10(raw))
    return next(m * exp for m in (1, 2, 2.5, 5, 10) if m * exp >= raw)


def _rounded(fraction: float | None) -> float | None:
    return None if fraction is None else round(fraction, 4)


def _interval(estimate: DefectEstimate) -> dict[str, float | None]:
    return {"lower": _rounded(estimate.lower), "upper": _rounded(estimate.upper)}


def size_histograms(diameters: np.ndarray, labels: np.ndarray, *, bins: int = 16,
                    confusion: DefectConfusion | None = None) -> dict[str, Any]:
    """Counts per class per diameter bin, and the defect fraction per bin (corrected by ``confusion``) with its
    95 % interval (``defect_interval``).

    Bins start at 0 with a 1-2-5 width chosen to cover the 99th percentile (larger values fall in
    the last bin), so outliers do not squash the plot.

    Examples
    --------
    >>> h = size_histograms(np.array([1.0, 2.0, 2.2, 7.0]), np.array(["stacking_fault", "no_stacking_fault",
    ...                     "stacking_fault", "empty"]), bins=4)
    >>> h["edges"], h["counts"]["stacking_fault"], h["defect_fraction"]
    ([0, 2, 4, 6, 8], [1, 1, 0, 0], [1.0, 0.5, None, None])
    >>> h["oriented"], h["defect_interval"][1]
    ([1, 2, 0, 0], {'lower': 0.0608, 'upper': 0.9392})
    """
    if diameters.size == 0:
        return {"edges": [], "counts": {}, "defect_fraction": [], "defect_interval": [], "oriented": []}
    top = float(np.percentile(diameters, 99)) if diameters.size > 20 else float(diameters.max())
    width = _nice_width(max(top, 1e-6), bins)
    n = max(1, int(math.ceil(top / width + 1e-9)))
    if n * width <= top:  # the maximum sits on the last edge
        n += 1
    index = np.minimum((diameters / width).astype(int), n - 1)
    counts = {}
    for name in sorted(set(labels.tolist()), key=lambda c: (CLASSES + (c,)).index(c)):
        counts[name] = np.bincount(index[labels == name], minlength=n).tolist()
    fault = np.bincount(index[labels == FAULT], minlength=n)
    clean = np.bincount(index[labels == NO_FAULT], minlength=n)
    estimates = [estimate_defect_fraction(int(f), int(c), confusion) for f, c in zip(fault, clean)]
    return {"edges": [round(i * width, 6) for i in range(n + 1)], "counts": counts,
            "defect_fraction": [_rounded(e.estimate) for e in estimates],
            "defect_interval": [_interval(e) for e in estimates], "oriented": (fault + clean).tolist()}


class DashboardState:
    """Bounded, thread-safe aggregates for the page.

    Parameters
    ----------
    history
        Frames kept for the time series.
    particles
        Particles kept for the size distributions (the most recent ones).
    errors
        Recent error and warning events kept.
    budget_ms
        The runtime budget, shown next to the latency.
    rule
        The verdict rule.

    Examples
    --------
    >>> from latticewatch.sinks.events import error_event
    >>> state = DashboardState(history=100)
    >>> state.add_runner_event(error_event("cam:1", "", "bad header"))
    >>> state.snapshot()["errors"][0]["problem"]
    'bad header'
    """

    def __init__(self, *, history: int = 1000, particles: int = 20000, errors: int = 50, budget_ms: float | None = None,
                 rule: VerdictRule = VerdictRule(), rolling: int = 20) -> None:
        self._lock = threading.Lock()
        self.frames: deque[dict[str, Any]] = deque(maxlen=history)
        self.particles: deque[tuple[float, str]] = deque(maxlen=particles)
        self.errors: deque[dict[str, Any]] = deque(maxlen=errors)
        self.latencies: deque[dict[str, Any]] = deque(maxlen=history)
        self.arrivals: deque[float] = deque(maxlen=4096)
        self.class_totals: dict[str, int] = dict.fromkeys(CLASSES, 0)
        self.totals = {"frames": 0, "particles": 0, "errors": 0, "warnings": 0, "overruns": 0, "out_of_domain": 0}
        self.budget_ms = budget_ms
        self.rule = rule
        self.rolling = rolling
        self._window: deque[tuple[int, int]] = deque(maxlen=rolling)  # (faults, no faults) of the last frames
        self.defect_confusion: DefectConfusion | None = None  # the latest frame's: corrects the size-bin fractions
        self.size_unit = "nm"
        self.verdict: dict[str, Any] | None = None
        self.thumbnail: dict[str, Any] = {"version": 0, "frame_id": None, "out_of_domain": []}
        self.version = 0  # bumped on every change; the broadcaster sends when it moves
        self.started = time.time()

    def add_analysis(self, frame: Frame, analysis: Analysis) -> dict[str, Any]:
        """Record one analysed frame; returns its verdict. Cheap: appends and counters only.

        The particles of a frame outside the model's domain are not counted anywhere.
        """
        doubtful = bool(analysis.out_of_domain)
        trusted = () if doubtful else analysis.regions
        counts = dict.fromkeys(CLASSES, 0) if doubtful else analysis.class_counts()
        verdict = verdict_for(frame, analysis, self.rule)
        defect = analysis.defect
        now = time.time()
        sizes = []
        px_only = analysis.pixel_size_nm is None
        for r in trusted:
            d = r.equivalent_diameter_nm
            if d is None:  # no pixel size: the page says px
                d = math.sqrt(4 * r.area_px / math.pi)
            sizes.append((float(d), r.label))
        with self._lock:
            if px_only and not self.frames:
                self.size_unit = "px"
            elif not px_only:
                self.size_unit = "nm"
            # pooled over the last `rolling` frames (a frame outside the domain adds nothing), estimated once here
            self._window.append((counts.get(FAULT, 0), counts.get(NO_FAULT, 0)))
            rolling = estimate_defect_fraction(sum(f for f, _ in self._window), sum(c for _, c in self._window),
                                               analysis.defect_confusion)
            self.defect_confusion = analysis.defect_confusion
            self.frames.append({"t": now, "frame_id": frame.frame_id, "particles": len(analysis.regions),
                                "coverage": round(analysis.coverage, 5),
                                "defect_fraction": _rounded(defect.estimate), "defect": _interval(defect),
                                "rolling": _rounded(rolling.estimate), "rolling_interval": _interval(rolling),
                                "out_of_domain": bool(analysis.out_of_domain),
                                "seconds": round(sum(analysis.timings_s.values()), 5)})
            self.particles.extend(sizes)
            self.arrivals.append(time.monotonic())
            for name, n in counts.items():
                self.class_totals[name] = self.class_totals.get(name, 0) + n
            self.totals["frames"] += 1
            self.totals["particles"] += len(trusted)
            self.totals["out_of_domain"] += int(doubtful)
            self.verdict = verdict
            self.version += 1
        return verdict

    def add_runner_event(self, event: Event) -> None:
        """One event from the durable log: runner timings of ``frame`` events, ``error`` and ``warning`` events."""
        with self._lock:
            if isinstance(event, FrameEvent):
                runner = event.runner
                self.latencies.append({"frame_id": event.frame_id, "latency_s": runner.latency_s,
                                       "service_s": round(sum(runner.phases_s.values()), 6), "overrun": runner.overrun})
                self.totals["overruns"] += int(runner.overrun)
                if runner.budget_ms is not None:
                    self.budget_ms = runner.budget_ms
            elif isinstance(event, (ErrorEvent, WarningEvent)):
                self.errors.append({"type": event.type, "at": event.at, "frame_id": event.frame_id,
                                    "origin": event.origin, "problem": event.problem})
                self.totals["errors" if event.type == "error" else "warnings"] += 1
            else:
                return
            self.version += 1

    def set_thumbnail(self, frame_id: str, out_of_domain: tuple[str, ...] = ()) -> int:
        with self._lock:
            self.thumbnail = {"version": self.thumbnail["version"] + 1, "frame_id": frame_id,
                              "out_of_domain": list(out_of_domain)}
            self.version += 1
            return self.thumbnail["version"]

    def _throughput(self) -> float:
        now = time.monotonic()
        recent = [t for t in self.arrivals if now - t <= 60.0]
        if len(recent) < 2:
            return 0.0
        return round((len(recent) - 1) / max(recent[-1] - recent[0], 1e-6), 4)

    def snapshot(self) -> dict[str, Any]:
        """Everything the page draws, as JSON-ready data (histograms computed here, not in the pipeline)."""
        with self._lock:
            frames = list(self.frames)
            particles = list(self.particles)
            latencies = list(self.latencies)
            confusion = self.defect_confusion
            snap = {
                "version": self.version, "now": time.time(), "started": self.started, "totals": dict(self.totals),
                "class_totals": dict(self.class_totals), "errors": list(self.errors)[::-1], "verdict": self.verdict,
                "thumbnail": dict(self.thumbnail), "budget_ms": self.budget_ms, "size_unit": self.size_unit,
                "throughput_fps": self._throughput(), "rule": str(self.rule),
            }
        snap["series"] = frames  # each frame's dict is complete when appended and never changed
        if particles:
            d = np.fromiter((p[0] for p in particles), float, len(particles))
            labels = np.array([p[1] for p in particles])
            snap["sizes"] = size_histograms(d, labels, confusion=confusion)
        else:
            snap["sizes"] = size_histograms(np.empty(0), np.empty(0, dtype=str))
        lat = [x["latency_s"] for x in latencies if x["latency_s"] is not None]
        svc = [x["service_s"] for x in latencies]
        snap["latency"] = {
            "last_s": lat[-1] if lat else None,
            "p50_s": round(float(np.median(lat[-100:])), 4) if lat else None,
            "max_s": round(float(max(lat[-100:])), 4) if lat else None,
            "service_p50_s": round(float(np.median(svc[-100:])), 4) if svc else None,
            "recent": [{"latency_s": x["latency_s"], "service_s": x["service_s"], "overrun": x["overrun"]}
                       for x in latencies[-200:]],
        }
        return snap
