"""CPU inference through ONNX Runtime (the default backend)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


class OnnxRuntimeBackend:
    """Runs an exported latticewatch segmentation ONNX file on the CPU.

    Parameters
    ----------
    path
        ONNX file whose single input is ``image`` (N, 1, H, W) and output the particle probability.
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

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        # ORT's workers otherwise spin after every run; with another busy process (or the pipelined
        # runner's own CPU stages) on a 2-core host they steal the core the next stage needs:
        # measured 125 → 75 ms per 1024² frame end to end with one core taken by another job
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = Path(path)
        self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self._session.run(None, {self._input: np.ascontiguousarray(batch, dtype=np.float32)})[0]
