"""The archive in the daemon: each frame archived once, a full disk survived, the backlog archived later.

Real files throughout: MRC files and a SerialEM stack in a watched folder, a real archive on disk
(a size-limited tmpfs for the full-disk test), the real ledger and event log.
"""

import functools
import hashlib
import json
import shutil
import sqlite3
import threading

import mrcfile
import numpy as np
import pytest

from latticewatch.calibration import InstrumentCalibration, apply_calibration
from latticewatch.config import parse_config
from latticewatch.frame import Frame, Rejected
from latticewatch.runtime.daemon import run_daemon
from latticewatch.runtime.pipeline import Pipeline
from latticewatch.runtime.runners import InlineRunner, PipelinedRunner
from latticewatch.runtime.store import StateDir
from latticewatch.sinks.archive import ArchiveReader, ArchiveWriter
from latticewatch.sources.folder import FolderSource
from latticewatch.sources.memory import MemorySource
from latticewatch.testing.replay import SerialEMStack
from waiting import wait_until


def events(state_dir):
    path = state_dir / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def states(state_dir):
    path = state_dir / "ledger.sqlite"
    if not path.exists():
        return {}
    with sqlite3.connect(path) as db:
        return dict(db.execute("SELECT state, COUNT(*) FROM frames GROUP BY state").fetchall())


def leftovers(root):
    return [p for p in root.rglob("*") if ".tmp-" in p.name]


def write_mrc(path, image, pixel_size_nm=0.05):
    with mrcfile.new(path) as mrc:
        mrc.set_data(image)
        mrc.voxel_size = pixel_size_nm * 10  # Å


def run_in_thread(runner, sources):
    """Start a runner on sources that never end (a watched folder); returns (stop, thread, result)."""
    stop, result = threading.Event(), {}
    thread = threading.Thread(target=lambda: result.update(stats=runner.run(sources, stop)), daemon=True)
    thread.start()
    return stop, thread, result


def test_every_frame_is_archived_once_and_marked_archived_after_the_receipt(analyser, synthetic_images, tmp_path):
    state = StateDir(tmp_path / "state")
    writer = ArchiveWriter(tmp_path / "archive", "s", min_free_bytes=0)
    pipeline = Pipeline(analyser, state, archive=writer, archive_queue=2)
    nan = Frame("m:nan", np.full((64, 64), np.nan, np.float32), 0.05, origin="memory:m")
    bad = Rejected("m:malformed:1", "memory:m", "header is not JSON", payload=b"{nope")
    items = [*synthetic_images[:4], nan, bad]
    source = MemorySource(items, name="m", pixel_size_nm=0.05, closed=True)
    stats = PipelinedRunner(pipeline).run([source], threading.Event())
    # A frame that found the queue (2) full is in the backlog, which the writer archives when idle; at close
    # it would be left to the next run (README "Archive in the daemon"), so a loaded machine must not decide.
    wait_until(lambda: pipeline.archive.backlog() == 0, 60, "the archive backlog")
    pipeline.close()

    entries = ArchiveReader(tmp_path / "archive" / "s").entries()
    # each once; no pixels, no entry
    assert sorted(e.frame_id for e in entries) == ["m:0", "m:1", "m:2", "m:3", "m:nan"]
    assert states(state.root) == {"archived": 4, "quarantined": 2}
    assert stats.archive["archived"] == 5 and stats.archive["backlog"] == 0 and stats.archive["outages"] == 0
    reader = ArchiveReader(tmp_path / "archive" / "s")
    from_backlog = 0
    for frame_id in ("m:0", "m:1", "m:2", "m:3"):
        frame = reader.read(frame_id)
        assert frame.pixel_size_nm == pytest.approx(0.05)
        if "backlog" in frame.provenance.get("note", ""):  # found the queue full: whole and lossless, by design
            from_backlog += 1
            assert frame.analysis is None and np.array_equal(frame.pixels(), synthetic_images[int(frame_id[2:])])
        else:
            assert frame.analysis is not None
    from_backlog += "backlog" in reader.read("m:nan").provenance.get("note", "")
    assert from_backlog == stats.archive["from_backlog"] == stats.archive["queue_full"]
    kept = reader.read("m:nan")  # unanalysable: whole and lossless, no analysis
    assert kept.analysis is None and np.array_equal(kept.pixels(), nan.pixels, equal_nan=True)
    assert list(state.spool_dir.iterdir()) == []  # stream frames leave the spool once archived


def test_a_frame_archived_from_the_backlog_before_its_offer_arrives_is_not_archived_again(
        analyser, synthetic_images, tmp_path, monkeypatch):
    state = StateDir(tmp_path / "state")
    pipeline = Pipeline(analyser, state, archive=ArchiveWriter(tmp_path / "archive", "s", min_free_bytes=0))
    late = []  # the offer of a finish thread held up between publishing and offering
    monkeypatch.setattr(pipeline.archive, "offer", lambda frame, analysis: late.append((frame, analysis)))
    source = MemorySource(synthetic_images[:1], name="m", pixel_size_nm=0.05, closed=True)
    for item in source.frames(threading.Event(), pipeline.skip):
        pipeline.process(pipeline.admit(source, item))  # published and spooled, not offered
    assert [frame.frame_id for frame, _ in late] == ["m:0"]
    pipeline.recover([source])  # the writer starts with the backlog
    wait_until(lambda: pipeline.ledger.is_archived("m:0"), 30, "m:0 archived from the backlog")
    monkeypatch.undo()
    pipeline.archive.offer(*late[0])  # the offer arrives after all
    pipeline.close()

    assert [e.frame_id for e in ArchiveReader(tmp_path / "archive" / "s").entries()] == ["m:0"]
    assert pipeline.stats.archive["archived"] == 1 and pipeline.stats.archive["from_backlog"] == 1


def test_restart_archives_what_was_published_but_not_archived(analyser, synthetic_images, tmp_path):
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    for n in range(2):
        write_mrc(incoming / f"single_{n}.mrc", synthetic_images[n])
    stack = SerialEMStack(incoming / "grid1.mrc", pixel_size_nm=0.05)
    for image in synthetic_images[2:4]:
        stack.append(image)
    hashes = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in incoming.iterdir()}
    state = StateDir(tmp_path / "state")

    # First run: the archive root is unusable (a file where a folder should be).
    (tmp_path / "not-a-folder").write_bytes(b"x")
    broken = ArchiveWriter(tmp_path / "not-a-folder", "s", min_free_bytes=0)
    pipeline = Pipeline(analyser, state, archive=broken)
    folder = FolderSource(incoming, name="scope", settle_s=0.2, poll_interval_s=0.1)
    stream = MemorySource(synthetic_images[4:6], name="m", pixel_size_nm=0.05, closed=True)
    stop, thread, _ = run_in_thread(PipelinedRunner(pipeline), [folder, stream])
    wait_until(lambda: states(state.root).get("published", 0) == 6, 60, "six published frames")
    stop.set()
    thread.join(10)
    pipeline.close()
    archive_errors = [e for e in events(state.root) if e["event_id"].endswith("/archive-error")]
    assert len(archive_errors) == 1
    assert archive_errors[0]["type"] == "error" and archive_errors[0]["component"] == "archive"
    assert "retries by itself" in archive_errors[0]["problem"]
    assert len(list(state.spool_dir.glob("*.npy"))) == 2  # stream pixels kept until archived

    # Restart with a working archive: nothing is analysed again, everything published is archived.
    pipeline = Pipeline(analyser, state, archive=ArchiveWriter(tmp_path / "archive", "s", min_free_bytes=0))
    folder = FolderSource(incoming, name="scope", settle_s=0.2, poll_interval_s=0.1)
    stop, thread, result = run_in_thread(PipelinedRunner(pipeline), [folder, MemorySource(name="m", closed=True)])
    wait_until(lambda: states(state.root) == {"archived": 6}, 60, "the backlog archived")
    stop.set()
    thread.join(10)
    pipeline.close()
    assert result["stats"].analysed == 0 and result["stats"].archive["from_backlog"] == 6
    reader = ArchiveReader(tmp_path / "archive" / "s")
    ids = sorted(e.frame_id for e in reader.entries())
    assert ids == sorted(["scope:single_0.mrc#0", "scope:single_1.mrc#0", "scope:grid1.mrc#0", "scope:grid1.mrc#1",
                          "m:0", "m:1"])
    section = reader.read("scope:grid1.mrc#1")  # read again exactly as the source gave it: mdoc keys too
    assert "mdoc" in section.meta and np.array_equal(section.pixels(), synthetic_images[3])
    assert all(reader.read(i).provenance.get("note", "").startswith("archived from the backlog") for i in ids)
    assert list(state.spool_dir.iterdir()) == []
    assert sum(e["type"] == "frame" for e in events(state.root)) == 6  # no event twice
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in incoming.iterdir()} == hashes  # sources untouched


def test_daemon_on_a_full_disk_keeps_analysing_then_archives_the_backlog(
        mount_tmpfs, profile_dir, synthetic_images, tmp_path):
    fs = mount_tmpfs("2m")
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    n_frames = 12
    for n in range(n_frames):
        write_mrc(incoming / f"frame_{n:02d}.mrc", synthetic_images[n % len(synthetic_images)])
    hashes = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in incoming.iterdir()}
    st = shutil.disk_usage(fs)
    ballast = fs / "ballast"
    ballast.write_bytes(b"\0" * (st.free - 200_000))  # room for a few frames only
    config = parse_config({
        "profile": str(profile_dir), "data_dir": str(tmp_path / "data"),
        "runtime": {"threads": 1},
        "sources": {"scope": {"kind": "folder", "path": str(incoming), "settle_s": 0.2}},
        "archive": {"root": str(fs / "archive"), "min_free_bytes": 0, "retry_max_s": 0.5},
    })
    state_dir = config.state_dir
    stop, result = threading.Event(), {}
    daemon = threading.Thread(target=lambda: result.update(stats=run_daemon(config, stop)), daemon=True)
    daemon.start()
    try:
        wait_until(lambda: sum(e["type"] == "frame" for e in events(state_dir)) == n_frames, 90, "every frame analysed")
        counts = states(state_dir)
        assert counts.get("published", 0) > 0 and 0 < counts.get("archived", 0) < n_frames  # the disk filled up
        errors = [e for e in events(state_dir) if e["event_id"].endswith("/archive-error")]
        assert len(errors) == 1 and errors[0]["reason"] == "no_space"
        assert leftovers(fs) == []

        ballast.unlink()  # an operator makes room: archiving resumes by itself
        wait_until(lambda: states(state_dir) == {"archived": n_frames}, 60, "the backlog archived")
    finally:
        stop.set()
        daemon.join(30)
    stats = result["stats"]
    assert stats.analysed == n_frames and stats.archive["outages"] == 1 and stats.archive["backlog"] == 0
    assert sum(e["event_id"].endswith("/archive-error") for e in events(state_dir)) == 1
    ids = [e.frame_id for e in ArchiveReader(fs / "archive").entries()]
    assert sorted(ids) == sorted(f"scope:frame_{n:02d}.mrc#0" for n in range(n_frames))
    assert leftovers(fs) == []
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in incoming.iterdir()} == hashes


def test_calibration_fills_pixel_sizes_and_an_unknown_size_is_said_once_per_source(
        analyser, synthetic_images, tmp_path):
    calibration = InstrumentCalibration(instrument="X", camera="Y", source="test",
                                        steps=[{"magnification": 1e6, "pixel_size_nm": 0.05}])
    state = StateDir(tmp_path)
    calibrate = functools.partial(apply_calibration, calibration=calibration, name="scope.toml")
    pipeline = Pipeline(analyser, state, calibrate=calibrate)
    calibrated = [Frame(f"a:{n}", image, None, meta={"mdoc": {"Magnification": 1e6}}, origin="memory:a")
                  for n, image in enumerate(synthetic_images[:2])]
    unknown = [Frame(f"b:{n}", image, None, meta={"mdoc": {"Magnification": 5e5}}, origin="memory:b")
               for n, image in enumerate(synthetic_images[:3])]
    sources = [MemorySource(calibrated, name="a", closed=True), MemorySource(unknown, name="b", closed=True)]
    InlineRunner(pipeline).run(sources, threading.Event())
    pipeline.close()
    evts = events(state.root)
    sizes = {e["frame_id"]: e["pixel_size_nm"] for e in evts if e["type"] == "frame"}
    assert sizes == {"a:0": 0.05, "a:1": 0.05, "b:0": None, "b:1": None, "b:2": None}
    warnings = [e for e in evts if e["type"] == "warning"]
    assert [(w["event_id"], w["source"]) for w in warnings] == [("b:0/pixel-size", "b")]
    assert "the calibration has no entry" in warnings[0]["problem"]
