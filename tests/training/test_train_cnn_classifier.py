"""`latticewatch train-classifier --kind cnn`: a region CNN from a crops index of real MRC + PNG files."""

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from analytic_files import copy_profile, write_crops_index

from latticewatch.cli import main
from latticewatch.frame import CLASSES
from latticewatch.models.architectures import build_classifier
from latticewatch.models.manifest import read_manifest, sha256_of
from latticewatch.stages.crops import CropSpec
from latticewatch.training.assess.classifier_metrics import classification_metrics, condition_tables
from latticewatch.training.assess.defect_series import SeriesSpec, defect_series
from latticewatch.training.fit.cnn_classifier import (
    CnnTrainingConfig,
    crop_input,
    crops_from_index,
    predict,
    split_three,
)
from latticewatch_nanoparticles import profile_dir


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    return write_crops_index(tmp_path_factory.mktemp("sim"), 10, size_px=96, seed=0)


def test_train_classifier_cnn_writes_a_profile_whose_onnx_matches_torch(index, tmp_path, capsys):
    profile = copy_profile(profile_dir, tmp_path / "profile")
    assert main(["train-classifier", "--kind", "cnn", "--out", str(profile), "--crops", str(index), "--steps", "6",
                 "--eval-every", "3", "--batch-size", "8", "--crop-size", "48", "--threads", "1", "--seed", "2"]) == 0
    out = capsys.readouterr().out
    assert "test: balanced accuracy" in out and "classifier kind cnn" in out

    manifest = read_manifest(profile)  # every sha256 verified, the new files' included
    clf = manifest.classifier
    assert clf.kind == "cnn" and clf.onnx == "cnn.onnx" and clf.input == CropSpec(size_px=48)
    assert manifest.files["cnn.onnx"] == sha256_of(profile / "cnn.onnx")
    assert manifest.files["unet.onnx"] == read_manifest(profile_dir).files["unet.onnx"]  # segmentation kept
    training = manifest.training["classifier"]
    assert "train-classifier --kind cnn" in training.command and "index.csv" in training.data
    m = training.metrics
    assert m["n_train"] + m["n_validation"] + m["n_test"] == 50
    assert np.sum(m["test"]["confusion_matrix"]) == m["n_test"]
    assert json.loads(json.dumps(m)) == m  # plain JSON, no NaN

    # the exported graph is the trained net: same probabilities as eager torch on real inputs
    from safetensors.torch import load_file

    net = build_classifier("crop-cnn", 3, len(CLASSES))
    net.load_state_dict(load_file(profile / "cnn.safetensors"))
    crops = crops_from_index(index, manifest)
    rows = np.arange(7)
    x = np.stack([crop_input(crops, i, clf.input) for i in rows])
    session = ort.InferenceSession(str(profile / "cnn.onnx"), providers=["CPUExecutionProvider"])
    onnx_p = session.run(["probabilities"], {"crops": x})[0]
    np.testing.assert_allclose(onnx_p, predict(net, crops, rows, clf.input), atol=1e-5)
    np.testing.assert_allclose(onnx_p.sum(axis=1), 1.0, atol=1e-5)


def test_train_validation_and_test_never_share_a_source_image(index):
    crops = crops_from_index(index, read_manifest(profile_dir))
    for seed in range(4):
        split = split_three(crops, CnnTrainingConfig(seed=seed))
        sides = [set(crops.groups[rows].tolist()) for rows in split.values()]
        assert all(a.isdisjoint(b) for i, a in enumerate(sides) for b in sides[i + 1:])
        assert sorted(np.concatenate(list(split.values())).tolist()) == list(range(len(crops.y)))


def test_augmented_inputs_are_turned_copies_of_the_plain_input(index):
    crops = crops_from_index(index, read_manifest(profile_dir))
    spec = CropSpec(size_px=128, channels=("mask",))  # larger than the crops: the whole region is inside
    plain = crop_input(crops, 0, spec)[0]
    assert plain.sum() == crops.masks[0].sum()
    for seed in range(4):
        turned = crop_input(crops, 0, spec, np.random.default_rng(seed))[0]
        # one of the 8 turns/flips, re-centred on the turned region (rounding may move it by a pixel)
        assert any(np.array_equal(turned, np.roll(np.rot90(f, k), (dr, dc), axis=(0, 1)))
                   for f in (plain, plain[:, ::-1]) for k in range(4) for dr in (-1, 0, 1) for dc in (-1, 0, 1))


def test_uncertain_particles_leave_the_scores_and_the_bins_split_them():
    y = np.array([0, 0, 1, 1, 2])
    p = np.array([[0.9, 0.1, 0, 0, 0], [0.3, 0.25, 0.25, 0.1, 0.1], [0.2, 0.8, 0, 0, 0], [0.6, 0.4, 0, 0, 0],
                  [0, 0, 1.0, 0, 0]])
    m = classification_metrics(y, p, 0.5)
    assert m["coverage"] == 0.8 and m["confusion_matrix"][0][-1] == 1  # the 0.3 one is uncertain
    # the uncertain stacking fault is counted in the third column: it never reached a frame's fraction
    assert m["defect_confusion"] == {"true_stacking_fault": [1, 0, 1], "true_no_stacking_fault": [1, 1, 0]}
    tables = condition_tables(y, p, 0.5, [{"dose_e_per_a2": d, "material": "Au"} for d in (300, 300, 3000, 3000, 3000)])
    assert [row["n"] for row in tables["dose_e_per_a2"]] == [2, 3] and tables["material"][0]["n"] == 5


def test_defect_series_of_a_perfect_classifier_find_the_truth_and_a_blind_one_does_not():
    y = np.array([0] * 60 + [1] * 60)
    perfect = defect_series(y, y.copy(), None, SeriesSpec(n_series=30, frames=30))
    assert perfect["within_tolerance"] == 1.0 and perfect["interval_covers"] >= 0.9
    # the table beside it: 2, 4 and 10 particles a frame, the headline being the row of 4
    assert [(r["particles_per_frame"], r["particles_per_series"]) for r in perfect["table"]] == [(2, 60), (4, 120),
                                                                                               (10, 300)]
    assert perfect["table"][1]["median_abs_error"] == perfect["median_abs_error"]
    assert perfect["table"][0]["median_interval_width"] > perfect["table"][2]["median_interval_width"]
    blind = defect_series(y, np.zeros_like(y), None, SeriesSpec(n_series=30, frames=30))  # says SF always
    assert blind["within_tolerance"] < 0.2


def test_classifier_onnx_export_matches_torch_for_any_batch(tmp_path):
    from latticewatch.models.export import export_classifier_onnx

    net = build_classifier("crop-cnn", 2, 5).eval()
    export_classifier_onnx(net, tmp_path / "c.onnx", channels=2, size_px=32)
    session = ort.InferenceSession(str(tmp_path / "c.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 5):
        x = np.random.default_rng(n).normal(size=(n, 2, 32, 32)).astype(np.float32)
        with torch.no_grad():
            expected = net(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(session.run(["probabilities"], {"crops": x})[0], expected, atol=1e-5)


def test_evaluate_classifier_scores_the_cnn_and_the_forest_on_the_same_test_images(index, tmp_path, capsys):
    cnn = copy_profile(profile_dir, tmp_path / "cnn")
    assert main(["train-classifier", "--kind", "cnn", "--out", str(cnn), "--crops", str(index), "--steps", "4",
                 "--eval-every", "2", "--batch-size", "8", "--crop-size", "48", "--threads", "1", "--seed", "3"]) == 0
    forest = copy_profile(profile_dir, tmp_path / "forest")
    assert main(["train-classifier", "--out", str(forest), "--crops", str(index), "--seed", "3"]) == 0
    capsys.readouterr()
    results = {}
    for name, profile in (("cnn", cnn), ("forest", forest)):
        assert main(["evaluate-classifier", "--profile", str(profile), "--crops", str(index), "--test-split", "3",
                     "--json", "--record", "test_split_eval"]) == 0
        results[name] = json.loads(capsys.readouterr().out)
    trained = read_manifest(cnn).training
    # the CNN's own test scores (written by train-classifier) are what evaluate-classifier measures again
    assert results["cnn"]["metrics"]["confusion_matrix"] == trained["classifier"].metrics["test"]["confusion_matrix"]
    n_test_images = trained["classifier"].metrics["n_images_test"]
    assert results["cnn"]["n_images"] == results["forest"]["n_images"] == n_test_images
    assert results["forest"]["kind"] == "forest" and results["cnn"]["kind"] == "cnn"
    assert trained["test_split_eval"].metrics["n_crops"] == results["cnn"]["n_crops"]
    # all crops by default; the text report names the profile and the tables
    assert main(["evaluate-classifier", "--profile", str(cnn), "--crops", str(index)]) == 0
    out = capsys.readouterr().out
    assert "(cnn) on 50 crops" in out and "balanced accuracy" in out and "particles/frame" in out
