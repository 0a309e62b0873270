"""NVIDIA TensorRT: a profile's network compiled into a plan for this GPU, run on torch CUDA tensors.

A plan is built once (``latticewatch compile``, or here on first use when the TensorRT builder is
installed) from the profile's ONNX — its float16 copy (`latticewatch.models.precision`) for an fp16
plan, since a strongly typed network takes its precision from the ONNX — with one optimisation
profile covering the frame sides in use, and kept in a `PlanCache`. A plan is only valid for the
TensorRT version, the GPU model and the input shapes it was built for, so its cache key holds the
ONNX's sha256, the TensorRT version, the GPU name and compute capability, the shapes and the
precision (`plan_key`). A version-compatible plan (``compile --version-compatible``) also runs on
later TensorRT releases of the same major version, including the lean runtime alone
(``tensorrt-lean-cu13``, the ``tensorrt_lean`` module), which can load plans but not build them.

Plans hold executable code. A version-compatible plan embeds TensorRT's lean runtime, which the
runtime only loads with ``engine_host_code_allowed``; it is set only for a plan whose bytes match the
sha256 its sidecar recorded when this cache built or stored it, so keep the cache directory writable
by the daemon's user alone.
"""

from __future__ import annotations

import importlib
import logging
import threading
from pathlib import Path
from types import ModuleType

import numpy as np

from latticewatch.errors import ModelError
from latticewatch.io.atomic import write_atomic
from latticewatch.models.backends import DeviceMemoryError, ModelFiles
from latticewatch.models.backends.plans import (
    CachedPlan,
    CorruptPlanError,
    PlanCache,
    Shapes,
    default_plan_cache,
    default_shapes,
    find_plan,
    plan_key,
)
from latticewatch.models.manifest import sha256_of
from latticewatch.models.precision import write_fp16

log = logging.getLogger(__name__)

#: ``latticewatch compile`` exits with this code where the TensorRT builder is missing (fp16 ONNX still written).
EXIT_NO_BUILDER = 3

_COMPILE_HINT = ("run `latticewatch compile --profile PROFILE` on a machine with the TensorRT builder "
                 "(pip install tensorrt-cu13) and this GPU model, and copy its plan cache here")


# ----------------------------------------------------------------------------- what is installed


def _import(name: str) -> ModuleType | str:
    try:
        return importlib.import_module(name)
    except ImportError as err:
        return f"{name} is not installed" if getattr(err, "name", None) == name else f"{name} cannot be imported: {err}"
    except OSError as err:  # a wheel whose shared libraries are missing
        return f"{name} cannot be imported: {err}"


def runtime_module() -> ModuleType | str:
    """The TensorRT module that runs plans (``tensorrt``, else the lean ``tensorrt_lean``), or why there is none."""
    full = _import("tensorrt")
    if not isinstance(full, str):
        return full
    lean = _import("tensorrt_lean")
    if not isinstance(lean, str):
        return lean
    return (f"neither tensorrt nor tensorrt_lean can be imported ({full}; {lean}): pip install tensorrt-cu13, or "
            "tensorrt-lean-cu13 to run version-compatible plans built elsewhere")


def builder_unavailable() -> str | None:
    """Why plans cannot be built here (``None``: they can): no ``tensorrt`` module, one without a
    ``Builder`` (a runtime-only package), or no CUDA device to build for."""
    trt = _import("tensorrt")
    if isinstance(trt, str):
        return f"the TensorRT builder is not available: {trt} (the lean runtime cannot build plans)"
    if not hasattr(trt, "Builder"):
        return f"the TensorRT builder is not available: the installed tensorrt {trt.__version__} has no Builder"
    return _cuda_unavailable()


def _cuda_unavailable() -> str | None:
    torch = _import("torch")
    if isinstance(torch, str):
        return f"{torch} (the TensorRT backend runs on torch CUDA tensors)"
    if not torch.cuda.is_available():
        return "no CUDA device: torch.cuda.is_available() is False"
    return None


def unavailable() -> str | None:
    """Why TensorRT cannot run here, or ``None`` when it can.

    The CUDA check comes before any TensorRT object is made: without a driver, TensorRT 11.4's
    ``Runtime`` is created in a broken state and deserialising into it crashes the process.

    >>> unavailable()  # doctest: +SKIP
    'no CUDA device: torch.cuda.is_available() is False'
    """
    trt = runtime_module()
    if isinstance(trt, str):
        return trt
    return _cuda_unavailable()


_LOGGERS: dict[str, object] = {}


def _logger(trt: ModuleType):
    """One TensorRT logger per module for the whole process (TensorRT warns when a second one appears)."""
    if trt.__name__ not in _LOGGERS:
        _LOGGERS[trt.__name__] = trt.Logger(trt.Logger.WARNING)
    return _LOGGERS[trt.__name__]


def gpu_identity() -> tuple[str, str]:
    """Name and compute capability (``"9.0"``) of the current CUDA device (needs torch with CUDA)."""
    import torch

    major, minor = torch.cuda.get_device_capability()
    return torch.cuda.get_device_name(), f"{major}.{minor}"


# ----------------------------------------------------------------------------- building


def build_plan(onnx: Path, shapes: Shapes, *, timing_cache: Path, version_compatible: bool = False,
               exclude_lean_runtime: bool = False) -> bytes:
    """Build a serialised plan from ``onnx`` (needs the TensorRT builder and a CUDA device).

    The network is strongly typed (precision from the ONNX; in TensorRT 11 always so), with one
    optimisation profile from ``shapes``. The timing cache at ``timing_cache`` is read when present and
    written back after the build, so later builds on this GPU skip the kernel timing already done.

    Examples
    --------
    >>> plan = build_plan(Path("unet.fp16.onnx"), Shapes(), timing_cache=Path("t.cache"))  # doctest: +SKIP
    """
    reason = builder_unavailable()
    if reason:
        raise ModelError(f"{onnx}: cannot build a TensorRT plan: {reason}")
    import tensorrt as trt

    logger = _logger(trt)
    builder = trt.Builder(logger)
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if strongly_typed is None else 1 << int(strongly_typed))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ModelError(f"{onnx}: TensorRT cannot parse it: {errors}")
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        profile.set_shape(tensor.name, *shapes.profile(tuple(tensor.shape)))
    config.add_optimization_profile(profile)
    previous = timing_cache.read_bytes() if timing_cache.exists() else b""
    cache = config.create_timing_cache(previous)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("%s: timing cache made for another device or TensorRT; starting a new one", timing_cache)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    if version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        if exclude_lean_runtime:
            config.set_flag(trt.BuilderFlag.EXCLUDE_LEAN_RUNTIME)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ModelError(f"{onnx}: TensorRT could not build a plan (its log above says why)")
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(timing_cache, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def compile_plan(model: ModelFiles, cache: PlanCache, *, precision: str = "fp16", shapes: Shapes | None = None,
                 version_compatible: bool = False, exclude_lean_runtime: bool = False,
                 int8_onnx: Path | None = None, calibration_sha256: str | None = None) -> CachedPlan:
    """Build and cache the plan of ``model`` for the current GPU (the fp16 ONNX is written into ``cache``).

    ``int8_onnx`` is the Q/DQ ONNX of an ``int8`` plan (`latticewatch.models.precision.quantize_int8`).

    Examples
    --------
    >>> compile_plan(files, PlanCache(default_plan_cache())).path  # doctest: +SKIP
    PosixPath('/root/.cache/latticewatch/plans/fp16-v1-....plan')
    """
    import tensorrt as trt

    shapes = shapes or Shapes()
    source_sha = sha256_of(model.onnx)
    gpu, capability = gpu_identity()
    key = plan_key(source_sha, trt.__version__, gpu, capability, shapes, precision,
                   version_compatible=version_compatible, calibration_sha256=calibration_sha256)
    if precision == "fp16":
        onnx = write_fp16(model.onnx, cache.onnx_path(model.onnx, source_sha, key.precision))
    elif precision == "int8":
        if int8_onnx is None:
            raise ValueError("an int8 plan needs the quantised ONNX (int8_onnx)")
        onnx = int8_onnx
    else:
        onnx = model.onnx
    plan = build_plan(onnx, shapes, timing_cache=cache.timing_cache_path(trt.__version__, gpu, capability),
                      version_compatible=version_compatible, exclude_lean_runtime=exclude_lean_runtime)
    entry = cache.store(key, plan, onnx=str(model.onnx), built_from=str(onnx),
                        built_with=trt.__version__, version_compatible=version_compatible,
                        exclude_lean_runtime=exclude_lean_runtime, role=model.role,
                        calibration_sha256=calibration_sha256)
    log.info("built %s (%d bytes) for %s", entry.path, len(plan), gpu)
    return entry


# ----------------------------------------------------------------------------- running


class TensorRTBackend:
    """A cached plan loaded for the current CUDA device; ``predict`` runs it with ``execute_async_v3`` on
    torch's current stream. Batches larger than the plan's profile are run in chunks.

    Examples
    --------
    >>> backend = open(ModelFiles(Path("unet.onnx"), None, "unet", (4, 8, 16, 32)))  # doctest: +SKIP
    >>> backend.predict(np.zeros((1, 1, 1024, 1024), np.float32)).shape  # doctest: +SKIP
    (1, 1, 1024, 1024)
    """

    def __init__(self, plan: CachedPlan, trt: ModuleType):
        import torch

        self.plan = plan
        self.name = f"tensorrt-{plan.key.precision.split('-')[0]}"
        gpu, _ = gpu_identity()
        self.device = f"{gpu} (TensorRT {trt.__version__}{', lean runtime' if trt.__name__ == 'tensorrt_lean' else ''})"
        self._runtime = trt.Runtime(_logger(trt))
        # the plan's bytes matched the sha256 this cache recorded; only then may its embedded runtime load
        self._runtime.engine_host_code_allowed = plan.version_compatible
        self._engine = self._runtime.deserialize_cuda_engine(plan.path.read_bytes())
        if self._engine is None:
            raise ModelError(f"{plan.path}: TensorRT {trt.__version__} cannot load this plan (see its log); "
                             f"delete it and {_COMPILE_HINT}")
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if len(inputs) != 1 or len(outputs) != 1:
            raise ModelError(f"{plan.path}: expected one input and one output, got {inputs} and {outputs}")
        self._input, self._output = inputs[0], outputs[0]
        self._low, _, self._high = (tuple(s) for s in self._engine.get_tensor_profile_shape(self._input, 0))
        self._context = self._engine.create_execution_context()
        # one context, not thread-safe: the finish pool's threads may classify at once
        self._context_lock = threading.Lock()
        if self._context is None:
            raise DeviceMemoryError(f"{plan.path}: no device memory for an execution context of this plan "
                                    f"(profile up to {self._high})")
        self._dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16}
        self._out_dtype = self._dtypes.get(self._engine.get_tensor_dtype(self._output))
        if self._out_dtype is None or self._engine.get_tensor_dtype(self._input) != trt.DataType.FLOAT:
            raise ModelError(f"{plan.path}: the plan's input must be float32 and its output float32 or float16")

    def predict(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, np.float32)
        shape = batch.shape
        if len(shape) != len(self._low) or any(not lo <= s <= hi for lo, s, hi in
                                                zip(self._low[1:], shape[1:], self._high[1:])):
            raise ModelError(f"{self.plan.path}: input {shape} is outside the plan's profile {self._low}–{self._high}; "
                             "compile again with --shapes covering it")
        step = self._high[0]
        return np.concatenate([self._run(batch[i:i + step]) for i in range(0, shape[0], step)])

    def _run(self, batch: np.ndarray) -> np.ndarray:
        import torch

        try:
            x = torch.from_numpy(batch).to("cuda")
            with self._context_lock:
                if not self._context.set_input_shape(self._input, tuple(batch.shape)):
                    raise ModelError(f"{self.plan.path}: TensorRT refused input shape {batch.shape}")
                y = torch.empty(tuple(self._context.get_tensor_shape(self._output)), dtype=self._out_dtype,
                                device="cuda")
                self._context.set_tensor_address(self._input, x.data_ptr())
                self._context.set_tensor_address(self._output, y.data_ptr())
                if not self._context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
                    raise ModelError(f"{self.plan.path}: TensorRT failed to run on input {batch.shape} (see its log)")
                return y.float().cpu().numpy()  # .cpu() waits for the stream
        except torch.cuda.OutOfMemoryError as err:
            raise DeviceMemoryError(f"{self.plan.path}: out of GPU memory for input {batch.shape}: {err}") from err


def open(model: ModelFiles, *, threads: int | None = None, plan_cache: Path | None = None,
         fp16: bool | None = None) -> TensorRTBackend:
    """The registry's entry point: the cached plan of ``model`` for this GPU, built first when missing and
    the builder is installed; otherwise `ModelError` saying how to compile one.

    ``fp16``: ``None`` takes an int8 plan when ``latticewatch compile --int8`` made one, else fp16;
    ``True`` fp16; ``False`` fp32. ``threads`` concerns CPU backends and is ignored.

    >>> open(ModelFiles(Path("unet.onnx"), None, "unet", (4, 8, 16, 32))).name  # doctest: +SKIP
    'tensorrt-fp16'
    """
    reason = unavailable()
    if reason:
        raise ModelError(f"backend tensorrt: {reason}")
    trt = runtime_module()
    cache = PlanCache(plan_cache or default_plan_cache())
    wanted = "fp32" if fp16 is False else "fp16"
    gpu, capability = gpu_identity()
    shapes = default_shapes(model.role)
    lean = trt.__name__ == "tensorrt_lean"
    try:
        entry = find_plan(cache, sha256_of(model.onnx), trt.__version__, lean, gpu, capability,
                          ["int8", wanted] if fp16 is None else [wanted], shapes)
    except CorruptPlanError as err:
        if builder_unavailable():
            raise
        log.warning("%s; building it again", err)
        entry = None
    if entry is None:
        if builder_unavailable():
            raise ModelError(f"{model.onnx}: no TensorRT plan for {gpu} (sm {capability}, TensorRT {trt.__version__}"
                             f"{', lean runtime: version-compatible plans only' if lean else ''}, {wanted}) in "
                             f"{cache.root}, and it cannot be built here ({builder_unavailable()}): {_COMPILE_HINT}")
        log.warning("%s: no TensorRT plan for %s in %s; building one (minutes; `latticewatch compile` does it ahead)",
                    model.onnx, gpu, cache.root)
        entry = compile_plan(model, cache, precision=wanted, shapes=shapes)
    return TensorRTBackend(entry, trt)
