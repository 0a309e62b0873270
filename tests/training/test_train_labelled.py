"""`latticewatch train --images/--labels`: augmentation alignment, series-grouped validation,
resumable checkpoints, and a profile that `latticewatch process` loads and runs (tiny settings)."""

import json

import numpy as np
import pytest
from scipy import ndimage

pytest.importorskip("torch")

from latticewatch.cli import main  # noqa: E402
from latticewatch.models.manifest import read_manifest  # noqa: E402
from latticewatch.training.assess.metrics import METRIC_KEYS  # noqa: E402
from latticewatch.training.data.augment import random_rotation_crop, rotate_crop  # noqa: E402
from latticewatch.training.data.labelled import series_of  # noqa: E402
from latticewatch.training.data.supervised import validation_split  # noqa: E402
from latticewatch.training.fit.unet import CheckpointError, UNetTrainingConfig, train_unet  # noqa: E402

TINY = ["--steps", "4", "--batch-size", "2", "--crop", "64", "--eval-every", "2", "--threads", "1", "--lr", "1e-3"]


def test_rotation_by_quarter_turns_equals_rot90_and_flip():
    rng = np.random.default_rng(0)
    image = rng.random((48, 48)).astype(np.float32)
    mask = image > 0.7
    centre = (23.5, 23.5)
    for k in range(4):
        x, y = rotate_crop(image, mask, angle_deg=90 * k, flip=False, centre=centre, crop=48)
        np.testing.assert_allclose(x, np.rot90(image, k), atol=1e-5)
        assert (y.astype(bool) == np.rot90(mask, k)).all()
    x, y = rotate_crop(image, mask, angle_deg=0, flip=True, centre=centre, crop=48)
    np.testing.assert_allclose(x, image[:, ::-1], atol=1e-5)


def test_arbitrary_rotations_keep_image_and_mask_aligned():
    """The image encodes its own mask (bright inside, dark outside): after any rotation, flip and
    crop, thresholding the image must give back the transformed mask except on the outline."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:128, :128]
    # asymmetric: an ellipse and a box
    mask = ((yy - 40) ** 2 / 30**2 + (xx - 70) ** 2 / 15**2 < 1) | ((yy > 90) & (xx < 40))
    image = mask.astype(np.float32)
    for _ in range(20):
        x, y = random_rotation_crop(rng, image, mask, 96)
        assert x.shape == y.shape == (96, 96)
        disagree = (x >= 0.5) != y.astype(bool)
        inside = y.astype(bool)
        # a 1-px band on both sides
        outline = ndimage.binary_dilation(inside) & ~ndimage.binary_erosion(inside, border_value=1)
        assert inside.any() and not (disagree & ~outline).any()
        assert disagree.sum() <= 0.5 * outline.sum()  # linear vs nearest sampling differ only at some edge pixels


def test_validation_split_never_splits_a_series():
    names = [f"s{i:02d}_layer_{j:04d}" for i in range(9) for j in range(i % 3 + 1)] + ["single_a", "single_b"]
    train, val = validation_split(names, 0.2, seed=3)
    assert set(train) | set(val) == set(names) and not set(train) & set(val)
    assert {series_of(n) for n in train}.isdisjoint({series_of(n) for n in val})
    assert 0.1 <= len(val) / len(names) <= 0.35


def test_training_resumes_exactly_where_it_stopped(tmp_path, lattice_frame):
    rng = np.random.default_rng(2)
    pairs = [lattice_frame(rng, 64) for _ in range(4)]
    images = [p[0].astype(np.float32) for p in pairs]
    masks = [p[1] for p in pairs]
    config = UNetTrainingConfig(widths=(4, 8), crop=48, batch_size=2, max_steps=6, eval_every=3, learning_rate=1e-3,
                                augment="rotate")
    train, val = (images[:3], masks[:3]), (images[3:], masks[3:])
    straight = train_unet(train, val, config, progress=False)
    checkpoint = tmp_path / "checkpoint.safetensors"
    first = train_unet(train, val, config, progress=False, checkpoint=checkpoint, until_step=4)
    assert first.steps == 4 and checkpoint.is_file()
    resumed = train_unet(train, val, config, progress=False, checkpoint=checkpoint, resume=True)
    assert resumed.steps == 6 and resumed.history == straight.history
    for key, value in straight.net.state_dict().items():
        np.testing.assert_allclose(resumed.net.state_dict()[key].numpy(), value.numpy(), atol=1e-6, err_msg=key)
    other = UNetTrainingConfig(**{**config.__dict__, "widths": (4, 8, 16)})
    with pytest.raises(CheckpointError, match="widths"):
        train_unet((images[:3], masks[:3]), None, other, progress=False, checkpoint=checkpoint, resume=True)


def test_train_on_png_files_writes_a_profile_that_process_runs(tmp_path, labelled_png, capsys):
    images, labels = labelled_png
    out = tmp_path / "profile"
    argv = ["train", "--images", str(images), "--labels", str(labels), "--out", str(out), "--name", "tiny-graphene",
            "--arch", "fpn", "--widths", "4", "8", "8", "16", "--normalisation", "bezier_zscore",
            "--pixel-size-nm", "none", "--val-fraction", "0.25", "--foreground", "contamination",
            "--low-value-class", "1", *TINY]
    assert main(argv) == 0
    assert "validation Dice" in capsys.readouterr().out
    manifest = read_manifest(out)  # verifies every sha256
    seg = manifest.segmentation
    assert (seg.architecture, seg.widths, seg.pixel_size_nm, seg.normalisation) == (
        "fpn", (4, 8, 8, 16), None, "bezier_zscore")
    assert manifest.classifier is None and manifest.archive.low_value_class == 1
    assert set(manifest.files) == {"fpn.onnx", "fpn.safetensors"} and not (out / "checkpoint.safetensors").exists()
    training = manifest.training["segmentation"]
    # recorded relative to the folder holding the data set (tmp_path/png), never as absolute paths
    assert training.command == "latticewatch " + " ".join(argv).replace(f"{tmp_path}/", "")
    assert str(tmp_path) not in training.command + training.data and "png/images" in training.data
    validation = training.metrics["validation"]
    assert set(METRIC_KEYS) <= set(validation) and validation["n_images"] == len(validation["images"]) >= 2
    trained_on = {p.stem for p in images.iterdir()} - set(validation["images"])
    assert {series_of(n) for n in trained_on}.isdisjoint({series_of(n) for n in validation["images"]})
    assert training.metrics["onnx_parity"]["max_abs_diff"] <= 1e-4

    frame = sorted(images.iterdir())[0]
    assert main(["process", str(frame), "--out", str(tmp_path / "reports"), "--profile", str(out), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["frames"][0]
    assert row["content_ratio"] == pytest.approx(1 - row["coverage"], abs=1e-5)
    assert row["class_counts"]["stacking_fault"] == 0  # no classifier: regions stay unclassified


def test_train_on_mrc_files_resamples_to_the_model_pixel_size(tmp_path, capsys, write_labelled_set):
    images, labels = write_labelled_set(tmp_path / "mrc", 6, fmt="mrc", side=128, pixel_size_nm=0.025, seed=5)
    out = tmp_path / "profile"
    assert main(["train", "--images", str(images), "--labels", str(labels), "--out", str(out), "--name", "tiny-mrc",
                 "--widths", "4", "8", "--pixel-size-nm", "0.05", "--val-fraction", "0.3", *TINY]) == 0
    capsys.readouterr()
    manifest = read_manifest(out)
    assert manifest.segmentation.pixel_size_nm == 0.05 and manifest.segmentation.architecture == "unet"
    assert "0.05 nm/px" in manifest.training["segmentation"].data
    frame = sorted(images.iterdir())[0]
    assert main(["process", str(frame), "--out", str(tmp_path / "reports"), "--profile", str(out), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["frames"][0]
    assert row["pixel_size_nm"] == pytest.approx(0.025) and row["shape"] == [128, 128]

    # without --pixel-size-nm the images' own sampling is the model's
    assert main(["train", "--images", str(images), "--labels", str(labels), "--out", str(tmp_path / "own"),
                 "--widths", "4", "8", "--val-fraction", "0", *TINY]) == 0
    own = read_manifest(tmp_path / "own")
    assert own.segmentation.pixel_size_nm == pytest.approx(0.025)
    assert "validation" not in own.training["segmentation"].metrics  # trained on all images for --steps


def test_train_usage_errors(tmp_path, labelled_png, capsys):
    images, labels = labelled_png
    assert main(["train", "--images", str(images), "--out", str(tmp_path / "p")]) == 2
    assert "--images needs --labels" in capsys.readouterr().err
    assert main(["train", "--images", str(images), "--labels", str(labels), "--out", str(tmp_path / "p"),
                 "--arch", "resnet18-unet", "--widths", "8", "16"]) == 2
    assert "needs 4 widths" in capsys.readouterr().err
    assert main(["train", "--images", str(images), "--labels", str(tmp_path), "--out", str(tmp_path / "p"), *TINY]) == 2
    assert "no label" in capsys.readouterr().err
