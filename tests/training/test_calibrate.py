"""`latticewatch calibrate`: threshold and baselines into a profile copy, pixel size from fringes
into an instrument TOML, the INT8 calibration set."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from analytic_files import copy_profile, write_analytic_set, write_mrc

from latticewatch.calibration import load_calibration
from latticewatch.cli import main
from latticewatch.io.readers import read_frames
from latticewatch.models.manifest import read_manifest
from latticewatch.runtime.analyser import Analyser
from latticewatch.training.assess.calibrate.crystals import d_spacing
from latticewatch.training.assess.calibrate.fringes import measure_fringe_frequency
from latticewatch.training.assess.calibrate.int8_set import farthest_points
from latticewatch_nanoparticles import profile_dir

EXAMPLE_TOML = Path(__file__).resolve().parents[2] / "calibration" / "example-300kv-4k-camera.toml"


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    return write_analytic_set(tmp_path_factory.mktemp("cal"), 3, side=384, pixel_size_nm=0.05, seed=4)


# ----------------------------------------------------------------------------------- threshold


def test_threshold_is_the_dice_optimum_and_written_atomically(labelled, tmp_path, capsys):
    images, labels = labelled
    profile = copy_profile(profile_dir, tmp_path / "profile")
    manifest_path = profile / "manifest.json"
    before = manifest_path.read_bytes()
    argv = ["calibrate", "threshold", "--profile", str(profile), "--images", str(images), "--labels", str(labels)]
    assert main(argv + ["--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert "dry run" in dry and manifest_path.read_bytes() == before

    assert main(argv) == 0
    out = capsys.readouterr().out
    assert str(manifest_path) in out
    manifest = read_manifest(profile)  # still verifies: model files untouched
    new = manifest.segmentation.threshold
    assert manifest.isolation.threshold == new and 0.05 <= new <= 0.95
    metrics = manifest.training["threshold"].metrics
    assert metrics["old"] == 0.5 and metrics["new"] == new and metrics["dice_after"] >= metrics["dice_before"]
    assert f"threshold 0.50 → {new:.2f}: Dice {metrics['dice_before']:.4f} → {metrics['dice_after']:.4f}" in out
    assert not list(profile.glob(".*.tmp"))

    # the Dice reported after is what evaluate measures at that threshold, and no other beats it
    def dice_at(t):
        assert main(["evaluate", "--profile", str(profile), "--images", str(images), "--labels", str(labels),
                     "--baselines", "none", "--json", "--threshold", str(t)]) == 0
        return json.loads(capsys.readouterr().out)["model"]["dice"]

    assert dice_at(new) == pytest.approx(metrics["dice_after"], abs=1e-6)
    for other in (0.05, 0.3, 0.5, 0.7, 0.95):
        assert dice_at(other) <= metrics["dice_after"] + 1e-9
    Analyser(profile)  # the updated profile loads


def test_threshold_needs_a_valid_profile(labelled, tmp_path, capsys):
    images, labels = labelled
    (tmp_path / "empty").mkdir()
    assert main(["calibrate", "threshold", "--profile", str(tmp_path / "empty"), "--images", str(images),
                 "--labels", str(labels)]) == 2
    assert "no manifest.json" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- pixel size


def _fringe_image(period_px: float, *, side: int = 1024, seed: int = 0, crystals: int = 1) -> np.ndarray:
    """Counts of a carbon-like background with ``crystals`` discs carrying two crossed fringe
    sets of the given period (111/-111-like, 70.5° apart), shot noise on top."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side].astype(np.float64)
    from scipy import ndimage

    intensity = 1.0 + 0.05 * ndimage.gaussian_filter(rng.standard_normal((side, side)), 1.5) / 0.19
    for _ in range(crystals):
        cy, cx = rng.uniform(0.2 * side, 0.8 * side, 2)
        radius = rng.uniform(0.1, 0.25) * side if crystals == 1 else rng.uniform(0.03, 0.06) * side
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
        theta = rng.uniform(0, np.pi)
        fringes = sum(np.cos(2 * np.pi * (xx * np.cos(theta + a) + yy * np.sin(theta + a)) / period_px
                             + rng.uniform(0, 6))
                      for a in (0.0, np.radians(70.53)))
        intensity = intensity + disc * 0.08 * fringes
    return rng.poisson(np.clip(intensity, 0, None) * 100).astype(np.uint16)


@pytest.mark.parametrize(("pixel_size_nm", "crystals"), [(0.0187, 1), (0.031, 1), (0.0125, 30)])
def test_measured_pixel_size_is_within_one_percent(pixel_size_nm, crystals):
    d = d_spacing("Au", "111")
    image = _fringe_image(d / pixel_size_nm, crystals=crystals, seed=int(pixel_size_nm * 1e4))
    m = measure_fringe_frequency(image)
    assert abs(d * m.frequency / pixel_size_nm - 1) < 0.01, (m, d * m.frequency)


def test_d_spacing_table():
    expected = {("Au", "111"): 0.23546, ("Au", "200"): 0.20391, ("Pt", "111"): 0.22656, ("Pd", "111"): 0.22463,
                ("Si", "111"): 0.31356, ("Si", "220"): 0.19201, ("CdSe", "002"): 0.35050, ("CdSe", "100"): 0.37230,
                ("CdSe", "10-11"): 0.32881, ("graphene", "100"): 0.21313, ("graphene", "11-20"): 0.12305}
    for (material, reflection), d in expected.items():
        assert d_spacing(material, reflection) == pytest.approx(d, abs=2e-5), (material, reflection)
    assert d_spacing("au", "1-11") == pytest.approx(0.23546, abs=2e-5)


def test_pixel_size_command_writes_a_toml_the_loader_reads(tmp_path, capsys):
    pixel_size = 0.0187
    image = tmp_path / "gold_620kx.mrc"
    write_mrc(image, _fringe_image(d_spacing("Au", "111") / pixel_size, seed=3), None)
    out = tmp_path / "calibration" / "team.toml"
    base = ["calibrate", "pixel-size", str(image), "--material", "Au", "--reflection", "111", "--camera", "OneView",
            "--voltage-kv", "300", "--out", str(out)]

    def with_image(path):
        return [base[0], base[1], str(path)] + base[3:]

    assert main(base + ["--magnification", "620000"]) == 2
    assert "give --instrument" in capsys.readouterr().err
    assert main(base + ["--magnification", "620000", "--instrument", "TEAM I"]) == 0
    printed = capsys.readouterr().out
    assert "fringe period" in printed and "nm/px at 620000×" in printed
    calibration = load_calibration(out)
    assert calibration.instrument == "TEAM I" and calibration.voltage_kv == 300
    assert calibration.pixel_size_nm(620000) == pytest.approx(pixel_size, rel=0.01)
    assert "Au (111)" in calibration.steps[0].source and "gold_620kx.mrc" in calibration.steps[0].source

    # a second magnification is added, the same one replaced
    coarse = tmp_path / "gold_310kx.mrc"
    # the header is wrong on purpose
    write_mrc(coarse, _fringe_image(d_spacing("Au", "111") / (2 * pixel_size), seed=4), 0.05)
    assert main(with_image(coarse) + ["--magnification", "310000"]) == 0
    printed = capsys.readouterr().out
    assert "image header says 0.05000 nm/px" in printed
    assert main(base + ["--magnification", "620000"]) == 0
    assert "replaces" in capsys.readouterr().out
    calibration = load_calibration(out)
    assert [s.magnification for s in calibration.steps] == [310000, 620000]
    assert calibration.pixel_size_nm(310000) == pytest.approx(2 * pixel_size, rel=0.01)

    # another camera's file is refused; a forbidden reflection too
    assert main(base[:8] + ["EMPAD"] + base[9:] + ["--magnification", "620000"]) == 2
    assert "camera 'OneView' ≠ 'EMPAD'" in capsys.readouterr().err
    assert main(["calibrate", "pixel-size", str(image), "--material", "Au", "--reflection", "100",
                 "--camera", "OneView", "--magnification", "1", "--out", str(out)]) == 2
    assert "forbidden reflection" in capsys.readouterr().err


def test_pixel_size_updates_the_shipped_example_format_keeping_its_comments(tmp_path, capsys):
    out = tmp_path / "example.toml"
    shutil.copy(EXAMPLE_TOML, out)
    image = tmp_path / "si.mrc"
    si = d_spacing("Si", "111")
    write_mrc(image, _fringe_image(si / 0.03, seed=5), None)
    assert main(["calibrate", "pixel-size", str(image), "--material", "Si", "--reflection", "111", "--camera",
                 "example 4k CMOS, 15 µm pixels", "--voltage-kv", "300", "--magnification", "500000",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    text = out.read_text()
    assert text.startswith("# Example instrument calibration")
    calibration = load_calibration(out)
    original = load_calibration(EXAMPLE_TOML)
    assert len(calibration.steps) == len(original.steps) + 1
    for step in original.steps:
        assert calibration.pixel_size_nm(step.magnification) == step.pixel_size_nm
    assert calibration.pixel_size_nm(500000) == pytest.approx(0.03, rel=0.01)


# ------------------------------------------------------------------------------------ INT8 set


def test_int8_set_is_preprocessed_like_the_analyser_and_loads_without_pickle(labelled, tmp_path, capsys):
    images, _ = labelled
    folder = tmp_path / "frames"
    folder.mkdir()
    for path in sorted(images.glob("*.mrc")):
        shutil.copy(path, folder / path.name)
    (folder / "broken.mrc").write_bytes(b"MRC? no")
    out = tmp_path / "int8.npz"
    assert main(["calibrate", "int8-set", "--profile", str(profile_dir), "--images", str(folder), "--n", "5",
                 "--tile", "128", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "broken.mrc" in captured.err and "5 of 27 tiles from 3 frame(s)" in captured.out
    with np.load(out, allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    assert data["images"].shape == (5, 1, 128, 128) and data["images"].dtype == np.float32
    manifest = read_manifest(profile_dir)
    assert str(data["onnx_sha256"]) == manifest.files[manifest.segmentation.onnx]
    assert str(data["normalisation"]) == manifest.segmentation.normalisation and float(data["pixel_size_nm"]) == 0.05
    assert list(data["stat_names"]) == ["mean", "std", "coverage"]
    assert len({(str(n), tuple(o)) for n, o in zip(data["names"], data["origins"])}) == 5
    analyser = Analyser(profile_dir)
    for tile, name, (r, c) in zip(data["images"], data["names"], data["origins"]):
        frame = next(iter(read_frames(folder / f"{name}.mrc")))
        prepared = analyser.prepare(frame).pre.image
        assert np.array_equal(tile[0], prepared[r : r + 128, c : c + 128])
    coverage = data["stats"][:, 2]
    assert coverage.max() > coverage.min()  # spans frames with and without particles


def test_farthest_points_spread_over_the_statistics():
    rng = np.random.default_rng(0)
    stats = np.vstack([rng.normal(0, 0.1, (50, 3)), [[5, 0, 0]], [[0, 5, 0]], [[0, 0, -5]]])
    chosen = farthest_points(stats, 4)
    assert set(chosen[1:]) == {50, 51, 52} and chosen[0] < 50
