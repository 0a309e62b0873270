"""The TensorRT backend: plan keys, the plan cache and the messages run everywhere; building and running
plans only where the TensorRT builder and a CUDA GPU are (``scripts/gpu-check``)."""

import dataclasses
import hashlib
import importlib.util
import json
import os
import re

import numpy as np
import pytest

from latticewatch.errors import ModelError
from latticewatch.models.backends import model_files, open_backend
from latticewatch.models.backends import tensorrt as trt_backend
from latticewatch.models.backends.onnxruntime import OnnxRuntimeBackend
from latticewatch.models.backends.plans import (
    CorruptPlanError,
    PlanCache,
    Shapes,
    default_plan_cache,
    default_shapes,
    find_plan,
    plan_key,
)
from latticewatch.models.backends.tensorrt import builder_unavailable, unavailable
from latticewatch.models.precision import FP16_FORMAT, FP16_TOLERANCE, agreement
from latticewatch.runtime.plugins import resolve_profile
from latticewatch.stages.preprocess import preprocess
from latticewatch.testing.synthetic.frames import generate_frame

SHA = "ab" * 32
BASE = {"onnx_sha256": SHA, "tensorrt_version": "11.4.0.106", "gpu": "NVIDIA H200", "compute_capability": "9.0",
        "shapes": Shapes(), "precision": "fp16"}
BUILDER = builder_unavailable()
needs_builder = pytest.mark.skipif(BUILDER is not None, reason=f"TensorRT plans cannot be built here: {BUILDER}")


def _key(**change):
    return plan_key(**{**BASE, **change})


# ----------------------------------------------------------------------------- keys


def test_the_key_changes_with_each_component_and_only_with_them():
    variants = {
        "base": _key(),
        "onnx": _key(onnx_sha256="cd" * 32),
        "tensorrt": _key(tensorrt_version="11.4.1.5"),
        "gpu": _key(gpu="NVIDIA H100 80GB HBM3"),
        "capability": _key(compute_capability="10.0"),
        "max side": _key(shapes=Shapes(max_side=2048)),
        "min side": _key(shapes=Shapes(min_side=512)),
        "opt side": _key(shapes=Shapes(opt_side=2048)),
        "batch": _key(shapes=Shapes(max_batch=8)),
        "fp32": _key(precision="fp32"),
        "int8": _key(precision="int8", calibration_sha256="01" * 32),
        "int8 other set": _key(precision="int8", calibration_sha256="02" * 32),
        "version compatible": _key(version_compatible=True),
    }
    digests = {name: key.digest for name, key in variants.items()}
    assert len(set(digests.values())) == len(digests), digests
    assert _key() == variants["base"] and _key().digest == digests["base"]  # a pure function
    assert _key().precision == f"fp16-v{FP16_FORMAT}"  # a new fp16 conversion means new plans


def test_version_compatible_plans_share_a_key_across_releases_of_one_major_version():
    assert _key(version_compatible=True) == _key(tensorrt_version="11.6.0.1", version_compatible=True)
    assert _key(version_compatible=True) != _key(tensorrt_version="12.0.0.1", version_compatible=True)
    assert _key(version_compatible=True).tensorrt == "vc11"


def test_key_arguments_are_checked():
    with pytest.raises(ValueError, match="int8 plan key needs the calibration"):
        _key(precision="int8")
    with pytest.raises(ValueError, match="precision must be"):
        _key(precision="bf16")
    with pytest.raises(ValueError, match="min <= opt <= max"):
        Shapes(min_side=4096, max_side=512)


def test_profiles_cover_dynamic_axes_and_keep_fixed_ones():
    assert Shapes().profile((-1, 1, -1, -1)) == ((1, 1, 64, 64), (1, 1, 1024, 1024), (4, 1, 4096, 4096))
    crops = default_shapes("classifier").profile((-1, 3, 96, 96))
    assert crops == ((1, 3, 96, 96), (16, 3, 96, 96), (64, 3, 96, 96))


def test_default_cache_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("LATTICEWATCH_PLAN_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_plan_cache() == tmp_path / "latticewatch" / "plans"
    monkeypatch.setenv("LATTICEWATCH_PLAN_CACHE", str(tmp_path / "elsewhere"))
    assert default_plan_cache() == tmp_path / "elsewhere"


# ----------------------------------------------------------------------------- the cache


def test_a_stored_plan_is_found_by_its_key_only(tmp_path):
    cache = PlanCache(tmp_path)
    entry = cache.store(_key(), b"plan bytes", built_with="11.4.0.106", version_compatible=False)
    assert entry.path.read_bytes() == b"plan bytes"
    sidecar = json.loads(entry.path.with_suffix(".json").read_text())
    assert sidecar["key"] == dataclasses.asdict(_key())
    assert sidecar["plan_sha256"] == hashlib.sha256(b"plan bytes").hexdigest() and sidecar["plan_bytes"] == 10
    assert cache.load(_key()).path == entry.path  # hit
    assert cache.load(_key(gpu="NVIDIA A100")) is None  # miss: another GPU
    assert cache.load(_key(precision="fp32")) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([entry.path.name, entry.path.with_suffix(".json").name])


def test_a_failed_write_leaves_the_previous_plan_whole(tmp_path, monkeypatch):
    cache = PlanCache(tmp_path)
    cache.store(_key(), b"old plan")

    def no_rename(src, dst):
        raise OSError(28, "No space left on device", str(dst))

    monkeypatch.setattr(os, "replace", no_rename)  # the disk fills up while the new plan is written
    with pytest.raises(OSError, match="No space left"):
        cache.store(_key(), b"new plan, longer")
    monkeypatch.undo()
    assert cache.load(_key()).path.read_bytes() == b"old plan"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_a_plan_without_its_sidecar_is_no_entry(tmp_path):
    cache = PlanCache(tmp_path)
    entry = cache.store(_key(), b"plan")
    entry.path.with_suffix(".json").unlink()  # as if killed between the two atomic writes
    assert cache.load(_key()) is None


@pytest.mark.parametrize("damage", ["truncated plan", "garbled sidecar", "sidecar of another key"])
def test_corrupt_entries_are_reported_with_their_file(tmp_path, damage):
    cache = PlanCache(tmp_path)
    entry = cache.store(_key(), b"0123456789")
    sidecar = entry.path.with_suffix(".json")
    if damage == "truncated plan":
        entry.path.write_bytes(b"01234")
        match = f"{entry.path}: the plan's sha256 does not match"
    elif damage == "garbled sidecar":
        sidecar.write_text("{not json")
        match = f"{sidecar}: unreadable plan sidecar"
    else:
        other = cache.store(_key(gpu="NVIDIA A100"), b"0123456789")
        sidecar.write_bytes(other.path.with_suffix(".json").read_bytes())
        match = f"{sidecar}: records key"
    with pytest.raises(CorruptPlanError, match=match):
        cache.load(_key())


def _store(cache, built_with, **change):
    key = _key(**change)
    compatible = key.tensorrt.startswith("vc")
    return cache.store(key, f"plan {key.digest}".encode(), built_with=built_with, version_compatible=compatible)


def _find(cache, version="11.4.0.106", lean=False, precisions=("fp16",), preferred=None):
    return find_plan(cache, SHA, version, lean, "NVIDIA H200", "9.0", list(precisions), preferred or Shapes())


def test_the_runtime_takes_its_own_version_then_a_compatible_plan(tmp_path):
    cache = PlanCache(tmp_path)
    assert _find(cache) is None
    compatible = _store(cache, "11.2.0.1", version_compatible=True, tensorrt_version="11.2.0.1")
    assert _find(cache) == compatible  # built by an older 11.x: runs here
    assert _find(cache, version="11.1.0.1") is None  # built by a newer release than the runtime: does not
    assert _find(cache, version="12.0.0.1") is None  # another major version
    exact = _store(cache, "11.4.0.106")
    assert _find(cache) == exact  # the plan made for this very version wins
    assert _find(cache, lean=True) == compatible  # the lean runtime runs version-compatible plans only
    assert _find(cache, precisions=("fp32",)) is None


def test_a_plan_without_its_lean_runtime_runs_only_on_the_release_that_built_it(tmp_path):
    cache = PlanCache(tmp_path)
    key = _key(version_compatible=True, tensorrt_version="11.2.0.1")
    entry = cache.store(key, b"plan", built_with="11.2.0.1", version_compatible=True, exclude_lean_runtime=True)
    assert _find(cache, version="11.2.0.1", lean=True) == entry
    assert _find(cache, version="11.4.0.106", lean=True) is None


def test_int8_is_preferred_when_asked_and_the_profile_shapes_first(tmp_path):
    cache = PlanCache(tmp_path)
    fp16 = _store(cache, "11.4.0.106")
    other_shapes = _store(cache, "11.4.0.106", shapes=Shapes(max_side=2048))
    assert _find(cache) == fp16
    assert _find(cache, preferred=Shapes(max_side=2048)) == other_shapes
    int8 = _store(cache, "11.4.0.106", precision="int8", calibration_sha256="01" * 32)
    assert _find(cache, precisions=("int8", "fp16")) == int8
    assert _find(cache, precisions=("fp16",)) == fp16
    # a plan from an fp16 conversion of another format is never taken
    old = dataclasses.replace(_key(), precision="fp16-v0")
    cache.store(old, b"old")
    fp16.path.unlink()
    other_shapes.path.unlink()
    assert _find(cache) is None


# ----------------------------------------------------------------------------- without TensorRT or a GPU


def test_unavailable_names_what_is_missing():
    reason = unavailable()
    if importlib.util.find_spec("tensorrt") is None and importlib.util.find_spec("tensorrt_lean") is None:
        assert reason.startswith("neither tensorrt nor tensorrt_lean can be imported")
        assert "pip install tensorrt-cu13" in reason
    elif not _cuda():
        assert reason == "no CUDA device: torch.cuda.is_available() is False"
    else:
        assert reason is None
    if importlib.util.find_spec("tensorrt") is None:
        assert BUILDER == "the TensorRT builder is not available: tensorrt is not installed (the lean runtime " \
                          "cannot build plans)"


@pytest.mark.skipif(unavailable() is None, reason="TensorRT and a CUDA device are here")
def test_open_without_tensorrt_says_why():
    files = model_files(*resolve_profile("nanoparticles"))
    with pytest.raises(ModelError, match=re.escape(f"backend tensorrt: {unavailable()}")):
        trt_backend.open(files)
    with pytest.raises(ModelError, match=re.escape(unavailable())):  # the registry says it in its own words
        open_backend("tensorrt", files)


# ----------------------------------------------------------------------------- on a GPU with TensorRT


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _frame(rng, side=512):
    seg = resolve_profile("nanoparticles")[1].segmentation
    frame = generate_frame(rng, shape=(side, side), pixel_size_nm=seg.pixel_size_nm)
    return preprocess(frame.image, seg.pixel_size_nm, normalisation=seg.normalisation,
                      model_pixel_size_nm=seg.pixel_size_nm).image


@pytest.mark.gpu
@needs_builder
@pytest.mark.parametrize("fp16", [True, False], ids=["fp16", "fp32"])
def test_a_plan_of_the_shipped_unet_gives_the_float32_mask(tmp_path, fp16):
    directory, manifest = resolve_profile("nanoparticles")
    files = model_files(directory, manifest)
    cache = PlanCache(tmp_path)
    entry = trt_backend.compile_plan(files, cache, precision="fp16" if fp16 else "fp32",
                                     shapes=Shapes(min_side=256, opt_side=512, max_side=1024, max_batch=2))
    backend = trt_backend.TensorRTBackend(entry, trt_backend.runtime_module())
    assert backend.name == ("tensorrt-fp16" if fp16 else "tensorrt-fp32")
    rng = np.random.default_rng(3)
    batch = np.stack([_frame(rng), _frame(rng)])[:, None]
    reference = OnnxRuntimeBackend(files.onnx).predict(batch)
    result = agreement(reference, backend.predict(batch), manifest.segmentation.threshold)
    print(f"TensorRT {'fp16' if fp16 else 'fp32'} vs ONNX Runtime fp32 at 512²: {result}")
    assert result.within(FP16_TOLERANCE), result
    with pytest.raises(ModelError, match="outside the plan's profile"):
        backend.predict(np.zeros((1, 1, 2048, 2048), np.float32))


@pytest.mark.gpu
@needs_builder
def test_open_builds_once_then_loads_from_the_cache_and_chunks_large_batches(tmp_path):
    directory, manifest = resolve_profile("nanoparticles")
    crops = model_files(directory, manifest, "classifier")
    first = open_backend("tensorrt", crops, plan_cache=tmp_path, fp16=True)
    plans = sorted(tmp_path.glob("*.plan"))
    assert len(plans) == 1 and first.name == "tensorrt-fp16"
    stamp = plans[0].stat().st_mtime_ns
    again = open_backend("tensorrt", crops, plan_cache=tmp_path, fp16=True)
    assert plans[0].stat().st_mtime_ns == stamp and again.plan.path == plans[0]  # no second build
    batch = np.random.default_rng(0).standard_normal((70, 3, 96, 96)).astype(np.float32)  # > the profile's 64
    ours, reference = again.predict(batch), OnnxRuntimeBackend(crops.onnx).predict(batch)
    assert ours.shape == (70, 5) and np.abs(ours - reference).max() <= FP16_TOLERANCE.max_abs_diff


@pytest.mark.gpu
@needs_builder
@pytest.mark.skipif(importlib.util.find_spec("tensorrt_lean") is None, reason="tensorrt-lean-cu13 is not installed")
def test_the_lean_runtime_runs_a_version_compatible_plan(tmp_path):
    import tensorrt_lean

    directory, manifest = resolve_profile("nanoparticles")
    files = model_files(directory, manifest)
    entry = trt_backend.compile_plan(files, PlanCache(tmp_path), precision="fp16", version_compatible=True,
                                     shapes=Shapes(min_side=256, opt_side=512, max_side=512, max_batch=1))
    backend = trt_backend.TensorRTBackend(entry, tensorrt_lean)
    image = _frame(np.random.default_rng(5))[None, None]
    result = agreement(OnnxRuntimeBackend(files.onnx).predict(image), backend.predict(image))
    assert "lean runtime" in backend.device and result.within(FP16_TOLERANCE), result

