"""Runners: every frame analysed exactly once, bad input quarantined, inline ≡ pipelined, resume."""

import json
import threading

import numpy as np
import pytest

from latticewatch.frame import Frame, Rejected
from latticewatch.runtime.pipeline import Pipeline
from latticewatch.runtime.runners import InlineRunner, PipelinedRunner
from latticewatch.runtime.store import StateDir
from latticewatch.sources.memory import MemorySource


def events(state: StateDir):
    return [json.loads(line) for line in state.events_path.read_text().splitlines()]


def frame_ids(evts, kind="frame"):
    return [e["frame_id"] for e in evts if e["type"] == kind]


def run(runner_cls, analyser, state, items, **kw):
    pipeline = Pipeline(analyser, state, budget_ms=10_000)
    try:
        source = MemorySource(items, name="m", pixel_size_nm=0.05, closed=True)
        return runner_cls(pipeline, **kw).run([source], threading.Event())
    finally:
        pipeline.close()


def test_inline_analyses_once_and_quarantines_bad_input(analyser, synthetic_images, tmp_path):
    state = StateDir(tmp_path)
    nan = Frame("m:nan", np.full((64, 64), np.nan, np.float32), 0.05, origin="memory:m")
    bad = Rejected("m:malformed:1", "memory:m", "header is not JSON", payload=b"{nope")
    stats = run(InlineRunner, analyser, state, [*synthetic_images[:3], nan, bad])
    assert (stats.analysed, stats.quarantined) == (3, 2)
    evts = events(state)
    assert frame_ids(evts) == ["m:0", "m:1", "m:2"]
    assert sorted(frame_ids(evts, "error")) == ["m:malformed:1", "m:nan"]
    ids = [e["event_id"] for e in evts]
    assert len(ids) == len(set(ids))
    particles = [e for e in evts if e["type"] == "particle"]
    assert all(e["event_id"] == f"{e['frame_id']}/region/{e['region_id']}" for e in particles)
    kept = sorted(p.suffix for p in state.quarantine_dir.iterdir())
    assert kept == [".bin", ".json", ".json", ".npy"]  # the raw message, the NaN pixels, two reasons
    assert list(state.spool_dir.iterdir()) == []
    frame = next(e for e in evts if e["type"] == "frame")
    assert set(frame["runner"]["phases_s"]) == {"prepare", "segment", "finish"}


def test_second_run_on_the_same_frames_emits_nothing(analyser, synthetic_images, tmp_path):
    state = StateDir(tmp_path)
    run(InlineRunner, analyser, state, synthetic_images[:2])
    before = state.events_path.read_bytes()
    stats = run(InlineRunner, analyser, state, synthetic_images[:2])
    assert (stats.analysed, stats.skipped) == (0, 2)
    assert state.events_path.read_bytes() == before


@pytest.mark.parametrize("finish_workers", [1, 3])
def test_pipelined_gives_what_inline_gives(analyser, synthetic_images, tmp_path, finish_workers):
    inline, piped = StateDir(tmp_path / "inline"), StateDir(tmp_path / "piped")
    run(InlineRunner, analyser, inline, synthetic_images)
    run(PipelinedRunner, analyser, piped, synthetic_images, finish_workers=finish_workers)

    def per_frame(state):
        return {e["frame_id"]: (e["particles"], e["coverage"]) for e in events(state) if e["type"] == "frame"}

    assert per_frame(inline) == per_frame(piped)


def test_pipelined_when_behind_batches_and_defers_but_drops_nothing(analyser, synthetic_images, tmp_path):
    state = StateDir(tmp_path)
    stats = run(PipelinedRunner, analyser, state, synthetic_images * 2, queue_size=1, max_batch=4)
    assert stats.analysed == 16 and stats.deferred > 0
    pipeline = Pipeline(analyser, state)
    assert all(pipeline.ledger.analyses(f"m:{n}") == 1 for n in range(16))
    pipeline.close()
    assert sorted(frame_ids(events(state))) == sorted(f"m:{n}" for n in range(16))
    assert list(state.spool_dir.iterdir()) == []


def test_spooled_frames_of_a_dead_run_are_analysed_on_restart(analyser, synthetic_images, tmp_path):
    state = StateDir(tmp_path)
    dead = Pipeline(analyser, state)
    source = MemorySource(synthetic_images[:2], name="m", pixel_size_nm=0.05)
    for item in source.frames(threading.Event()):
        dead.admit(source, item)  # arrived and spooled, then the process "died"
    dead.close()
    assert len(list(state.spool_dir.glob("*.npy"))) == 2
    stats = run(PipelinedRunner, analyser, state, [])
    assert (stats.resumed, stats.analysed) == (2, 2)
    assert frame_ids(events(state)) == ["m:0", "m:1"]


@pytest.mark.parametrize("runner_cls", [InlineRunner, PipelinedRunner])
def test_overruns_are_counted_against_the_budget(analyser, synthetic_images, tmp_path, runner_cls):
    pipeline = Pipeline(analyser, StateDir(tmp_path), budget_ms=0.001)
    source = MemorySource(synthetic_images[:2], name="m", pixel_size_nm=0.05)
    stats = runner_cls(pipeline).run([source], threading.Event())
    pipeline.close()
    assert stats.overruns == 2 and stats.phase_seconds["segment"] > 0


class FrameOrder:
    """A sink that notes the frames in the order their events reach it."""

    name = "order"

    def __init__(self):
        self.frames = []

    def consume(self, evts):
        self.frames += [e.frame_id for e in evts if e.type == "frame"]


def test_frames_concluded_at_once_are_recorded_in_arrival_order(analyser, synthetic_images, tmp_path):
    # the first frame is 36 times larger and takes the longest to conclude; the small ones behind it
    # conclude on the other threads first, and must still reach the ledger, the log and the sinks after it
    rng = np.random.default_rng(11)
    big = np.tile(synthetic_images[0], (6, 6)) + rng.integers(0, 3, (1536, 1536)).astype(synthetic_images[0].dtype)
    items = [big, *synthetic_images[:5]]
    state, sink = StateDir(tmp_path), FrameOrder()
    pipeline = Pipeline(analyser, state, sinks=[sink])
    try:
        source = MemorySource(items, name="m", pixel_size_nm=0.05, closed=True)
        stats = PipelinedRunner(pipeline, finish_workers=3).run([source], threading.Event())
        order = [f"m:{n}" for n in range(len(items))]
        assert stats.analysed == len(items)
        assert sink.frames == order and frame_ids(events(state)) == order
        assert all(pipeline.ledger.analyses(fid) == 1 for fid in order)
        times = [e["at"] for e in events(state)]  # stamped in log order: `events --since TIME` relies on it
        assert times == sorted(times)
    finally:
        pipeline.close()
