"""CPU inference through ONNX Runtime."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from latticewatch.errors import ModelError
from latticewatch.models.backends import ModelFiles, cpu_device, cpu_threads

log = logging.getLogger(__name__)


def unavailable() -> str | None:
    """Why ONNX Runtime cannot run here (``None``: it can; it is a dependency, so normally it can)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError as err:
        return f"onnxruntime cannot be imported ({err})"
    return None


def open(model: ModelFiles, *, threads: int | None = None, plan_cache: Path | None = None,
         fp16: bool | None = None) -> OnnxRuntimeBackend:
    """The registry's entry point (`latticewatch.models.backends.open_backend`): ``model.onnx`` on the CPU
    in float32; ``plan_cache`` and ``fp16`` concern accelerators and are ignored.

    >>> open(ModelFiles(Path("unet.onnx"), None, "unet", (4, 8, 16, 32)), threads=2).device  # doctest: +SKIP
    'CPU AMD EPYC (2 threads)'
    """
    return OnnxRuntimeBackend(model.onnx, threads=threads)


class OnnxRuntimeBackend:
    """Runs an exported latticewatch ONNX file (segmentation net or crop classifier) on the CPU.

    Parameters
    ----------
    path
        ONNX file with a single input (``image`` (N, 1, H, W) or ``crops`` (N, C, S, S)).
    threads
        Intra-op threads; defaults to the number of usable cores.

    Examples
    --------
    >>> backend = OnnxRuntimeBackend("unet.onnx")  # doctest: +SKIP
    >>> backend.predict(np.zeros((1, 1, 64, 64), np.float32)).shape  # doctest: +SKIP
    (1, 1, 64, 64)
    """

    name = "onnxruntime-cpu"

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        import onnxruntime as ort

        threads = cpu_threads(threads)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        # ORT's workers otherwise spin after every run; with another busy process (or the pipelined
        # runner's own CPU stages) on a 2-core host they steal the core the next stage needs:
        # measured 125 → 75 ms per 1024² frame end to end with one core taken by another job
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = Path(path)
        self.device = cpu_device(threads)
        try:
            self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # ORT raises its own Fail/InvalidGraph/NoSuchFile types, no common base
            raise ModelError(f"{path}: ONNX Runtime cannot load it: {err}") from err
        self._input = self._session.get_inputs()[0].name

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self._session.run(None, {self._input: np.ascontiguousarray(batch, dtype=np.float32)})[0]
