"""Frames pushed through the daemon's own `PipelinedRunner` (prepare, segment and finish overlapping,
same-shape frames batched when behind, ledger and event log written), for ``latticewatch bench``.

Two runs per backend and frame size: *saturated* (every frame waiting at the start: the most frames
per second the pipeline sustains) and *paced* (frames arriving at a fixed rate, as from a camera:
the latency a frame sees from arrival to its events being durable). `pipelined_frames` sizes both
to a few seconds of frames.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

from latticewatch.config import RuntimeConfig
from latticewatch.frame import Frame
from latticewatch.runtime.analyser import Analyser
from latticewatch.runtime.pipeline import Pipeline
from latticewatch.runtime.runners import PipelinedRunner
from latticewatch.runtime.store import StateDir
from latticewatch.sinks.events import Event, FrameEvent
from latticewatch.sources.memory import MemorySource

#: The paced run feeds frames at this fraction of the saturated rate (or at the GPU goal's rate when
#: the saturated run reached it), so the latency is that of a pipeline that keeps up.
PACED_FRACTION = 0.8
#: Each run lasts about this many seconds per ``--repeats`` at the single-frame rate, within the
#: frame counts below: long enough for a GPU's p99, short enough for a 4096² frame on two cores.
SECONDS_PER_REPEAT = 0.7
MAX_FRAMES = 400


def pipelined_frames(repeats: int, single_frame_s: float) -> int:
    """Frames per pipelined run: about ``SECONDS_PER_REPEAT × repeats`` seconds of frames, at least
    ``repeats + 1`` and 4, at most `MAX_FRAMES`.

    >>> pipelined_frames(7, 1.2), pipelined_frames(7, 0.06), pipelined_frames(7, 0.001)
    (8, 82, 400)
    """
    return max(4, repeats + 1, min(MAX_FRAMES, round(SECONDS_PER_REPEAT * repeats / single_frame_s)))


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median and nearest-rank 99th percentile of ``values`` in seconds (with fewer than 100 values the
    p99 is the largest).

    >>> summary([0.3, 0.1, 0.2])
    {'median_s': 0.2, 'p99_s': 0.3}
    """
    ordered = sorted(values)
    return {"median_s": statistics.median(ordered), "p99_s": ordered[math.ceil(0.99 * len(ordered)) - 1]}


class HeldFrames(MemorySource):
    """Frames the bench holds in memory, treated like files on disk: replayable, so the runner neither
    spools nor defers them and the source waits while the pipeline is full. (A stream frame would be
    written to the spool on arrival; that cost is the stream's, not the analysis's.)"""

    replayable = True


class _Clock:
    """A sink that notes when each frame's events became durable: the end of the frame's latency."""

    name = "bench-clock"

    def __init__(self) -> None:
        self.done: dict[str, float] = {}

    def consume(self, events: Sequence[Event]) -> None:
        now = time.perf_counter()
        for event in events:
            if isinstance(event, FrameEvent):
                self.done[event.frame_id] = now


def _run(analyser: Analyser, frame: Frame, name: str, frames: int, interval_s: float) -> dict[str, Any]:
    """``frames`` copies of ``frame`` through a fresh pipeline (temporary state directory), fed every
    ``interval_s`` seconds (0: all at once); frames/s, latencies and whether each frame was analysed once."""
    defaults = RuntimeConfig()
    clock, arrived = _Clock(), {}
    source = HeldFrames(name=name, pixel_size_nm=frame.pixel_size_nm)
    with tempfile.TemporaryDirectory(prefix="latticewatch-bench-") as tmp:
        pipeline = Pipeline(analyser, StateDir(tmp), sinks=[clock])
        runner = PipelinedRunner(pipeline, queue_size=defaults.queue_size, max_batch=defaults.max_batch)

        def feed() -> None:
            runner.started.wait()
            start = time.perf_counter()
            for i in range(frames):
                time.sleep(max(0.0, start + i * interval_s - time.perf_counter()))
                arrived[f"{name}:{i}"] = time.perf_counter()
                source.put(frame.pixels)
            source.close()

        feeder = threading.Thread(target=feed, name="latticewatch-bench-feed", daemon=True)
        feeder.start()
        try:
            stats = runner.run([source], threading.Event())
            feeder.join()
            once = all(pipeline.ledger.analyses(frame_id) == 1 for frame_id in arrived)
        finally:
            pipeline.close()
    ends = sorted(clock.done.values())
    latencies = [clock.done[i] - t for i, t in arrived.items() if i in clock.done]
    # frames/s once the pipeline is full: the first frame's fill time is left out
    steady = (len(ends) - 1) / max(ends[-1] - ends[0], 1e-9) if len(ends) > 1 else None
    run = {"frames": frames, "analysed": stats.analysed, "analysed_once": once, "frames_per_s": steady,
           "largest_batch": stats.largest_batch, "batched_frames": stats.batched_frames,
           "phase_seconds_per_frame": {k: v / max(stats.analysed, 1) for k, v in stats.phase_seconds.items()}}
    if interval_s > 0 and latencies:  # all at once, a frame's latency is only its place in the queue
        latency = summary(latencies)
        run.update(latency_median_s=latency["median_s"], latency_p99_s=latency["p99_s"])
    return run


def _warm_batches(analyser: Analyser, frame: Frame, largest: int) -> None:
    """Segment batches of 2..``largest`` copies once, untimed: an accelerator backend builds or
    compiles per input shape, which must not count as a slow frame."""
    prepared = analyser.prepare(frame)
    for size in range(2, largest + 1):
        analyser.segment_batch([prepared] * size)


def run_pipelined(analyser: Analyser, frame: Frame, *, frames: int, goal_fps: float | None = None,
                  warm_batches: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """The saturated run, then the paced run at `PACED_FRACTION` of its rate (or at ``goal_fps`` when
    it reached that), each of ``frames`` frames.

    Examples
    --------
    >>> saturated, paced = run_pipelined(analyser, synthetic_frame(1024), frames=8)  # doctest: +SKIP
    >>> saturated["analysed"], paced["latency_p99_s"] < 1  # doctest: +SKIP
    (8, True)
    """
    if warm_batches:
        _warm_batches(analyser, frame, RuntimeConfig().max_batch)
    saturated = _run(analyser, frame, "saturated", frames, 0.0)
    rate = saturated["frames_per_s"] or 1.0
    rate = goal_fps if goal_fps is not None and rate >= goal_fps else PACED_FRACTION * rate
    paced = {"fed_at_fps": rate, **_run(analyser, frame, "paced", frames, 1.0 / rate)}
    return saturated, paced
