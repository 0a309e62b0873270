"""The archive's commands (``restore``, ``archive-stats``, through `latticewatch.cli.main`) and its benchmark."""

from __future__ import annotations

import json
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import tifffile

from archive_frames import disc_mask, make_analysis, noisy_frame, reference_keep
from latticewatch.frame import Frame
from latticewatch.sinks.archive import ArchiveWriter, frame_key
from latticewatch.sinks.archive.bench import run_archive_bench, synthetic_frame


def _main(argv):
    from latticewatch.cli import main

    return main(argv)


def _write_mrc(path: Path, data: np.ndarray, voxel_a: float) -> None:
    with mrcfile.new(path) as mrc:
        mrc.set_data(data)
        mrc.voxel_size = voxel_a


@pytest.mark.parametrize("reduce", [True, False])
def test_restore_command_round_trips_a_real_mrc(tmp_path, reduce):
    from latticewatch.io.readers import read_frames

    source = tmp_path / "source.mrc"
    pixels = noisy_frame((97, 130), seed=7)  # odd sizes on purpose
    _write_mrc(source, pixels, voxel_a=0.5)
    before = source.read_bytes()
    (frame,) = list(read_frames(source))
    assert frame.pixel_size_nm == pytest.approx(0.05)
    mask = disc_mask(pixels.shape, (50, 60), 15)
    with ArchiveWriter(tmp_path / "archive", "session-1", policy="drop", margin_nm=0.25,
                       reduce=reduce, fsync=False) as writer:
        writer.write(frame, make_analysis(mask))

    out = tmp_path / "restored.mrc"
    assert _main(["restore", str(tmp_path / "archive"), "--frame", frame.frame_id, "--out", str(out),
                  "--mask", str(tmp_path / "mask.tif")]) == 0
    with mrcfile.open(out) as mrc:
        restored = mrc.data.copy()
        assert float(mrc.voxel_size.x) == pytest.approx(0.5)
    assert restored.dtype == pixels.dtype and restored.shape == pixels.shape
    keep = reference_keep(mask, 0, 5)
    if reduce:
        assert np.array_equal(restored[keep], pixels[keep])
        assert (restored[~keep] == 0).all()
    else:
        assert np.array_equal(restored, pixels)
    assert np.array_equal(tifffile.imread(tmp_path / "mask.tif"), mask)
    assert source.read_bytes() == before  # the source is never touched
    # and the restored file reads back through the project's own reader
    (again,) = list(read_frames(out))
    assert np.array_equal(again.pixels, restored) and again.pixel_size_nm == pytest.approx(0.05)


def test_restore_command_writes_a_tiff_stack_and_reports_errors(tmp_path, capsys):
    frames = [Frame(f"f{i}", noisy_frame((20, 24), seed=i, dtype=np.int32), pixel_size_nm=0.1) for i in range(3)]
    with ArchiveWriter(tmp_path, "s", reduce=False, fsync=False) as writer:
        for f in frames:
            writer.write(f, None)
        writer.write(Frame("other", noisy_frame((8, 8))), None)
    out = tmp_path / "stack.tif"
    argv = ["restore", str(tmp_path), "--out", str(out)]
    assert _main([*argv[:2], "--frame", "f0", "--frame", "f1", "--frame", "f2", *argv[2:]]) == 0
    stack = tifffile.imread(out)
    assert stack.shape == (3, 20, 24) and np.array_equal(stack[2], frames[2].pixels)
    assert _main([*argv, "--frame", "f0"]) == 2  # exists, no --force
    assert "--force" in capsys.readouterr().err
    assert _main(argv) == 2  # shapes differ
    assert _main(["restore", str(tmp_path), "--frame", "nope", "--out", str(out)]) == 2
    assert _main(["restore", str(tmp_path), "--frame", "f0", "--out", str(tmp_path / "x.mrc")]) == 2  # int32
    assert ".tif" in capsys.readouterr().err
    assert not list(tmp_path.glob(".*tmp-*"))


def test_archive_stats_command(tmp_path, capsys):
    pixels, mask = synthetic_frame(256, 0.05, pixel_size_nm=0.05)
    with ArchiveWriter(tmp_path, "s", margin_nm=0.1, fsync=False) as writer:
        writer.write(Frame("f", pixels, pixel_size_nm=0.05), make_analysis(mask))
    assert _main(["archive-stats", str(tmp_path), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["frames"] == 1 and stats["ratio"] > 1
    assert _main(["archive-stats", str(tmp_path), "--frames"]) == 0
    text = capsys.readouterr().out
    assert "ratio" in text and "exact_pixels" in text and frame_key("f") in text
    assert _main(["archive-stats", str(tmp_path / "missing")]) == 2


def test_help_texts_say_what_is_lossy(capsys):
    with pytest.raises(SystemExit):
        _main(["restore", "--help"])
    assert "bit-exact" in capsys.readouterr().out


def test_bench_smoke():
    result = run_archive_bench(192, coverages=(0.15,), policies=("drop", "mean", "quantize:4", "lossless"), repeats=1)
    rows = {r["policy"]: r for r in result["results"]}
    assert set(rows) == {"drop", "mean", "quantize:4", "lossless"}
    assert rows["lossless"]["low_max_abs_error"] == 0 and rows["lossless"]["exact_fraction"] == 1
    assert rows["drop"]["ratio"] > rows["lossless"]["ratio"]
    assert {"encode_MBps", "decode_MBps", "ratio"} <= set(rows["drop"])
    assert result["goals"]["ratio_drop_15pct"] == rows["drop"]["ratio"]
    json.dumps(result)
