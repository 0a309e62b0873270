"""`latticewatch evaluate` end to end on real MRC + PNG files, with the shipped nanoparticle profile."""

import json

import mrcfile
import numpy as np
import pytest
from analytic_files import copy_profile, write_analytic_set
from PIL import Image
from sklearn import metrics as skm

from latticewatch.cli import main
from latticewatch.frame import Frame
from latticewatch.models.manifest import read_manifest
from latticewatch.runtime.analyser import Analyser
from latticewatch.stages.preprocess import preprocess
from latticewatch.training.assess.baselines import baseline_from_dict
from latticewatch_nanoparticles import profile_dir

KEYS = {"dice", "jaccard", "precision", "recall", "accuracy", "balanced_accuracy", "confusion_matrix"}


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    # 0.025 nm/px in the header: the analyser must resample to the model's 0.05 nm/px
    return write_analytic_set(tmp_path_factory.mktemp("eval"), 6, side=768, pixel_size_nm=0.025, seed=2)


@pytest.fixture(scope="module")
def report(labelled):
    images, labels = labelled
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["evaluate", "--profile", str(profile_dir), "--images", str(images), "--labels", str(labels),
                     "--json", "--per-image"])
    assert code == 0, err.getvalue()
    return json.loads(out.getvalue()), err.getvalue()


def test_json_report_has_every_key_and_the_model_wins(report):
    r, stderr = report
    assert {"model", "baselines", "n_images", "profile", "threshold", "model_isolated", "baseline_fit"} <= set(r)
    assert r["n_images"] == 6 and r["profile"] == "nanoparticles@" + read_manifest(profile_dir).version
    assert r["threshold"] == read_manifest(profile_dir).segmentation.threshold
    assert set(r["baselines"]) == {"otsu", "fourier", "bragg"}
    for block in [r["model"], r["model_isolated"], *r["baselines"].values()]:
        assert KEYS <= set(block)
        assert [p["name"] for p in block["per_image"]] == [f"frame_{i:03d}" for i in range(6)]
        assert KEYS <= set(block["per_image"][0])
    assert r["model"]["dice"] > 0.5
    assert r["model"]["dice"] > r["baselines"]["otsu"]["dice"]
    # no fitted baselines in the shipped manifest and no fitting set: cross-fitted, and said so
    fit = r["baseline_fit"]
    assert fit["source"] == "cross_fit" and len(fit["groups"]) == 2
    scored = [n for g in fit["groups"] for n in g["images"]]
    assert sorted(scored) == [f"frame_{i:03d}" for i in range(6)]
    assert "warning: baseline parameters" in stderr and "fitted on one half of the evaluation set" in stderr


def _nearest(mask: np.ndarray, shape) -> np.ndarray:
    """Nearest-pixel-centre resize, written out independently of the package."""
    rows = np.minimum(((np.arange(shape[0]) + 0.5) * mask.shape[0] / shape[0]).astype(int), mask.shape[0] - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) * mask.shape[1] / shape[1]).astype(int), mask.shape[1] - 1)
    return mask[np.ix_(rows, cols)]


def _flat(preds, truths):
    return np.concatenate([x.ravel() for x in truths]), np.concatenate([x.ravel() for x in preds])


def _sklearn(preds, truths) -> dict:
    t, p = _flat(preds, truths)
    return {"dice": skm.f1_score(t, p), "jaccard": skm.jaccard_score(t, p), "precision": skm.precision_score(t, p),
            "recall": skm.recall_score(t, p), "accuracy": skm.accuracy_score(t, p),
            "balanced_accuracy": skm.balanced_accuracy_score(t, p),
            "confusion_matrix": skm.confusion_matrix(t, p).tolist()}


def _from_confusion(preds, truths) -> dict:
    """The textbook formulas on scikit-learn's confusion matrix (all of scikit-learn per method is slow)."""
    (tn, fp), (fn, tp) = skm.confusion_matrix(*_flat(preds, truths)).tolist()
    return {"dice": 2 * tp / (2 * tp + fp + fn), "jaccard": tp / (tp + fp + fn), "precision": tp / (tp + fp),
            "recall": tp / (tp + fn), "accuracy": (tp + tn) / (tp + tn + fp + fn),
            "balanced_accuracy": (tp / (tp + fn) + tn / (tn + fp)) / 2, "confusion_matrix": [[tn, fp], [fn, tp]]}


def test_metrics_equal_an_independent_recomputation_from_the_files(report, labelled):
    r, _ = report
    images, labels = labelled
    analyser = Analyser(profile_dir)
    seg = analyser.manifest.segmentation
    params = {n: g["params"] for g in r["baseline_fit"]["groups"] for n in g["images"]}
    model_preds, truths, baseline_preds = [], [], {"otsu": [], "fourier": [], "bragg": []}
    for i in range(6):
        name = f"frame_{i:03d}"
        with mrcfile.open(images / f"{name}.mrc", permissive=False) as mrc:
            pixels, pixel_size = mrc.data.copy(), float(mrc.voxel_size.x) / 10.0
        truth = np.asarray(Image.open(labels / f"{name}.png")) > 0
        analysis = analyser.analyse(Frame(name, pixels, pixel_size), keep_probability=True)
        model_preds.append(analysis.probability >= r["threshold"])
        truths.append(truth)
        model_image = preprocess(pixels, pixel_size, normalisation=seg.normalisation,
                                 model_pixel_size_nm=seg.pixel_size_nm).image
        assert model_image.shape == (384, 384)  # resampled from 0.025 to 0.05 nm/px
        for kind, p in params[name].items():
            baseline_preds[kind].append(_nearest(baseline_from_dict(p).predict(model_image), truth.shape))
    for computed, expected in [(r["model"], _sklearn(model_preds, truths))] + [
        (r["baselines"][k], _from_confusion(v, truths)) for k, v in baseline_preds.items()
    ]:
        for key in KEYS - {"confusion_matrix"}:
            assert computed[key] == pytest.approx(expected[key], abs=1e-12), key
        assert computed["confusion_matrix"] == expected["confusion_matrix"]
    first = _from_confusion(model_preds[:1], truths[:1])
    assert r["model"]["per_image"][0]["dice"] == pytest.approx(first["dice"], abs=1e-12)


@pytest.fixture
def small(tmp_path):
    return write_analytic_set(tmp_path / "small", 2, side=128, pixel_size_nm=0.05, seed=1)


def test_table_output_and_baseline_sources(small, tmp_path, capsys):
    images, labels = small
    # parameters fitted by `calibrate baselines` and stored in a profile copy are used as they are
    profile = copy_profile(profile_dir, tmp_path / "profile")
    assert main(["calibrate", "baselines", "--profile", str(profile), "--images", str(images), "--labels", str(labels),
                 "--baselines", "otsu,bragg"]) == 0
    assert "stored in the manifest" in capsys.readouterr().out
    stored = read_manifest(profile).baselines
    assert set(stored) == {"otsu", "bragg"} and stored["bragg"]["kind"] == "bragg"
    assert main(["evaluate", "--profile", str(profile), "--images", str(images), "--labels", str(labels),
                 "--baselines", "otsu,bragg", "--threshold", "0.4"]) == 0
    out, err = capsys.readouterr()
    assert "model (p >= 0.40)" in out and "bragg baseline" in out and "fourier" not in out
    assert "parameters stored in the profile manifest" in out and "warning" not in err
    # a separate fitting set
    assert main(["evaluate", "--profile", str(profile_dir), "--images", str(images), "--labels", str(labels), "--json",
                 "--baselines", "otsu", "--fit-images", str(images), "--fit-labels", str(labels)]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["baseline_fit"]["source"] == "fit_set" and list(r["baselines"]) == ["otsu"]
    assert "per_image" not in r["model"]


def test_no_baselines(small, capsys):
    images, labels = small
    assert main(["evaluate", "--profile", str(profile_dir), "--images", str(images), "--labels", str(labels),
                 "--baselines", "none", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["baselines"] == {} and r["baseline_fit"] is None and r["n_images"] == 2


def test_missing_and_unreadable_labels_exit_2_naming_the_file(small, capsys):
    images, labels = small
    argv = ["evaluate", "--profile", str(profile_dir), "--images", str(images), "--labels", str(labels)]
    (labels / "frame_001.png").unlink()
    assert main([*argv, "--baselines", "none"]) == 2
    assert "frame_001.mrc: no label frame_001.png/.tif in" in capsys.readouterr().err
    (labels / "frame_001.png").write_bytes(b"not a png at all")
    assert main([*argv, "--baselines", "none"]) == 2
    assert "frame_001.png: unreadable label" in capsys.readouterr().err
    assert main([*argv, "--baselines", "sobel"]) == 2
    assert "unknown baseline(s) sobel" in capsys.readouterr().err
