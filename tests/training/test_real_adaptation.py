"""Adapting a profile to real micrographs: photometric and scale augmentation, train-only extra
(simulated or analytic) images, and `train --init PROFILE` (tiny settings)."""

import json

import numpy as np
import pytest

pytest.importorskip("torch")

from safetensors.torch import load_file  # noqa: E402

from latticewatch.cli import main  # noqa: E402
from latticewatch.models.architectures import build_net  # noqa: E402
from latticewatch.models.manifest import read_manifest  # noqa: E402
from latticewatch.training.data.augment import random_intensity, random_rotation_crop, rotate_crop  # noqa: E402
from latticewatch.training.data.supervised import ExtraData, prepare_extra  # noqa: E402
from latticewatch.training.fit.unet import (  # noqa: E402
    UNetTrainingConfig,
    init_weights_path,
    load_init_weights,
    predict_images,
    train_unet,
)

TINY = ["--steps", "4", "--batch-size", "2", "--crop", "64", "--eval-every", "2", "--threads", "1", "--lr", "1e-3"]


def test_random_intensity_keeps_the_crop_statistics_and_varies_the_rest():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (64, 64)).astype(np.float32)
    outs = [random_intensity(rng, x) for _ in range(20)]
    for y in outs:
        assert y.dtype == np.float32
        assert abs(float(y.mean() - x.mean())) < 1e-3 and abs(float(y.std() - x.std())) < 1e-3
    assert sum(not np.allclose(y, x, atol=1e-4) for y in outs) >= 15


def test_scaled_crop_keeps_image_and_mask_aligned():
    yy, xx = np.mgrid[:96, :96]
    mask = (yy - 48) ** 2 + (xx - 48) ** 2 < 20**2
    image = mask.astype(np.float32)
    x, y = rotate_crop(image, mask, angle_deg=0, flip=False, centre=(47.5, 47.5), crop=64, scale=1.25)
    assert abs(int(y.sum()) - np.pi * (20 / 1.25) ** 2) < 40  # content shrinks by the scale
    assert ((x > 0.5) == y.astype(bool)).mean() > 0.97
    x, y = random_rotation_crop(np.random.default_rng(2), image, mask, 64, scale_jitter=0.3)
    assert x.shape == y.shape == (64, 64) and ((x > 0.5) == y.astype(bool)).mean() > 0.95


def test_without_scale_jitter_the_random_crops_are_the_ones_before_it_existed():
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    image = rng_a.random((80, 90)).astype(np.float32)
    rng_b.random((80, 90))
    x, y = random_rotation_crop(rng_a, image, image > 0.5, 48)
    # the draws as before: centre row, centre column, angle, flip
    centre = (float(rng_b.uniform(24, 56)) - 0.5, float(rng_b.uniform(24, 66)) - 0.5)
    expected = rotate_crop(image, image > 0.5, angle_deg=float(rng_b.uniform(0, 360)), flip=bool(rng_b.integers(2)),
                           centre=centre, crop=48)
    np.testing.assert_array_equal(x, expected[0])
    np.testing.assert_array_equal(y, expected[1])


@pytest.mark.parametrize("fraction, foreground", [(1.0, True), (0.0, False)])
def test_extra_images_make_up_their_share_of_the_crops(fraction, foreground):
    # real images all background, extra images all foreground: what the net learns is the share
    rng = np.random.default_rng(4)
    real = ([rng.random((48, 48)).astype(np.float32) for _ in range(2)], [np.zeros((48, 48), bool)] * 2)
    extra = ([rng.random((48, 48)).astype(np.float32) for _ in range(2)], [np.ones((48, 48), bool)] * 2)
    config = UNetTrainingConfig(widths=(4, 8), crop=32, batch_size=2, learning_rate=1e-2, max_steps=15, eval_every=15,
                                threads=1, augment="rotate", extra_fraction=fraction, intensity_augment=True)
    result = train_unet(real, None, config, progress=False, extra=extra)
    probability = float(predict_images(result.net, real[0])[0].mean())
    assert (probability > 0.5) == foreground


def test_analytic_extra_frames_need_a_known_pixel_size(tmp_path, labelled_png, capsys):
    images, labels = labelled_png
    extra, text = prepare_extra(ExtraData(n_synthetic=2, seed=3), normalisation="zscore", pixel_size_nm=0.05)
    assert len(extra.images) == 2 and text == "2 analytic 256² frames (seed 1003)"
    assert abs(float(extra.images[0].mean())) < 1e-3 and extra.masks[0].dtype == bool
    assert main(["train", "--images", str(images), "--labels", str(labels), "--out", str(tmp_path / "p"),
                 "--pixel-size-nm", "none", "--extra-synthetic", "2", *TINY]) == 2
    assert "need a known model pixel size" in capsys.readouterr().err


def test_adaptation_usage_errors(tmp_path, labelled_png, capsys):
    images, labels = labelled_png
    base = ["train", "--images", str(images), "--labels", str(labels), "--out", str(tmp_path / "p"), *TINY]
    for extra, message in [(["--extra-images", str(images)], "give both --extra-images and --extra-labels"),
                           (["--extra-fraction", "1.5"], "--extra-fraction must lie between 0 and 1"),
                           (["--scale-jitter", "0.2", "--augment", "dihedral"], "--scale-jitter needs the rotate"),
                           (["--init", str(tmp_path / "nowhere")], "neither a .safetensors file")]:
        assert main([*base, *extra]) == 2
        assert message in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "s"), "--extra-synthetic", "2", *TINY]) == 2
    assert "need --images" in capsys.readouterr().err


def test_train_with_extra_images_and_init_from_a_profile(tmp_path, write_labelled_set, capsys):
    images, labels = write_labelled_set(tmp_path / "real", 8)
    extra_images, extra_labels = write_labelled_set(tmp_path / "sim", 4, seed=5)
    first, second = tmp_path / "first", tmp_path / "second"
    base = ["train", "--images", str(images), "--labels", str(labels), "--normalisation", "zscore",
            "--pixel-size-nm", "none", "--val-fraction", "0.25", "--widths", "4", "8", *TINY]
    assert main([*base, "--out", str(first), "--name", "first"]) == 0
    argv = [*base, "--out", str(second), "--name", "second", "--init", str(first), "--intensity-augment",
            "--scale-jitter", "0.2", "--extra-images", str(extra_images), "--extra-labels", str(extra_labels)]
    assert main(argv) == 0
    manifest = read_manifest(second)
    assert manifest.segmentation.normalisation == "zscore"
    training = manifest.training["segmentation"]
    assert "train-only extra: 4 images from sim/images" in training.data
    # recorded relative to the folder holding the data set, never as absolute paths
    assert training.command == "latticewatch " + " ".join(argv).replace(f"{tmp_path}/", "")
    assert str(tmp_path) not in json.dumps(training.metrics) + training.data
    config = training.metrics["config"]
    assert config["init"] == "first" and config["intensity_augment"] and config["scale_jitter"] == 0.2
    # the extra images are never validated on
    assert set(training.metrics["validation"]["images"]) <= {p.stem for p in images.iterdir()}
    assert training.metrics["n_train_images"] + training.metrics["validation"]["n_images"] == 8
    capsys.readouterr()
    wrong = [*base, "--widths", "4", "8", "16", "--out", str(tmp_path / "bad"), "--init", str(first)]
    assert main(wrong) == 2
    assert "do not fit" in capsys.readouterr().err


def test_init_weights_come_from_a_file_a_directory_or_an_installed_profile(tmp_path, monkeypatch):
    installed = init_weights_path("nanoparticles")
    assert installed.is_file()
    net = build_net("unet", (4, 8, 16, 32))
    load_init_weights(net, "nanoparticles")
    expected = load_file(str(installed))
    assert all(np.array_equal(v.numpy(), expected[k].numpy()) for k, v in net.state_dict().items())
    assert init_weights_path(installed.parent) == installed and init_weights_path(installed) == installed
    # a folder of that name without a manifest (e.g. this run's --out) does not hide the installed profile
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nanoparticles").mkdir()
    assert init_weights_path("nanoparticles") == installed


def test_cross_validate_never_tests_on_extra_images(tmp_path, labelled_png, write_labelled_set, capsys):
    images, labels = labelled_png
    extra_images, extra_labels = write_labelled_set(tmp_path / "sim", 4, seed=5)
    out = tmp_path / "cv.json"
    base = ["cross-validate", "--images", str(images), "--labels", str(labels), "--folds", "2", "--json", str(out),
            "--widths", "4", "8", "--normalisation", "zscore", "--pixel-size-nm", "none", "--intensity-augment", *TINY]
    extra = ["--extra-images", str(extra_images), "--extra-labels", str(extra_labels), "--extra-fraction", "0.3"]
    assert main([*base, *extra]) == 0
    capsys.readouterr()
    result = json.loads(out.read_text())
    real = {p.stem for p in images.iterdir()}
    assert sorted(sum(result["fold_names"], [])) == sorted(real)
    assert all(set(f["per_image"]) <= real for f in result["model"]["per_fold"])
    assert result["extra_train"] == "4 images from sim/images" and "train-only extra" in result["data"]
    assert result["config"]["extra_fraction"] == 0.3 and result["config"]["intensity_augment"]
    assert main([*base, *extra, "--resume"]) == 0
    assert "resuming: folds [1, 2]" in capsys.readouterr().err
    # folds trained with the extra images are not reused for a run without them
    assert main([*base, "--extra-fraction", "0.3", "--resume"]) == 0
    assert "other settings" in capsys.readouterr().err
