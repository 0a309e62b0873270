"""The batch path: one rule for bad files and bad stack sections, the same in every command.

A float32 MRC stack whose middle section holds a NaN goes through `Batch` directly, then through
``process``, ``sort`` and ``evaluate``: each must report the same single failure
(``<path>#1``) and analyse the same two other sections.
"""

import json

import mrcfile
import numpy as np
import pytest
from PIL import Image

from latticewatch.cli import main
from latticewatch.errors import FrameError
from latticewatch.runtime.batch import Batch, Failure, micrograph_files


def _stack(path, n=3, bad=1, side=128):
    """An MRC stack of noise frames at 0.05 nm/px (what is in them does not matter here), section
    ``bad`` with one NaN pixel."""
    data = np.random.default_rng(3).normal(1000.0, 30.0, (n, side, side)).astype(np.float32)
    if bad is not None:
        data[bad, 10, 10] = np.nan
    with mrcfile.new(path) as mrc:
        mrc.set_data(data)
        mrc.voxel_size = 0.5  # Å
    return path


@pytest.fixture
def folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    with pytest.warns(RuntimeWarning):  # mrcfile warns about the NaN it is asked to write
        stack = _stack(images / "stack.mrc")
    return stack


def test_a_bad_section_is_one_failure_and_the_other_sections_are_read(folder):
    batch = Batch()
    frames = list(batch.frames([folder]))
    assert [f.frame_id for f in frames] == [f"{folder}#0", f"{folder}#2"]
    [failure] = batch.failures
    assert failure.file == str(folder) and failure.frame_id == f"{folder}#1"
    assert failure.error.startswith(f"{folder}#1: ") and "NaN" in failure.error


def test_a_bad_file_is_one_failure_naming_it(tmp_path):
    truncated = tmp_path / "truncated.mrc"
    _stack(truncated, bad=None)
    truncated.write_bytes(truncated.read_bytes()[:2000])
    text = tmp_path / "notes.tif"
    text.write_text("not an image")
    missing = tmp_path / "missing.mrc"
    seen = []
    batch = Batch(on_failure=seen.append)
    assert list(batch.frames([truncated, text, missing])) == []
    assert batch.failures == seen
    assert [(f.file, f.frame_id) for f in seen] == [(str(truncated), None), (str(text), None), (str(missing), None)]
    assert seen[2].error == f"{missing}: No such file or directory"


def test_a_frame_the_analysis_refuses_is_its_failure_and_other_errors_stop_the_batch(tmp_path):
    stack = _stack(tmp_path / "s.mrc", bad=None)

    def refuse_the_second(frame):
        if frame.frame_id.endswith("#1"):
            raise FrameError(f"{frame.frame_id}: refused")
        return frame.pixels.shape

    batch = Batch()
    results = list(batch.run([stack], refuse_the_second))
    assert [(f.frame_id, shape) for f, shape in results] == [(f"{stack}#0", (128, 128)), (f"{stack}#2", (128, 128))]
    assert batch.failures == [Failure(str(stack), f"{stack}#1", f"{stack}#1: refused")]

    def broken(frame):
        raise RuntimeError("a bug, not a bad frame")

    with pytest.raises(RuntimeError):
        list(Batch().run([stack], broken))


def test_failures_have_one_json_form():
    failure = Failure("a.mrc", None, "a.mrc: empty file")
    assert failure.as_dict() == {"file": "a.mrc", "frame_id": None, "error": "a.mrc: empty file"}


def test_micrograph_files_skips_dotfiles_and_other_suffixes(tmp_path):
    for name in ("b.mrc", "a.TIF", ".partial.mrc", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub.mrc").mkdir()
    assert [p.name for p in micrograph_files(tmp_path)] == ["a.TIF", "b.mrc"]
    with pytest.raises(Exception, match="not a directory"):
        micrograph_files(tmp_path / "b.mrc")


def test_process_sort_and_evaluate_report_the_same_failure_and_frames(folder, tmp_path, capsys):
    expected_failure = {"file": str(folder), "frame_id": f"{folder}#1"}
    expected_frames = [f"{folder}#0", f"{folder}#2"]

    assert main(["process", str(folder), "--out", str(tmp_path / "reports"), "--json", "--threads", "1"]) == 1
    captured = capsys.readouterr()
    processed = json.loads(captured.out)
    assert [row["frame_id"] for row in processed["frames"]] == expected_frames
    assert captured.err.count("error: ") == 1 and f"{folder}#1" in captured.err

    assert main(["sort", str(folder.parent), "--json", "--threads", "1"]) == 1
    captured = capsys.readouterr()
    ranked = json.loads(captured.out)
    assert sorted(row["frame_id"] for row in ranked["frames"]) == expected_frames
    assert captured.err.count("error: ") == 1

    labels = tmp_path / "labels"
    labels.mkdir()
    Image.fromarray(np.zeros((128, 128), np.uint8)).save(labels / "stack.png")
    assert main(["evaluate", "--images", str(folder.parent), "--labels", str(labels), "--baselines", "none", "--json",
                 "--per-image", "--threads", "1"]) == 1
    captured = capsys.readouterr()
    scored = json.loads(captured.out)
    assert scored["frame_ids"] == expected_frames and scored["n_images"] == 2
    assert [p["name"] for p in scored["model"]["per_image"]] == ["stack#0", "stack#2"]
    assert captured.err.count("error: ") == 1

    failures = [processed["failures"], ranked["failures"], scored["failures"]]
    assert all(f == failures[0] for f in failures) and len(failures[0]) == 1
    assert {k: failures[0][0][k] for k in expected_failure} == expected_failure
