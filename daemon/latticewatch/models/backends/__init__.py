"""Inference backends: one network of a profile run on one kind of device.

A segmentation backend maps an (N, 1, H, W) float32 batch to an (N, 1, H, W) float32 probability
batch; the same protocol runs the CNN classifier ((N, C, S, S) crops → (N, n_classes)). Each kind
lives in its own module (``tensorrt``, ``torch_cuda`` for kind ``cuda``, ``openvino``,
``onnxruntime``) exposing ``unavailable() -> str | None`` and ``open(model, *, threads, plan_cache,
fp16)``; this registry imports them only when asked, so torch, TensorRT or OpenVINO are loaded only
by the process that uses them.
"""

from __future__ import annotations

import glob
import importlib
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Protocol

import numpy as np

from latticewatch.errors import ConfigError, ModelError
from latticewatch.models.architectures import CLASSIFIER_DEFAULT_WIDTHS

if TYPE_CHECKING:
    from latticewatch.models.manifest import Manifest

log = logging.getLogger(__name__)

#: What ``--backend`` and ``[runtime] backend`` accept.
BACKEND_CHOICES = ("auto", "tensorrt", "cuda", "openvino", "onnxruntime")

#: The CPU kind ``auto`` settles on without a GPU; the other one is used when this cannot run here.
#: ``scripts/cpu-runtimes`` (2 threads, AMD EPYC, a shared machine): OpenVINO took 0.7–0.85× ONNX
#: Runtime's median on the U-Net at 512²–2048² in each of three runs, within ±15 % on the FPN and
#: the CNN (which one is faster changed between runs), with the same masks (``test_openvino.py``).
#: torch.compile had the lowest median on the FPN but a long tail (p99 up to 18× its median), the
#: slowest 2048² U-Net and seconds of compilation for each new frame shape, and torch is not a
#: runtime dependency.
CPU_DEFAULT = "openvino"

_MODULES = {"tensorrt": "tensorrt", "cuda": "torch_cuda", "openvino": "openvino", "onnxruntime": "onnxruntime"}
#: The kinds that run on a GPU (and may raise `DeviceMemoryError`).
ACCELERATORS = ("tensorrt", "cuda")
# what auto has already said it skips and why: said once per process, not for every network loaded
_SAID: set[tuple[str, str]] = set()
_CPUS = (CPU_DEFAULT, *(k for k in ("openvino", "onnxruntime") if k != CPU_DEFAULT))


@dataclass(frozen=True)
class ModelFiles:
    """What a backend needs to load one network of a profile.

    Parameters
    ----------
    onnx
        The float32 ONNX file.
    weights
        The safetensors torch weights (for the torch/CUDA backend); may be ``None``.
    architecture
        ``unet``, ``resnet18-unet``, ``fpn`` or ``crop-cnn``.
    widths
        The architecture's widths (``models.architectures``).
    role
        ``segmentation`` (input ``image`` (N, 1, H, W)) or ``classifier`` (input ``crops`` (N, C, S, S)).

    Examples
    --------
    >>> ModelFiles(Path("unet.onnx"), None, "unet", (4, 8, 16, 32), "segmentation").role
    'segmentation'
    """

    onnx: Path
    weights: Path | None
    architecture: str
    widths: tuple[int, ...]
    role: str = "segmentation"


def model_files(directory: Path, manifest: Manifest, role: str = "segmentation") -> ModelFiles:
    """The `ModelFiles` of a profile's segmentation net or (``role="classifier"``) its CNN classifier.

    Examples
    --------
    >>> from latticewatch.runtime.plugins import resolve_profile
    >>> model_files(*resolve_profile("nanoparticles"), "classifier").architecture
    'crop-cnn'
    """
    if role == "segmentation":
        seg = manifest.segmentation
        return ModelFiles(directory / seg.onnx, directory / seg.weights if seg.weights else None, seg.architecture,
                          tuple(seg.widths), role)
    cnn = manifest.classifier
    if cnn is None or cnn.kind != "cnn":
        raise ModelError(f"{directory}: the profile's classifier is not a network (kind 'cnn')")
    # the CNN is trained with its architecture's default widths; the training record names the architecture
    record = manifest.training.get("classifier")
    arch = record.metrics.get("architecture", "crop-cnn") if record else "crop-cnn"
    return ModelFiles(directory / cnn.onnx, directory / cnn.weights if cnn.weights else None, arch,
                      CLASSIFIER_DEFAULT_WIDTHS[arch], role)


class SegmentationBackend(Protocol):
    """A loaded network: ``name`` (e.g. ``onnxruntime-cpu``), ``device`` (e.g. ``CPU (2 threads)``)
    and ``predict`` (float32 batch in, float32 batch out, same N)."""

    name: str
    device: str

    def predict(self, batch: np.ndarray) -> np.ndarray: ...


class DeviceMemoryError(ModelError):
    """An accelerator backend ran out of device memory for this input (a smaller one may fit)."""


def cpu_threads(threads: int | None) -> int:
    """The CPU threads a backend uses: ``threads``, or every core this process may run on.

    >>> cpu_threads(3)
    3
    """
    if threads:
        return threads
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_device(threads: int) -> str:
    """The ``device`` text of a CPU backend: the processor's model name (when Linux says) and threads.

    >>> cpu_device(2)  # doctest: +SKIP
    'CPU AMD EPYC (2 threads)'
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "")
    except OSError:
        model = ""
    return f"CPU {model} ({threads} threads)" if model else f"CPU ({threads} threads)"


def _module(kind: str) -> ModuleType | str:
    """The backend module of ``kind``, or why it cannot be imported."""
    if kind not in _MODULES:
        raise ConfigError(f"unknown backend {kind!r}; choose one of {', '.join(BACKEND_CHOICES)}")
    name = f"{__name__}.{_MODULES[kind]}"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name == name:
            return f"this latticewatch has no {kind} backend ({name} is missing)"
        return f"{err.name} is not installed"
    except ImportError as err:
        return f"importing {name} failed: {err}"


def unavailable(kind: str) -> str | None:
    """Why ``kind`` cannot run here, or ``None`` when it can (``auto``: when nothing can).

    Examples
    --------
    >>> unavailable("onnxruntime") is None
    True
    >>> unavailable("cuda")  # doctest: +SKIP
    'torch 2.13.0+cpu is built without CUDA'
    """
    if kind == "auto":
        reasons = {}
        for k in (*_CPUS, *ACCELERATORS):  # any one will do: the cheap checks (no torch import) first
            reasons[k] = unavailable(k)
            if reasons[k] is None:
                return None
        return "; ".join(f"{k}: {r}" for k, r in reasons.items())
    module = _module(kind)
    if isinstance(module, str):
        return module
    return module.unavailable()


def _no_gpu() -> str | None:
    """Why no NVIDIA GPU can be here, found without importing torch or TensorRT (seconds each, which a
    cold ``process`` on a CPU machine should not pay); ``None``: there may be one, ask the backend."""
    if not sys.platform.startswith("linux") or glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/dxg"):
        return None  # /dev/dxg: the GPU of WSL 2
    return "no NVIDIA GPU device here (no /dev/nvidia0)"


def _candidates(kind: str) -> list[str]:
    """The concrete kinds to try for ``kind``, best first; raises naming the kind when none can run."""
    if kind != "auto":
        reason = unavailable(kind)
        if reason:
            raise ModelError(f"backend {kind} cannot run here: {reason}")
        return [kind]
    usable = []
    for candidate in (*ACCELERATORS, *_CPUS):
        reason = (_no_gpu() if candidate in ACCELERATORS else None) or unavailable(candidate)
        if reason and (candidate, reason) not in _SAID:
            _SAID.add((candidate, reason))
            log.info("backend auto: not %s (%s)", candidate, reason)
        elif not reason:
            usable.append(candidate)
    if not usable:
        raise ModelError(f"backend auto: no backend can run here ({unavailable('auto')})")
    return usable


def cpu_default() -> str:
    """The CPU backend used here when no accelerator is (and when one runs out of memory): `CPU_DEFAULT`,
    or the other CPU kind when that cannot run.

    >>> cpu_default() in ("onnxruntime", "openvino")
    True
    """
    return next((kind for kind in _CPUS if unavailable(kind) is None), "onnxruntime")


def resolve(kind: str) -> str:
    """The concrete backend that ``kind`` means here: ``auto`` becomes TensorRT when TensorRT and a CUDA
    GPU are there, else torch on CUDA, else the CPU default; an explicit kind that cannot run raises
    `ModelError` saying why.

    Examples
    --------
    >>> resolve("onnxruntime")
    'onnxruntime'
    >>> resolve("auto")  # doctest: +SKIP
    'tensorrt'
    """
    return _candidates(kind)[0]


def open_backend(kind: str, model: ModelFiles, *, threads: int | None = None, plan_cache: Path | None = None,
                 fp16: bool | None = None) -> SegmentationBackend:
    """Load ``model`` on the backend ``kind`` (one of `BACKEND_CHOICES`).

    With ``auto``, a kind that is present but fails to load the model is logged and the next kind
    is tried, so a broken GPU setup still analyses frames; an explicit kind raises.

    Parameters
    ----------
    kind
        One of `BACKEND_CHOICES`.
    model
        The network's files and description.
    threads
        CPU threads (CPU backends); default: the usable cores.
    plan_cache
        Directory for compiled engines (TensorRT).
    fp16
        Half precision on accelerators; ``None``: the backend's default.

    Examples
    --------
    >>> files = ModelFiles(Path("unet.onnx"), None, "unet", (4, 8, 16, 32), "segmentation")  # doctest: +SKIP
    >>> open_backend("auto", files, threads=2).name  # doctest: +SKIP
    'onnxruntime-cpu'
    """
    candidates = _candidates(kind)
    for candidate, fallback in zip(candidates, candidates[1:]):  # only ``auto`` has more than one
        try:
            return _open(candidate, model, threads=threads, plan_cache=plan_cache, fp16=fp16)
        except ModelError as err:
            log.warning("backend auto: %s cannot load %s (%s); using %s", candidate, model.onnx, err, fallback)
    return _open(candidates[-1], model, threads=threads, plan_cache=plan_cache, fp16=fp16)


def _open(kind: str, model: ModelFiles, **options) -> SegmentationBackend:
    module = _module(kind)
    if isinstance(module, str):
        raise ModelError(f"backend {kind}: {module}")
    return module.open(model, **options)
