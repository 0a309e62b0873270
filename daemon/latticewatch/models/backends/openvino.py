"""CPU inference through OpenVINO, from the same ONNX file as ONNX Runtime."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np

from latticewatch.errors import ModelError
from latticewatch.models.backends import ModelFiles, cpu_device, cpu_threads

log = logging.getLogger(__name__)


def unavailable() -> str | None:
    """Why OpenVINO cannot run here (``None``: it can)."""
    try:
        import openvino
    except ImportError as err:
        return f"openvino is not installed ({err}); pip install openvino"
    if "CPU" not in openvino.Core().available_devices:
        return "OpenVINO has no CPU device here"
    return None


def open(model: ModelFiles, *, threads: int | None = None, plan_cache: Path | None = None,
         fp16: bool | None = None) -> OpenVinoBackend:
    """The registry's entry point (`latticewatch.models.backends.open_backend`): ``model.onnx`` on the CPU
    in float32; ``plan_cache`` and ``fp16`` concern accelerators and are ignored.

    >>> open(ModelFiles(Path("unet.onnx"), None, "unet", (4, 8, 16, 32)), threads=2).name  # doctest: +SKIP
    'openvino-cpu'
    """
    return OpenVinoBackend(model.onnx, threads=threads)


class OpenVinoBackend:
    """Runs an exported latticewatch ONNX file (segmentation net or crop classifier) with OpenVINO on the CPU.

    The model is compiled once with its dynamic dimensions (batch, and height and width for the
    segmentation net): compiling one static model per frame shape measured no faster on the shipped
    networks (1024², 2 threads, within the noise), and each new shape would cost a compile.

    Parameters
    ----------
    path
        ONNX file with a single input (``image`` (N, 1, H, W) or ``crops`` (N, C, S, S)).
    threads
        Inference threads; defaults to the number of usable cores.

    Examples
    --------
    >>> backend = OpenVinoBackend("unet.onnx", threads=2)  # doctest: +SKIP
    >>> backend.predict(np.zeros((1, 1, 64, 64), np.float32)).shape  # doctest: +SKIP
    (1, 1, 64, 64)
    """

    name = "openvino-cpu"

    def __init__(self, path: str | Path, threads: int | None = None):
        import openvino

        threads = cpu_threads(threads)
        self.path = Path(path)
        self.device = cpu_device(threads)
        config = {
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
            "INFERENCE_NUM_THREADS": threads,
            # on CPUs with bfloat16 the plugin otherwise computes in bf16: masks would differ from ONNX Runtime's
            "INFERENCE_PRECISION_HINT": "f32",
            # pinned workers fight any other process pinned to the same cores (two daemons, the
            # pipelined runner's CPU stages); unpinned, the scheduler moves them
            "ENABLE_CPU_PINNING": False,
        }
        try:
            core = openvino.Core()
            self._compiled = core.compile_model(core.read_model(str(self.path)), "CPU", config)
        except RuntimeError as err:
            raise ModelError(f"{self.path}: OpenVINO cannot load it: {err}") from err
        # an infer request is not thread-safe; the pipelined runner calls predict from one thread, but
        # the classifier and scripts may share a backend, so each thread gets its own request
        self._local = threading.local()

    def predict(self, batch: np.ndarray) -> np.ndarray:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self._compiled.create_infer_request()
        request.infer({0: np.ascontiguousarray(batch, dtype=np.float32)})
        # the output tensor's memory belongs to the request and is overwritten by its next call
        return request.get_output_tensor(0).data.copy()
