"""`latticewatch train-classifier`: the 500-tree forest from a crops index of real MRC + PNG files."""

import numpy as np
import pytest
from analytic_files import copy_profile, write_crops_index

from latticewatch.cli import main
from latticewatch.frame import CLASSES, Frame
from latticewatch.models.manifest import read_manifest, sha256_of
from latticewatch.runtime.analyser import Analyser
from latticewatch.stages.classify import FlatForest, load_forest
from latticewatch.testing.synthetic.frames import generate_frame
from latticewatch.training.fit.classifier import features_from_index, read_crop_index, split_by_image
from latticewatch_nanoparticles import profile_dir


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    return write_crops_index(tmp_path_factory.mktemp("sim"), 6, size_px=128, seed=0)


def test_train_classifier_from_a_crops_index_updates_a_loadable_profile(index, tmp_path, capsys):
    profile = copy_profile(profile_dir, tmp_path / "profile")
    old_forest_sha = read_manifest(profile).files["forest.skops"]
    assert main(["train-classifier", "--out", str(profile), "--crops", str(index), "--seed", "1",
                 "--test-fraction", "0.2"]) == 0
    out = capsys.readouterr().out
    assert "balanced accuracy on the held-out images" in out and "confusion matrix" in out

    manifest = read_manifest(profile)  # verifies every sha256, the new forest's included
    assert manifest.files["forest.skops"] == sha256_of(profile / "forest.skops") != old_forest_sha
    assert manifest.files["unet.onnx"] == read_manifest(profile_dir).files["unet.onnx"]  # segmentation kept
    training = manifest.training["classifier"]
    m = training.metrics
    assert "train-classifier --out" in training.command and "index.csv" in training.data
    assert 0.0 <= m["balanced_accuracy"] <= 1.0
    assert m["classes"] == list(CLASSES) and np.array(m["confusion_matrix"]).shape == (5, 5)
    assert np.sum(m["confusion_matrix"]) == m["n_test"] and m["n_test"] + m["n_train"] == 30
    assert m["n_images_train"] + m["n_images_test"] == 6 and m["n_images_test"] >= 1
    assert manifest.classifier.features == ("fft_mean", "fft_std", "fft_com", "real_mean", "real_std")

    forest = load_forest(profile / "forest.skops")
    assert forest.n_estimators == 500 and forest.criterion == "gini" and forest.class_weight == "balanced"
    assert forest.n_jobs == 1
    # inference loads the flattened arrays: the same forest, bit for bit
    assert manifest.classifier.kind == "forest" and manifest.classifier.arrays == "forest.safetensors"
    assert manifest.files["forest.safetensors"] == sha256_of(profile / "forest.safetensors")
    X = np.random.default_rng(3).random((50, 5))
    np.testing.assert_array_equal(FlatForest.load(profile / "forest.safetensors").predict_proba(X),
                                  forest.predict_proba(X))
    # held-out SF/no-SF rows: labelled SF, no-SF, anything else
    sf, nosf = ((*np.array(m["confusion_matrix"])[i, :2].tolist(), int(np.sum(m["confusion_matrix"][i][2:])))
                for i in (0, 1))
    confusion = manifest.classifier.defect_confusion
    if sum(sf[:2]) and sum(nosf[:2]):
        assert (confusion.true_stacking_fault, confusion.true_no_stacking_fault) == (sf, nosf)
    else:  # too few held-out crops of the two to measure anything
        assert confusion is None

    analyser = Analyser(profile)
    sample = generate_frame(np.random.default_rng(5), shape=(256, 256), pixel_size_nm=0.05, n_particles=3,
                            dose_range=(150.0, 200.0))
    analysis = analyser.analyse(Frame("f", sample.image, 0.05))
    assert analysis.regions and all(r.label in CLASSES for r in analysis.regions)


def test_crops_of_one_image_never_straddle_the_split(index):
    manifest = read_manifest(profile_dir)
    features = features_from_index(index, manifest)
    assert features.X.shape == (30, 5) and np.isfinite(features.X).all()
    for seed in range(5):
        train, test = split_by_image(features.y, features.groups, 0.2, seed)
        assert set(features.groups[train]).isdisjoint(features.groups[test])
        assert sorted(np.r_[train, test].tolist()) == list(range(30))
        assert 1 <= len(set(features.groups[test])) <= 2
    rows = read_crop_index(index)
    assert {r.label for r in rows} == set(CLASSES) and rows[0].pixel_size_nm == 0.05


def test_synthetic_regions(tmp_path, capsys):
    profile = copy_profile(profile_dir, tmp_path / "profile")
    assert main(["train-classifier", "--out", str(profile), "--synthetic", "5"]) == 0
    m = read_manifest(profile).training["classifier"].metrics
    assert m["n_train"] + m["n_test"] == 25 and m["n_test"] == 5
    assert "analytic generator" in read_manifest(profile).training["classifier"].data
    capsys.readouterr()


def test_bad_index_and_bad_profile_are_usage_errors(index, tmp_path, capsys):
    bad = tmp_path / "index.csv"
    bad.write_text("crop,mask,class,image,instance,pixel_size_nm\na.mrc,a.png,twinned,img,1,0.05\n")
    profile = copy_profile(profile_dir, tmp_path / "profile")
    assert main(["train-classifier", "--out", str(profile), "--crops", str(bad)]) == 2
    assert "index.csv, line 2: class: Value error, class 'twinned' is not one of" in capsys.readouterr().err
    bad.write_text("crop,class\n")
    assert main(["train-classifier", "--out", str(profile), "--crops", str(bad)]) == 2
    assert "missing column(s) mask, image, instance, pixel_size_nm" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["train-classifier", "--out", str(tmp_path / "empty"), "--crops", str(index)]) == 2
    assert "no manifest.json" in capsys.readouterr().err
