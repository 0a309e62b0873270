"""``latticewatch compile``: the fp16 ONNX files are written and checked everywhere; plans only where the
TensorRT builder and a GPU are (exit code 3 and a message otherwise)."""

import importlib.util

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from latticewatch.cli import main
from latticewatch.models.backends.tensorrt import EXIT_NO_BUILDER, builder_unavailable
from latticewatch.models.manifest import sha256_of
from latticewatch_nanoparticles import profile_dir

BUILDER = builder_unavailable()


def _profile_state():
    return {p.name: sha256_of(p) for p in sorted(profile_dir.iterdir()) if p.is_file()}


@pytest.mark.skipif(BUILDER is None, reason="the TensorRT builder is here: compile builds plans")
def test_without_the_builder_the_fp16_onnx_is_written_checked_and_exit_is_3(tmp_path, capsys):
    before = _profile_state()
    assert main(["compile", "--profile", "nanoparticles", "--cache", str(tmp_path)]) == EXIT_NO_BUILDER == 3
    out, err = capsys.readouterr()
    written = sorted((tmp_path / "onnx").glob("*.fp16.onnx"))
    assert [p.name.split("-")[0] for p in written] == ["cnn", "unet"]
    for path in written:
        half = onnx.load(str(path))
        onnx.checker.check_model(half, full_check=True)
        assert any(t.data_type == TensorProto.FLOAT16 for t in half.graph.initializer)
        assert str(path) in out
    assert "fp16 ONNX of unet.onnx" in out and "Dice 0.99" in out and "on a simulated 512² frame" in out
    assert "labels equal on the" in out
    assert "TensorRT builder not available here" in err and str(tmp_path / "onnx") in err
    assert "latticewatch compile --profile nanoparticles --cache DIR" in err
    assert not list(tmp_path.glob("*.plan"))
    assert _profile_state() == before  # the installed profile is never written


def test_bad_options_are_usage_errors(tmp_path, capsys):
    assert main(["compile", "--int8", "--cache", str(tmp_path)]) == 2
    assert "--int8 needs --calibration FILE.npz" in capsys.readouterr().err
    assert main(["compile", "--exclude-lean-runtime", "--cache", str(tmp_path)]) == 2
    assert "only applies with --version-compatible" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        main(["compile", "--shapes", "4096:512"])
    assert stop.value.code == 2
    assert "expected MIN:MAX or MIN:OPT:MAX" in capsys.readouterr().err
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


@pytest.mark.skipif(importlib.util.find_spec("modelopt") is not None, reason="NVIDIA Model Optimizer is installed")
def test_int8_without_model_optimizer_says_what_to_install(tmp_path, capsys):
    calibration = tmp_path / "set.npz"
    np.savez(calibration, images=np.zeros((1, 1, 64, 64), np.float32), onnx_sha256=np.array("0" * 64))
    code = main(["compile", "--int8", "--calibration", str(calibration), "--cache", str(tmp_path / "cache")])
    assert code == 2
    assert "--int8 needs NVIDIA Model Optimizer, which is optional: pip install 'nvidia-modelopt[onnx]'" in \
        capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(BUILDER is not None, reason=f"TensorRT plans cannot be built here: {BUILDER}")
def test_with_the_builder_plans_are_built_and_cached(tmp_path, capsys):
    args = ["compile", "--profile", "nanoparticles", "--cache", str(tmp_path), "--shapes", "256:512:1024",
            "--max-batch", "2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    plans = sorted(tmp_path.glob("fp16-*.plan"))
    assert len(plans) == 2 and all(str(p) in out for p in plans)  # the U-Net and the CNN
    assert "256-512-1024xb1-2" in out
    assert sorted((tmp_path / "timing").glob("*.cache"))  # the timing cache is kept for the next build
