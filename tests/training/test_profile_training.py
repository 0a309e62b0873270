"""`latticewatch train` builds a complete, loadable profile (tiny settings so it runs in seconds)."""

import json

import numpy as np
import pytest

pytest.importorskip("torch")

from latticewatch.cli import main  # noqa: E402
from latticewatch.frame import Frame  # noqa: E402
from latticewatch.models.manifest import read_manifest  # noqa: E402
from latticewatch.runtime.analyser import Analyser  # noqa: E402
from latticewatch.testing.synthetic.frames import generate_frame  # noqa: E402
from latticewatch.training.fit.unet import UNetTrainingConfig, train_unet  # noqa: E402


def test_training_improves_validation_dice():
    rng = np.random.default_rng(0)
    frames = [generate_frame(rng, shape=(128, 128), pixel_size_nm=0.05, n_particles=2, dose_range=(150.0, 200.0))
              for _ in range(6)]
    images = np.stack([f.image / f.image.max() for f in frames]).astype(np.float32)
    masks = np.stack([f.mask for f in frames])
    config = UNetTrainingConfig(crop=128, batch_size=4, learning_rate=3e-3, max_steps=40, eval_every=10, patience=10)
    result = train_unet((images[:4], masks[:4]), (images[4:], masks[4:]), config, progress=False)
    dices = [h["val_dice"] for h in result.history]
    assert len(dices) == 4 and result.best_dice == max(dices)
    assert result.history[-1]["loss"] < 1.5  # cross-entropy (≈0.69 at chance) + Dice loss: it learned something


def test_train_command_writes_a_profile_the_analyser_loads(tmp_path, capsys):
    out = tmp_path / "profile"
    code = main(["train", "--out", str(out), "--synthetic", "4", "--regions-per-class", "6", "--steps", "2",
                 "--batch-size", "2", "--lr", "1e-3", "--name", "tiny"])
    assert code == 0
    manifest = read_manifest(out)  # verifies every sha256
    assert manifest.name == "tiny" and manifest.segmentation.pixel_size_nm == 0.05
    assert set(manifest.files) == {"unet.onnx", "unet.safetensors", "forest.skops", "forest.safetensors"}
    assert manifest.classifier.arrays == "forest.safetensors"  # what the analyser loads, without scikit-learn
    seg = manifest.training["segmentation"]
    assert "train --out" in seg.command and seg.metrics["onnx_parity"]["max_abs_diff"] <= 1e-4
    assert 0 <= manifest.training["classifier"].metrics["balanced_accuracy"] <= 1
    assert "Dice" in capsys.readouterr().out
    analyser = Analyser(out)
    frame = generate_frame(np.random.default_rng(1), shape=(256, 256), pixel_size_nm=0.05)
    analysis = analyser.analyse(Frame("f", frame.image, 0.05))
    assert analysis.model_ids["profile"] == f"tiny@{manifest.version}"


def test_tampered_model_file_is_refused(tmp_path):
    from latticewatch.models.manifest import ManifestError
    from latticewatch_nanoparticles import profile_dir

    copy = tmp_path / "copy"
    copy.mkdir()
    manifest = json.loads((profile_dir / "manifest.json").read_text())
    for name in manifest["files"]:
        (copy / name).write_bytes((profile_dir / name).read_bytes())
    (copy / "manifest.json").write_text(json.dumps(manifest))
    read_manifest(copy)
    with open(copy / "unet.onnx", "ab") as fh:
        fh.write(b"\0")
    refused = r"unet.onnx: sha256 [0-9a-f]{64} does not match the manifest.s [0-9a-f]{64}"
    with pytest.raises(ManifestError, match=refused):
        read_manifest(copy)
