"""`latticewatch cross-validate`: series-grouped folds, pooled and per-fold metrics for the net and
the Bragg baseline, JSON written per fold and resumable (tiny nets, a few steps)."""

import json

import numpy as np
import pytest

pytest.importorskip("torch")

from latticewatch.cli import main  # noqa: E402
from latticewatch.training.assess.metrics import METRIC_KEYS, PixelCounts, segmentation_metrics  # noqa: E402
from latticewatch.training.data.labelled import series_of  # noqa: E402

TINY = ["--arch", "fpn", "--widths", "4", "8", "8", "16", "--steps", "2", "--batch-size", "2", "--crop", "64",
        "--eval-every", "2", "--threads", "1", "--normalisation", "bezier_zscore", "--pixel-size-nm", "none"]


def counts(entry) -> PixelCounts:
    (tn, fp), (fn, tp) = entry["metrics"]["confusion_matrix"]
    return PixelCounts(tp, fp, fn, tn)


def test_cross_validate_writes_folds_pooled_and_baseline(tmp_path, labelled_png, capsys):
    images, labels = labelled_png
    out = tmp_path / "cv.json"
    argv = ["cross-validate", "--images", str(images), "--labels", str(labels), "--folds", "3", "--baselines", "bragg",
            "--json", str(out), *TINY]
    assert main(argv) == 0
    captured = capsys.readouterr()
    folds = [line.split(":")[0] for line in captured.err.splitlines() if line.startswith("fold")]
    assert folds == ["fold 1/3", "fold 2/3", "fold 3/3"]
    assert "pooled" in captured.out and "bragg" in captured.out

    result = json.loads(out.read_text())
    assert result["command"] == "latticewatch " + " ".join(argv).replace(f"{tmp_path}/", "")  # no absolute paths
    folds = result["fold_names"]
    assert sorted(sum(folds, [])) == sorted(p.stem for p in images.iterdir())
    series = [{series_of(n) for n in fold} for fold in folds]
    assert all(a.isdisjoint(b) for i, a in enumerate(series) for b in series[i + 1 :])  # no series straddles folds
    for block in (result["model"], result["baselines"]["bragg"]):
        assert [f["fold"] for f in block["per_fold"]] == [1, 2, 3]
        pooled = sum((counts(f) for f in block["per_fold"]), PixelCounts())
        assert block["pooled"] == segmentation_metrics(pooled)  # pooled over every test pixel
        for key in METRIC_KEYS:
            values = [f["metrics"][key] for f in block["per_fold"]]
            assert block["mean"][key] == pytest.approx(np.mean(values))
            assert block["std"][key] == pytest.approx(np.std(values, ddof=1))
    for fold, entry in zip(folds, result["model"]["per_fold"]):
        assert sorted(entry["per_image"]) == fold and entry["n_test"] == len(fold)
        assert entry["test_series"] == sorted({series_of(n) for n in fold})
    assert result["baselines"]["bragg"]["per_fold"][0]["params"]["kind"] == "bragg"


def test_cross_validate_resumes_finished_folds(tmp_path, labelled_png, capsys):
    images, labels = labelled_png
    out = tmp_path / "cv.json"
    argv = ["cross-validate", "--images", str(images), "--labels", str(labels), "--folds", "2", "--json", str(out),
            *TINY]
    assert main(argv) == 0
    first = json.loads(out.read_text())
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 0
    assert "resuming: folds [1, 2] already done" in capsys.readouterr().err
    again = json.loads(out.read_text())
    assert again["model"]["per_fold"] == first["model"]["per_fold"]


def test_too_many_folds_is_a_usage_error(tmp_path, labelled_png, capsys):
    images, labels = labelled_png  # 12 images in 6 series
    assert main(["cross-validate", "--images", str(images), "--labels", str(labels), "--folds", "7", *TINY]) == 2
    assert "cannot make 7 folds from 6 series" in capsys.readouterr().err


def test_train_records_cross_validation_in_the_manifest(tmp_path, labelled_png, capsys):
    from latticewatch.models.manifest import read_manifest

    images, labels = labelled_png
    cv = tmp_path / "cv.json"
    assert main(["cross-validate", "--images", str(images), "--labels", str(labels), "--folds", "2",
                 "--baselines", "bragg", "--json", str(cv), *TINY]) == 0
    out = tmp_path / "profile"
    assert main(["train", "--images", str(images), "--labels", str(labels), "--out", str(out), "--val-fraction", "0",
                 "--cross-validation", str(cv), *TINY]) == 0
    assert "no validation split" in capsys.readouterr().out
    recorded = read_manifest(out).training["cross_validation"]
    assert recorded.command == json.loads(cv.read_text())["command"]
    assert set(recorded.metrics["model"]) >= {"per_fold", "pooled", "mean", "std", "content_ratio_spearman"}
    assert "per_image" not in recorded.metrics["model"]["per_fold"][0]
    assert recorded.metrics["baselines"]["bragg"]["pooled"]["jaccard"] >= 0
