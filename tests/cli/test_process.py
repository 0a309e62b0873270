"""`latticewatch process` end to end on real files written with mrcfile / tifffile."""

import csv
import json

import mrcfile
import numpy as np
import pytest
import tifffile
from PIL import Image

from latticewatch.cli import main
from latticewatch.sinks.reports import CSV_COLUMNS
from latticewatch.stages.defect_fraction import DefectConfusion, estimate_defect_fraction
from latticewatch.testing.synthetic.frames import generate_frame


@pytest.fixture(scope="module")
def frames():
    rng = np.random.default_rng(11)
    return [generate_frame(rng, shape=(512, 512), pixel_size_nm=0.025, n_particles=3, dose_range=(100.0, 150.0))
            for _ in range(2)]


@pytest.fixture
def inputs(tmp_path, frames):
    stack = tmp_path / "stack.mrc"
    with mrcfile.new(stack) as m:
        m.set_data(np.stack([f.image for f in frames]).astype(np.uint16))
        m.voxel_size = 0.25  # Å
    tif = tmp_path / "single.tif"
    tifffile.imwrite(tif, frames[0].image, compression="zlib")
    truncated = tmp_path / "truncated.mrc"
    truncated.write_bytes(stack.read_bytes()[:2000])
    text = tmp_path / "notes.tif"
    text.write_text("not an image")
    return {"stack": stack, "tif": tif, "truncated": truncated, "text": text}


def test_process_writes_reports_and_survives_bad_files(tmp_path, inputs, capsys):
    out = tmp_path / "out"
    code = main(["process", str(inputs["truncated"]), str(inputs["stack"]), str(inputs["text"]), str(inputs["tif"]),
                 "--out", str(out), "--save-probabilities", "--json"])
    captured = capsys.readouterr()
    assert code == 1  # some files failed …
    summary = json.loads(captured.out)
    names = [row["name"] for row in summary["frames"]]
    assert names == ["stack_s0000", "stack_s0001", "single"]  # … but every good frame was analysed
    failed = {f["file"] for f in summary["failures"]}
    assert failed == {str(inputs["truncated"]), str(inputs["text"])}
    assert "truncated.mrc" in captured.err and "notes.tif" in captured.err

    report = json.loads((out / "stack_s0001.json").read_text())
    assert report["pixel_size_nm"] == pytest.approx(0.025)
    assert report["frame_id"].endswith("stack.mrc#1")
    assert set(report["timings_s"]) >= {"preprocess", "segment", "isolate", "features", "classify"}
    assert report["regions"], "particles expected in a frame with three particles"
    region = report["regions"][0]
    for key in ("bbox", "centroid_px", "centroid_nm", "area_nm2", "equivalent_diameter_nm", "eccentricity",
                "solidity", "touches_edge", "label", "probabilities", "features"):
        assert key in region

    with open(out / "stack_s0001_particles.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == CSV_COLUMNS and len(rows) == len(report["regions"])

    overlay = Image.open(out / "stack_s0001_overlay.png")
    # the frame at its own size, the legend in a panel to its right
    assert overlay.size[1] == 512 and overlay.size[0] > 512 and overlay.mode == "RGB"
    prob = np.load(out / "stack_s0001_probability.npy")
    assert prob.shape == (512, 512) and prob.dtype == np.float32
    # the TIFF has no pixel size: reported, not guessed
    single = json.loads((out / "single.json").read_text())
    assert single["pixel_size_nm"] is None and any("pixel size unknown" in w for w in single["warnings"])


def test_process_prints_a_table(tmp_path, inputs, capsys):
    assert main(["process", str(inputs["stack"]), "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "stack_s0000" in out and "2 frame(s) analysed, 0 failed" in out
    assert "defect frac [95 %]" in out
    for name in ("stack_s0000", "stack_s0001"):
        report = json.loads((tmp_path / "o" / f"{name}.json").read_text())
        counts = report["class_counts"]
        expected = estimate_defect_fraction(counts["stacking_fault"], counts["no_stacking_fault"],
                                            DefectConfusion(**c) if (c := report["defect_confusion"]) else None)
        assert report["defect_fraction_raw"] == expected.raw
        assert report["defect_fraction_lower"] == (None if expected.lower is None else round(expected.lower, 4))
        # the table's cell: estimate [lower–upper], or – when no particle was counted
        line = next(line for line in out.splitlines() if line.startswith(name))
        assert line.split()[-2 if expected.estimate is None else -3:-1] == str(expected).split()


def test_unknown_profile_is_a_usage_error(tmp_path, inputs, capsys):
    assert main(["process", str(inputs["stack"]), "--out", str(tmp_path), "--profile", "nosuch"]) == 2
    assert "unknown profile 'nosuch'" in capsys.readouterr().err


def test_models_list_shows_the_shipped_profile(capsys):
    assert main(["models", "list", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["nanoparticles"]["error"] is None


def test_process_archives_and_restore_round_trips(tmp_path, inputs, frames, capsys):
    from latticewatch.sinks.archive import ArchiveReader

    root = tmp_path / "archive"
    assert main(["process", str(inputs["stack"]), "--out", str(tmp_path / "o"), "--archive", str(root)]) == 0
    reader = ArchiveReader(root)
    entries = reader.entries()
    assert len(entries) == 2
    report = json.loads((tmp_path / "o" / "stack_s0000.json").read_text())
    archived = reader.read(report["frame_id"])
    mask = archived.mask().astype(bool)
    restored = archived.pixels()
    assert restored.dtype == np.uint16
    # particles (and their margin) come back bit-exact; the stack itself was not touched
    np.testing.assert_array_equal(restored[mask], frames[0].image[mask])
    with mrcfile.open(inputs["stack"]) as m:
        np.testing.assert_array_equal(m.data[0], frames[0].image)
    out_mrc = tmp_path / "restored.mrc"
    assert main(["restore", str(root), "--frame", report["frame_id"], "--out", str(out_mrc)]) == 0
    with mrcfile.open(out_mrc) as m:
        np.testing.assert_array_equal(m.data[mask] if m.data.ndim == 2 else m.data[0][mask], frames[0].image[mask])


def test_process_prints_every_analysis_warning_on_stderr_and_marks_a_frame_out_of_domain(tmp_path, frames, capsys):
    """A crystal film filling the frame is outside the nanoparticle model's domain; a PNG carries no pixel size."""
    y, x = np.mgrid[:256, :256] * 0.05
    film = 1000 + 50 * (np.cos(2 * np.pi * x / 0.25) + np.cos(2 * np.pi * (0.5 * x + 0.866 * y) / 0.25))
    path = tmp_path / "film.mrc"
    with mrcfile.new(path) as m:
        m.set_data(np.random.default_rng(0).poisson(film).astype(np.uint16))
        m.voxel_size = 0.5  # Å
    png = tmp_path / "nopixelsize.png"
    Image.fromarray((frames[0].image[:256, :256] // 256).astype(np.uint8)).save(png)
    assert main(["process", str(path), str(png), "--out", str(tmp_path / "o")]) == 0
    captured = capsys.readouterr()
    assert "warning: " in captured.err and "film.mrc: model_out_of_domain: one region spans the frame" in captured.err
    assert "nopixelsize.png: pixel size unknown" in captured.err
    row = next(line for line in captured.out.splitlines() if line.startswith("film"))
    assert row.startswith("film !") and "ood" in row
    assert "! model out of domain" in captured.out
    report = json.loads((tmp_path / "o" / "film.json").read_text())
    assert report["out_of_domain"] and report["out_of_domain"][0].startswith("one region spans the frame")
