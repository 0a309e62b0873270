"""The analyser's classifier by kind: the shipped forest from its arrays (no scikit-learn), a CNN profile, an old
profile with only the skops forest."""

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from latticewatch.errors import ModelError
from latticewatch.frame import CLASSES, UNCERTAIN, Frame
from latticewatch.models.backends.onnxruntime import OnnxRuntimeBackend
from latticewatch.models.manifest import read_manifest, sha256_of, update_manifest
from latticewatch.runtime.analyser import Analyser
from latticewatch.stages.classify import CnnRegionClassifier
from latticewatch.stages.crops import CropSpec
from latticewatch.stages.isolate import clean_labels, measure
from latticewatch.testing.synthetic.frames import generate_frame
from latticewatch_nanoparticles import profile_dir

RANDOM_CNN = Path(__file__).resolve().parents[1] / "fixtures" / "random_cnn.onnx"


@pytest.fixture(scope="module")
def frame():
    sample = generate_frame(np.random.default_rng(11), shape=(384, 384), pixel_size_nm=0.05, n_particles=5,
                            dose_range=(150.0, 200.0))
    return Frame("f", sample.image, 0.05)


def copy_profile(tmp_path: Path) -> Path:
    out = tmp_path / "profile"
    shutil.copytree(profile_dir, out, ignore=shutil.ignore_patterns("__init__.py", "__pycache__"))
    return out


def test_shipped_cnn_and_its_baseline_forest_load_from_onnx_and_arrays(frame):
    files = read_manifest(profile_dir).files
    for choice, name in (("profile", "cnn.onnx"), ("baseline", "forest.safetensors")):
        analyser = Analyser("nanoparticles", threads=1, classifier=choice)
        assert analyser.model_ids["classifier"] == f"{name}:{files[name][:12]}"
        analysis = analyser.analyse(frame)
        assert analysis.regions and all(r.label in (*CLASSES, UNCERTAIN) for r in analysis.regions)
        assert all(sum(r.probabilities.values()) == pytest.approx(1.0) for r in analysis.regions)


def test_a_profile_without_a_baseline_refuses_to_use_one(tmp_path):
    out = copy_profile(tmp_path)
    update_manifest(out, lambda m: m.pop("baseline_classifier"))
    with pytest.raises(ModelError, match="has no baseline_classifier"):
        Analyser(out, threads=1, classifier="baseline")


def test_process_imports_no_training_stack(tmp_path, frame):
    """A cold ``process`` must not pay for scikit-learn, skops, torch or the training code (seconds each)."""
    import mrcfile

    path = tmp_path / "frame.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(frame.pixels)
        mrc.voxel_size = 0.5  # Å
    heavy = ["sklearn", "skops", "torch", "matplotlib", "pandas", "latticewatch.training"]
    script = (f"import sys; from latticewatch.cli import main; code = main(['process', {str(path)!r}, '--out', "
              f"{str(tmp_path / 'out')!r}, '--json']); "
              f"print(sorted(m for m in {heavy!r} if m in sys.modules), file=sys.stderr); sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "[]"
    assert json.loads(done.stdout)["frames"][0]["particles"] > 0


@pytest.fixture(scope="module")
def cnn_profile(tmp_path_factory):
    out = copy_profile(tmp_path_factory.mktemp("cnn"))
    shutil.copy(RANDOM_CNN, out / "random_cnn.onnx")

    def to_cnn(m):
        m["files"]["random_cnn.onnx"] = sha256_of(out / "random_cnn.onnx")
        m["classifier"] = {"kind": "cnn", "onnx": "random_cnn.onnx", "classes": list(CLASSES),
                           "input": {"size_px": 32}, "uncertain_below": 0.43}

    update_manifest(out, to_cnn)
    return out


def test_cnn_profile_classifies_crops_of_the_model_input(cnn_profile, frame):
    analyser = Analyser(cnn_profile, threads=1)
    assert analyser.model_ids["classifier"].startswith("random_cnn.onnx:")
    prepared = analyser.prepare(frame)
    probability = analyser.segment_batch([prepared])[0]
    # the CNN's verdicts, computed here from the same model input and regions
    labels = clean_labels(probability, analyser.manifest.isolation, prepared.pre.pixel_size_nm)
    regions = measure(labels)
    direct = CnnRegionClassifier(OnnxRuntimeBackend(RANDOM_CNN, threads=1), CLASSES, CropSpec(size_px=32),
                                 uncertain_below=0.43)(prepared.pre.image, labels, regions)
    analysis = analyser.finish(prepared, probability)
    assert len(analysis.regions) == len(direct) >= 3
    for region, (label, probs) in zip(analysis.regions, direct):
        assert region.label == label
        assert region.probabilities == pytest.approx(probs, abs=1e-6)
        assert region.features  # still measured for the events
    # the fixture's random net is unsure of most regions: both outcomes of the manifest's threshold occur
    assert UNCERTAIN in {r.label for r in analysis.regions} and {r.label for r in analysis.regions} & set(CLASSES)


def test_profile_without_arrays_loads_its_skops_forest_and_says_so(tmp_path, frame, caplog):
    out = copy_profile(tmp_path)

    def drop_arrays(m):  # the shipped baseline forest as the classifier of a profile written before the arrays
        m["classifier"] = m.pop("baseline_classifier")
        del m["classifier"]["arrays"], m["classifier"]["kind"], m["files"]["forest.safetensors"]

    update_manifest(out, drop_arrays)
    (out / "forest.safetensors").unlink()
    with caplog.at_level(logging.WARNING, logger="latticewatch.runtime.analyser"):
        old = Analyser(out, threads=1)
    assert "no flattened arrays" in caplog.text
    assert old.model_ids["classifier"].startswith("forest.skops:")
    new = Analyser("nanoparticles", threads=1, classifier="baseline")
    assert [(r.label, r.probabilities) for r in old.analyse(frame).regions] == \
        [(r.label, r.probabilities) for r in new.analyse(frame).regions]
