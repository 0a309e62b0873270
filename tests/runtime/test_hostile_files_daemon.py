"""Hostile files through the daemon: each one error event, the daemon alive, nothing twice after a restart.

Real files in a watched folder, the real daemon (`run_daemon`) with its ledger, event log and archive;
then the same folder again in a second run, as after a crash: no event id twice, no crash loop.
"""

import json
import os
import threading
from collections import Counter

import mrcfile
import numpy as np
import pytest
import tifffile

from latticewatch.config import parse_config
from latticewatch.runtime.daemon import run_daemon
from latticewatch.runtime.ledger import Ledger
from latticewatch.runtime.pipeline import Pipeline
from latticewatch.runtime.store import StateDir
from latticewatch.sinks.archive import ArchiveReader, ArchiveWriter
from latticewatch.sources.folder import FolderSource
from waiting import wait_until


def events(state_dir):
    path = state_dir / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def write_mrc(path, pixels, pixel_size_nm=0.05):
    with mrcfile.new(path) as mrc:
        mrc.set_data(pixels)
        mrc.voxel_size = pixel_size_nm * 10  # Å


def run(config, until, what):
    stop, result = threading.Event(), {}

    def target():
        try:
            result["stats"] = run_daemon(config, stop)
        except BaseException as err:  # the test fails on it below, naming it
            result["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    try:
        wait_until(lambda: until() or "error" in result, 120, what)
    finally:
        stop.set()
        thread.join(30)
    assert "error" not in result, result.get("error")
    return result["stats"]


def test_hostile_files_each_give_one_error_and_a_restart_repeats_nothing(profile_dir, synthetic_images, tmp_path):
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    good = synthetic_images[0]
    write_mrc(os.path.join(os.fsencode(incoming), b"grid \xe9\xff.mrc").decode("utf-8", "surrogateescape"), good)
    os.mkfifo(incoming / "named_pipe.mrc")
    nan = synthetic_images[1].astype(np.float32)
    nan[10, 10] = np.nan
    write_mrc(incoming / "nan.mrc", nan)
    write_mrc(incoming / "spacing_nan.mrc", synthetic_images[2])
    (incoming / "spacing_nan.mrc.mdoc").write_text("PixelSpacing = nan\n\n[ZValue = 0]\nTiltAngle = 0\n")
    write_mrc(incoming / "coarse.mrc", synthetic_images[3], pixel_size_nm=2.0)  # 20 Å: outside 0.001–1 nm
    write_mrc(incoming / "far.mrc", synthetic_images[5], pixel_size_nm=0.5)  # valid, but 10× for a 0.05 nm model
    write_mrc(incoming / "good.mrc", synthetic_images[4])
    config = parse_config({
        "profile": str(profile_dir), "data_dir": str(tmp_path / "data"), "runtime": {"threads": 1},
        "sources": {"scope": {"kind": "folder", "path": str(incoming), "settle_s": 0.2}},
        "archive": {"root": str(tmp_path / "archive"), "min_free_bytes": 0},
    })
    state = config.state_dir
    expected = {"scope:grid \\xe9\\xff.mrc#0": "frame", "scope:good.mrc#0": "frame",
                "scope:named_pipe.mrc": "error", "scope:nan.mrc#0": "error", "scope:spacing_nan.mrc#0": "error",
                "scope:coarse.mrc#0": "error", "scope:far.mrc#0": "error"}

    def seen():
        return {e["frame_id"]: e["type"] for e in events(state) if e["type"] in ("frame", "error")}

    def archived_all():  # a frame that found the archive's queue full waits in the backlog for an idle writer
        ledger = Ledger(state / "ledger.sqlite")
        try:
            return not ledger.unarchived()
        finally:
            ledger.close()

    stats = run(config, lambda: seen() == expected and archived_all(), "every input answered and archived")
    problems = {e["frame_id"]: e["problem"] for e in events(state) if e["type"] == "error"}
    assert "FIFO" in problems["scope:named_pipe.mrc"]
    assert "NaN" in problems["scope:nan.mrc#0"]
    assert "spacing_nan.mrc.mdoc [ZValue = 0] PixelSpacing" in problems["scope:spacing_nan.mrc#0"]
    assert "not a finite number" in problems["scope:spacing_nan.mrc#0"]
    assert "2 nm per pixel is outside the accepted 0.001–1 nm" in problems["scope:coarse.mrc#0"]
    assert "enlarged 10×" in problems["scope:far.mrc#0"]
    assert stats.analysed == 2

    # the NaN frame still has pixels: archived whole, like the frames the analyser refused
    wait_until(lambda: not any(p.name.startswith(".") for p in (tmp_path / "archive").rglob("*.h5*")), 10, "archive")
    [session] = (tmp_path / "archive").iterdir()
    archived = {e.frame_id for e in ArchiveReader(session).entries()}
    assert {"scope:nan.mrc#0", "scope:spacing_nan.mrc#0", "scope:coarse.mrc#0",
            "scope:good.mrc#0", "scope:grid \\xe9\\xff.mrc#0"} <= archived
    kept = ArchiveReader(session).read("scope:nan.mrc#0")
    np.testing.assert_array_equal(kept.pixels(), nan)

    # a second run over the same folder (a restart after a crash): alive, nothing new, no id twice
    before = events(state)
    stop = threading.Event()
    threading.Timer(3.0, stop.set).start()
    stats = run_daemon(config, stop)
    assert stats.analysed == 0 and events(state) == before
    assert [i for i, n in Counter(e["event_id"] for e in before).items() if n > 1] == []


def test_a_warning_is_not_emitted_again_when_a_killed_runs_frame_is_read_again(analyser, tmp_path):
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    tifffile.imwrite(incoming / "no_size.tif", np.random.default_rng(0).integers(0, 60000, (64, 64), np.uint16))
    state = StateDir(tmp_path / "state")

    def first_items(pipeline):
        folder = FolderSource(incoming, name="scope", settle_s=0.1)
        stop = threading.Event()
        for item in folder.frames(stop, pipeline.skip):
            stop.set()
            return folder, item

    pipeline = Pipeline(analyser, state)  # first run: the frame is admitted (its warning said), then a kill
    folder, item = first_items(pipeline)
    assert pipeline.admit(folder, item) is not None
    pipeline.ledger.close()

    pipeline = Pipeline(analyser, state)  # the restarted run meets the same frame first
    folder, item = first_items(pipeline)
    pipeline.process(pipeline.admit(folder, item))
    pipeline.close()
    ids = [e["event_id"] for e in events(state.root)]
    assert ids.count("scope:no_size.tif/pixel-size") == 1 and ids.count("scope:no_size.tif/frame") == 1


def test_archive_after_a_kill_tidies_stale_temporaries_and_does_not_archive_twice(analyser, synthetic_images,
                                                                                   tmp_path):
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    write_mrc(incoming / "a.mrc", synthetic_images[0])
    state, root = StateDir(tmp_path / "state"), tmp_path / "archive"

    killed = ArchiveWriter(root, "run-1", min_free_bytes=0)
    pipeline = Pipeline(analyser, state, archive=killed)  # its archive thread never runs: the offer is lost
    folder = FolderSource(incoming, name="scope", settle_s=0.1)
    stop = threading.Event()
    for item in folder.frames(stop, pipeline.skip):
        stop.set()
        pipeline.process(pipeline.admit(folder, item))
    killed.write(item, None)  # renamed into place just before the kill; the ledger never heard of it
    stale = root / "run-1" / "segments" / ".0123456789abcdef.h5.tmp-4242-deadbeef"
    stale.write_bytes(b"\0" * 96_000)
    killed._session.unlock()  # the kill releases the lock
    pipeline.ledger.close()

    pipeline = Pipeline(analyser, state, archive=ArchiveWriter(root, "run-2", min_free_bytes=0))
    pipeline.recover([FolderSource(incoming, name="scope", settle_s=0.1)])
    wait_until(lambda: pipeline.archive.backlog() == 0, 30, "the backlog settled")
    pipeline.close()
    assert not stale.exists()
    assert pipeline.stats.archive["already_archived"] == 1 and pipeline.stats.archive["archived"] == 0
    assert [e.frame_id for e in ArchiveReader(root / "run-1").entries()] == ["scope:a.mrc#0"]
    assert not (root / "run-2").exists() or ArchiveReader(root / "run-2").entries() == []


@pytest.mark.parametrize("value", [float("nan"), -0.25, 0.0, 1e-9, 5.0])
def test_bad_pixel_sizes_are_refused_by_validation_with_a_clear_message(analyser, synthetic_images, value):
    from latticewatch.errors import FrameError
    from latticewatch.frame import Frame

    frame = Frame("m:0", synthetic_images[0], value, meta={"pixel_size_source": "stream header"})
    with pytest.raises(FrameError, match=r"m:0: pixel size \(stream header\)|enlarged") as err:
        analyser.prepare(frame)
    assert "nm" in str(err.value) and "division" not in str(err.value) and "convert" not in str(err.value)
