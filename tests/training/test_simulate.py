"""The abTEM training-data simulator: ground truth against the atoms, detector statistics, and
``latticewatch simulate`` end to end (real abTEM runs on tiny 128² cells)."""

import json
import math
import os
import subprocess
import sys

import mrcfile
import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy import ndimage
from scipy.spatial import ConvexHull, cKDTree

pytest.importorskip("ase")

from latticewatch.cli import main
from latticewatch.frame import CLASSES
from latticewatch.training.simulate.config import (
    MASK_ATOM_RADIUS_NM,
    MASK_CLOSING_NM,
    SimulationConfig,
    image_streams,
    preset_config,
)
from latticewatch.training.simulate.image import GENERATOR
from latticewatch.training.simulate.optics import detect, draw_conditions
from latticewatch.training.simulate.scene import build_cell, compose_scene
from latticewatch.training.simulate.truth import pixel_coordinates, rasterise

SMALL = ["--size", "128", "--pixel-size-nm", "0.05", "0.05", "--particle-size-nm", "1.5", "2.5",
         "--carbon-thickness-nm", "1", "1.5", "--particles-per-image", "2", "3"]


def small_config(**kw):
    values = {"size": 128, "pixel_size_nm": (0.05, 0.05), "particle_size_nm": (1.5, 2.5),
              "carbon_thickness_nm": (1.0, 1.5), "particles_per_image": (2, 3)}
    values.update(kw)
    return SimulationConfig(**values)


def _scene(config, seed, index):
    rngs = image_streams(seed, index)
    conditions = draw_conditions(rngs["conditions"], config)
    scene = compose_scene(rngs["scene"], config, conditions)
    cell = build_cell(scene, conditions, config, rngs["carbon"], rngs["thermal"])
    return conditions, scene, cell


# --------------------------------------------------------------------------------------------
# Ground truth from the atoms (no multislice needed)


@pytest.mark.parametrize("classes", [None, {"agglomeration": 1.0}])
def test_mask_is_the_projected_footprint_of_the_atoms(classes):
    config = small_config(**({"classes": classes} if classes else {}))
    shape = (config.size, config.size)
    checked = 0
    for index in range(6):
        conditions, scene, cell = _scene(config, 7, index)
        instances = rasterise(scene, cell, conditions, shape)
        px = 10 * conditions["pixel_size_nm"]
        radius_px = 10 * MASK_ATOM_RADIUS_NM / px
        for p, atoms in zip(scene.particles, cell.particle_atoms):
            rc = pixel_coordinates(atoms[:, :2], px, conditions["simulation"]["sampling_angstrom"])
            mine = instances == p.instance
            # every projected atom centre falls inside its own instance
            r, c = np.round(rc).astype(int).T
            assert mine[r, c].all()
            # every mask pixel lies within an atomic radius of an atom, except the notches and
            # holes between columns that the closing fills: those within radius + closing
            closing_px = 10 * MASK_CLOSING_NM / px
            rows, cols = np.nonzero(mine)
            dist, _ = cKDTree(rc).query(np.column_stack([rows, cols]))
            assert dist.max() <= radius_px + closing_px + 1e-9
            assert np.mean(dist <= radius_px + 1e-9) > 0.6  # the rest: gaps between columns
            # and the closing never reaches out: no mask pixel lies more than a radius beyond any
            # facet of the convex hull of the atom centres
            hull = ConvexHull(rc)
            beyond = np.column_stack([rows, cols]) @ hull.equations[:, :2].T + hull.equations[:, 2]
            assert beyond.max() <= radius_px + 1e-9
            assert ndimage.label(mine)[1] == 1, "an instance (also an agglomerate) is one connected region"
            checked += 1
        # distinct particles stay apart by the configured gap
        for a in scene.particles:
            for b in scene.particles:
                if a.instance < b.instance:
                    d = cKDTree(a.projected()).query(b.projected())[0].min()
                    assert d >= 10 * (config.min_gap_nm + 2 * MASK_ATOM_RADIUS_NM)
                    assert not ndimage.binary_dilation(instances == a.instance)[instances == b.instance].any()
    assert checked >= 4


def test_agglomerate_members_touch_without_overlapping():
    config = small_config(classes={"agglomeration": 1.0}, particles_per_image=(1, 1))
    for index in range(3):
        _, scene, _ = _scene(config, 1, index)
        for p in scene.particles:
            assert len(p.members) >= 2 and p.label == "agglomeration"
            for k in range(1, len(p.members)):
                here = p.members[k].positions[:, :2] + p.offsets[k]
                before = np.vstack([m.positions[:, :2] + o for m, o in zip(p.members[:k], p.offsets[:k])])
                assert cKDTree(before).query(here)[0].min() >= 2.35  # touching, never interpenetrating
            assert min(p.contact_angstrom) <= 2.9 + 1e-6


def test_particles_rest_on_the_carbon_film():
    config = small_config()
    conditions, _, cell = _scene(config, 3, 0)
    carbon_z = cell.positions[: cell.n_carbon, 2]
    for atoms in cell.particle_atoms:
        if conditions["particles_side"] == "beam_entrance":
            assert 2.0 < carbon_z.min() - atoms[:, 2].max() < 3.0
        else:
            assert 2.0 < atoms[:, 2].min() - carbon_z.max() < 3.0
    assert sum(cell.slices) == pytest.approx(cell.size[2])
    assert max(cell.slices) <= config.slice_thickness_angstrom + 1e-9


# --------------------------------------------------------------------------------------------
# Detector


@pytest.mark.parametrize("mode", ["counting", "integrating"])
def test_dose_gives_poisson_counts(mode):
    rng = np.random.default_rng(0)
    dose = 60.0
    counts, expected = detect(np.ones((512, 512)), 2, dose, {"mode": mode, "mtf_nu0": 0.5, "mtf_power": 2.0}, rng)
    n = counts.size
    assert counts.shape == (256, 256) and counts.dtype == np.float32
    assert float(expected.mean()) == pytest.approx(dose)
    assert abs(float(counts.mean()) - dose) < 5 * math.sqrt(dose / n)
    if mode == "counting":  # signal blurred, then counted: Poisson, variance = mean
        assert float(counts.var()) == pytest.approx(dose, rel=0.03)
        assert np.array_equal(counts, np.round(counts))
    else:  # counted, then blurred: noise shares the MTF
        assert float(counts.var()) < 0.5 * dose


def test_detector_pixel_centres():
    # detector pixel j averages samples j*f .. j*f+f-1, so its centre is j*px + (px - s)/2
    intensity = np.zeros((8, 8))
    intensity[4:6, 2:4] = 1.0  # x samples 4,5 and y samples 2,3 with f = 2: detector (row 1, col 2)
    _, expected = detect(intensity, 2, 1000.0, {"mode": "counting", "mtf_nu0": 1e9, "mtf_power": 2.0},
                                  np.random.default_rng(0))
    assert np.unravel_index(np.argmax(expected), expected.shape) == (1, 2)
    rc = pixel_coordinates(np.array([[4.5 * 0.5, 2.5 * 0.5]]), 1.0, 0.5)  # mean positions of those samples
    assert rc.tolist() == [[1.0, 2.0]]


# --------------------------------------------------------------------------------------------
# Configuration


def test_config_refuses_nonsense_with_the_key_named():
    with pytest.raises(ValueError, match="materials"):
        SimulationConfig(materials={"Ag": 1.0})
    with pytest.raises(ValueError, match="pixel_size_nm"):
        SimulationConfig(pixel_size_nm=(0.05, 0.02))
    with pytest.raises(ValueError, match="do not fit"):
        SimulationConfig(size=64, pixel_size_nm=(0.02, 0.02))
    assert preset_config("papers-au").materials == {"Au": 1.0}
    assert "empty" not in preset_config("papers-au").classes


def test_help_does_not_import_abtem():
    code = "import sys; from latticewatch.cli import build_parser; build_parser(); print('abtem' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ)
    assert out.stdout.strip() == "False"


def test_without_abtem_simulate_names_the_extra(tmp_path):
    # an abtem that cannot be imported, first on the path: what a machine without the extra sees
    (tmp_path / "abtem.py").write_text("raise ImportError('not installed')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])])}
    argv = [sys.executable, "-m", "latticewatch", "simulate", "--n", "1", "--out", str(tmp_path / "sim")]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 2
    assert "error: simulate needs the [simulate] extra: pip install '.[simulate]'" in done.stderr
    assert not (tmp_path / "sim").exists()


# --------------------------------------------------------------------------------------------
# End to end: latticewatch simulate


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    pytest.importorskip("abtem")
    out = tmp_path_factory.mktemp("sim") / "a"
    assert main(["simulate", "--n", "2", "--out", str(out), "--seed", "3", *SMALL]) == 0
    return out


def _summary(capsys, argv):
    capsys.readouterr()
    code = main([*argv, "--json"])
    return code, json.loads(capsys.readouterr().out) if code in (0, 1) else None


def test_cli_writes_the_dataset_layout(dataset):
    from latticewatch.io.readers import read_frames

    names = sorted(p.stem for p in (dataset / "images").glob("*.mrc"))
    assert names == ["sim_000000", "sim_000001"]
    for name in names:
        record = json.loads((dataset / "particles" / f"{name}.json").read_text())
        with mrcfile.open(dataset / "images" / f"{name}.mrc") as mrc:
            assert mrc.data.dtype == np.float32 and mrc.data.shape == (128, 128)
            assert float(mrc.voxel_size.x) == pytest.approx(0.5, rel=1e-6)  # Å
            counts = np.array(mrc.data)
        frame = next(read_frames(dataset / "images" / f"{name}.mrc"))  # the daemon's strict reader
        assert frame.pixel_size_nm == pytest.approx(0.05, rel=1e-6)
        label = np.asarray(Image.open(dataset / "labels" / f"{name}.png"))
        instances = tifffile.imread(dataset / "instances" / f"{name}.tif")
        assert label.dtype == np.uint8 and set(np.unique(label)) <= {0, 255}
        assert instances.dtype == np.uint16
        assert np.array_equal(label == 255, instances > 0)
        # the instance map and the JSON agree
        particles = record["particles"]
        assert sorted(np.unique(instances[instances > 0]).tolist()) == [p["instance"] for p in particles]
        boxes = ndimage.find_objects(instances.astype(int))
        for p in particles:
            assert p["class"] in CLASSES and p["class"] != "empty"
            box = boxes[p["instance"] - 1]
            assert p["bbox"] == [box[0].start, box[1].start, box[0].stop, box[1].stop]
            assert p["area_px"] == int((instances == p["instance"]).sum())
            for m in p["members"]:
                assert {"material", "structure", "shape", "size_nm", "zone_axis", "defects",
                        "rotation_crystal_to_lab"} <= set(m)
            if p["class"] == "stacking_fault":
                assert p["defects"] and all(d["edge_on"] for d in p["defects"] if d["normal"] is not None)
            if p["class"] == "no_stacking_fault":
                assert p["defects"] == [] and p["zone_axis"] is not None
                assert set(p["stacking"]) and all(
                    a != b for a, b in zip(p["stacking"][:-2], p["stacking"][2:])) == (p["structure"] != "wurtzite")
        # dose: mean counts are the dose per pixel times the mean intensity (≤ 1: the antialias
        # aperture removes high-angle scattering)
        ratio = counts.mean() / record["conditions"]["dose_e_per_px"]
        assert 0.85 < ratio < 1.02
        # the atoms give the contrast: lattice detail is stronger inside the particles
        detail = counts - ndimage.uniform_filter(counts, 9)
        inside = instances > 0
        assert detail[inside].std() > 1.2 * detail[~inside].std()
    # crops: one per particle (+ bare carbon), listed in the index
    rows = (dataset / "crops" / "index.csv").read_text().splitlines()
    assert rows[0] == "crop,mask,class,image,instance,pixel_size_nm"
    for row in rows[1:]:
        crop, mask, cls, _, _, px = row.split(",")
        assert cls in CLASSES and float(px) == pytest.approx(0.05)
        with mrcfile.open(dataset / "crops" / crop) as mrc:
            side = mrc.data.shape
        m = np.asarray(Image.open(dataset / "crops" / mask))
        assert side[0] == side[1] >= 64 and m.shape == side
        if cls != "empty":
            assert m.any()
    card = (dataset / "README.md").read_text()
    assert "Dose (e⁻/Å²)" in card and "sim" not in card.split("```json")[1][:0]
    meta = json.loads((dataset / "dataset.json").read_text())
    assert meta["seed"] == 3 and meta["config"]["size"] == 128 and meta["generator"] == GENERATOR


def test_cli_resumes_and_refuses_other_settings(dataset, capsys):
    before = {p: p.stat().st_mtime_ns for p in dataset.rglob("*")
              if p.is_file() and p.suffix != ".md" and p.name not in ("index.csv", "dataset.json")}
    code, summary = _summary(capsys, ["simulate", "--n", "2", "--out", str(dataset), "--seed", "3", *SMALL])
    assert code == 0 and summary["simulated"] == 0 and summary["skipped"] == 2
    assert {p: p.stat().st_mtime_ns for p in before} == before
    # an incomplete image (its label lost) is made again, identically
    image = dataset / "images" / "sim_000001.mrc"
    original = mrcfile.read(image).copy()
    (dataset / "labels" / "sim_000001.png").unlink()
    code, summary = _summary(capsys, ["simulate", "--n", "2", "--out", str(dataset), "--seed", "3", *SMALL])
    assert code == 0 and summary["simulated"] == 1
    assert np.array_equal(mrcfile.read(image), original)
    # another seed or other settings in the same folder: refused, with what differs
    capsys.readouterr()
    assert main(["simulate", "--n", "2", "--out", str(dataset), "--seed", "4", *SMALL]) == 2
    assert "seed" in capsys.readouterr().err
    assert main(["simulate", "--n", "2", "--out", str(dataset), "--seed", "3", *SMALL[:-2], "1", "1"]) == 2
    assert "particles_per_image" in capsys.readouterr().err


def test_same_seed_same_images_whatever_the_workers(dataset, tmp_path):
    other = tmp_path / "b"
    assert main(["simulate", "--n", "2", "--out", str(other), "--seed", "3", "--workers", "2", *SMALL]) == 0
    for name in ("sim_000000", "sim_000001"):
        image, instances = f"images/{name}.mrc", f"instances/{name}.tif"
        assert np.array_equal(mrcfile.read(dataset / image), mrcfile.read(other / image))
        assert np.array_equal(tifffile.imread(dataset / instances), tifffile.imread(other / instances))
        a = json.loads((dataset / "particles" / f"{name}.json").read_text())
        b = json.loads((other / "particles" / f"{name}.json").read_text())
        for timing in ("seconds", "cpu_seconds"):
            a.pop(timing), b.pop(timing)
        assert a == b
