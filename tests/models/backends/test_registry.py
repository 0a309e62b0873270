"""The backend registry: which kinds can run here and why not, what ``auto`` picks, and how a kind reaches the
analyser from the command line and the config."""

import logging
import re
import typing

import numpy as np
import pytest

from latticewatch.cli import main
from latticewatch.config import RuntimeConfig, parse_config, validate_config
from latticewatch.errors import ConfigError, ModelError
from latticewatch.models import backends
from latticewatch.models.backends import (
    BACKEND_CHOICES,
    CPU_DEFAULT,
    model_files,
    open_backend,
    resolve,
    unavailable,
)
from latticewatch.runtime.analyser import Analyser
from latticewatch.runtime.plugins import resolve_profile

NO_CUDA = unavailable("cuda")


def test_the_config_and_the_command_line_accept_exactly_the_registry_kinds():
    assert typing.get_args(RuntimeConfig.model_fields["backend"].annotation) == BACKEND_CHOICES
    assert RuntimeConfig().backend == "auto"
    from latticewatch.cli import build_parser

    process = build_parser()._subparsers._group_actions[0].choices["process"]
    option = next(a for a in process._actions if a.dest == "backend")
    assert tuple(option.choices) == BACKEND_CHOICES and option.default == "auto"


def test_onnxruntime_always_runs_and_says_which_cpu():
    assert unavailable("onnxruntime") is None and resolve("onnxruntime") == "onnxruntime"
    backend = open_backend("onnxruntime", model_files(*resolve_profile("nanoparticles")), threads=1)
    assert backend.name == "onnxruntime-cpu" and backend.device.startswith("CPU") and "(1 threads)" in backend.device
    out = backend.predict(np.zeros((2, 1, 64, 96), np.float32))
    assert out.shape == (2, 1, 64, 96) and out.dtype == np.float32


def test_auto_is_the_first_kind_that_runs_here_accelerators_before_the_measured_cpu_default():
    cpus = (CPU_DEFAULT, *(k for k in ("openvino", "onnxruntime") if k != CPU_DEFAULT))
    expected = next(k for k in ("tensorrt", "cuda", *cpus) if unavailable(k) is None)
    assert resolve("auto") == expected and unavailable("auto") is None
    assert backends.cpu_default() in cpus and unavailable(backends.cpu_default()) is None


def test_auto_says_once_at_info_why_it_skips_a_kind(caplog, monkeypatch):
    monkeypatch.setattr(backends, "_SAID", set())  # a fresh process's memory of what it said
    with caplog.at_level(logging.INFO, logger="latticewatch.models.backends"):
        resolve("auto")
        resolve("auto")
    skipped = [k for k in ("tensorrt", "cuda") if unavailable(k)]
    for kind in skipped:
        lines = [r for r in caplog.records if r.getMessage().startswith(f"backend auto: not {kind} (")]
        assert len(lines) == 1 and lines[0].levelno == logging.INFO


def test_a_kind_whose_module_is_missing_is_unavailable_with_the_reason_not_a_crash(monkeypatch):
    monkeypatch.setitem(backends._MODULES, "tensorrt", "no_such_backend_module")
    why = unavailable("tensorrt")
    assert why == ("this latticewatch has no tensorrt backend (latticewatch.models.backends.no_such_backend_module "
                   "is missing)")
    with pytest.raises(ModelError, match=r"^backend tensorrt cannot run here: this latticewatch has no tensorrt"):
        resolve("tensorrt")
    assert resolve("auto") != "tensorrt"


def test_an_unknown_kind_lists_the_choices():
    with pytest.raises(ConfigError, match="unknown backend 'gpu'; choose one of auto, tensorrt, cuda, openvino, "):
        unavailable("gpu")


def test_model_files_of_the_shipped_profiles():
    seg = model_files(*resolve_profile("graphene"))
    assert (seg.onnx.name, seg.weights.name, seg.architecture, seg.widths, seg.role) == (
        "fpn.onnx", "fpn.safetensors", "fpn", (8, 16, 32, 64), "segmentation")
    cnn = model_files(*resolve_profile("nanoparticles"), "classifier")
    assert (cnn.onnx.name, cnn.architecture, cnn.widths, cnn.role) == ("cnn.onnx", "crop-cnn", (16, 32, 64, 128),
                                                                       "classifier")
    with pytest.raises(ModelError, match="the profile's classifier is not a network"):
        model_files(*resolve_profile("graphene"), "classifier")


@pytest.mark.parametrize("kind", ["onnxruntime", "openvino"])
def test_the_analyser_runs_both_networks_on_the_kind_asked_for(kind):
    if unavailable(kind):
        pytest.skip(f"{kind}: {unavailable(kind)}")
    analyser = Analyser("nanoparticles", backend=kind, threads=1)
    assert analyser.model_ids["backend"] == f"{kind}-cpu"
    assert analyser.classifier.backend.name == f"{kind}-cpu"


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA; the error is for machines without it")
def test_an_explicit_kind_that_cannot_run_is_an_error_naming_it_and_why(tmp_path, capsys):
    with pytest.raises(ModelError, match="^backend cuda cannot run here: " + re.escape(NO_CUDA)):
        Analyser("nanoparticles", backend="cuda", threads=1)
    frame = tmp_path / "x.mrc"
    frame.write_bytes(b"")
    code = main(["process", str(frame), "--out", str(tmp_path / "out"), "--backend", "cuda"])
    assert code == 2 and f"error: backend cuda cannot run here: {NO_CUDA}" in capsys.readouterr().err


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
def test_check_config_refuses_a_backend_that_cannot_run_here_naming_where_it_was_set(tmp_path):
    (tmp_path / "in").mkdir()
    config = parse_config({"runtime": {"backend": "cuda"}, "sources": {"a": {"kind": "folder", "path": "in"}}},
                          base=tmp_path, plugin_kinds=set())
    with pytest.raises(ConfigError, match="^cfg: runtime.backend: cuda cannot run here: " + re.escape(NO_CUDA) + "$"):
        validate_config(config, where=lambda key: f"cfg: {key}")


def test_models_list_says_which_backends_run_here_and_why_not(capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert f"backends (--backend; auto here: {resolve('auto')})" in out
    for kind in BACKEND_CHOICES[1:]:
        why = unavailable(kind)
        line = next(x for x in out.splitlines() if x.startswith(f"{kind} "))
        assert line.split()[1] == ("ok" if why is None else "no") and (why or "") in line
