"""CPU inference through OpenVINO, from the same ONNX file as ONNX Runtime."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from latticewatch.errors import ModelError
from latticewatch.models.backends import ModelFiles, cpu_device, cpu_threads

log = logging.getLogger(__name__)

#: Input shapes kept compiled statically at once (a daemon sees one or two frame shapes).
STATIC_SHAPES_KEPT = 4


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
    return OpenVinoBackend(model.onnx, threads=threads, static_shapes=model.role == "segmentation")


class OpenVinoBackend:
    """Runs an exported latticewatch ONNX file (segmentation net or crop classifier) with OpenVINO on the CPU.

    The model is compiled with its dynamic dimensions (batch, and height and width for the
    segmentation net) for any shape. With ``static_shapes`` (the segmentation net: a daemon's frames,
    and the tiles of large ones, come in a few shapes) it is compiled again with static dimensions for
    each input shape that comes a second time (at most `STATIC_SHAPES_KEPT`, the least recently used
    dropped): a static model ran the shipped U-Net 10 % faster at 1 × 2048² and 4 × 512² (2 threads;
    the same output bit for bit) and compiles in ~60 ms. The classifier's batch is the number of
    regions, different from frame to frame, so it keeps the dynamic model only.

    Parameters
    ----------
    path
        ONNX file with a single input (``image`` (N, 1, H, W) or ``crops`` (N, C, S, S)).
    threads
        Inference threads; defaults to the number of usable cores.
    static_shapes
        Compile a static model for each input shape that comes again (see above).

    Examples
    --------
    >>> backend = OpenVinoBackend("unet.onnx", threads=2)  # doctest: +SKIP
    >>> backend.predict(np.zeros((1, 1, 64, 64), np.float32)).shape  # doctest: +SKIP
    (1, 1, 64, 64)
    """

    name = "openvino-cpu"

    def __init__(self, path: str | Path, threads: int | None = None, *, static_shapes: bool = False):
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
        self._core, self._config = openvino.Core(), config
        try:
            self._model = self._core.read_model(str(self.path))
            self._dynamic = self._core.compile_model(self._model, "CPU", config)
        except RuntimeError as err:
            raise ModelError(f"{self.path}: OpenVINO cannot load it: {err}") from err
        self._static_shapes = static_shapes
        self._seen: set[tuple[int, ...]] = set()
        self._static: OrderedDict[tuple[int, ...], object] = OrderedDict()
        self._lock = threading.Lock()
        # an infer request is not thread-safe and the finish pool's threads classify at once, so each
        # thread keeps its own request per compiled model
        self._local = threading.local()

    def static_shapes(self) -> list[tuple[int, ...]]:
        """The input shapes compiled statically so far, least recently used first."""
        with self._lock:
            return list(self._static)

    def _compiled_for(self, shape: tuple[int, ...]):
        with self._lock:
            if shape in self._static:
                self._static.move_to_end(shape)
                return self._static[shape]
            if not self._static_shapes or shape not in self._seen:
                self._seen.add(shape)
                return self._dynamic
        model = self._model.clone()
        model.reshape(list(shape))
        try:
            compiled = self._core.compile_model(model, "CPU", self._config)
        except RuntimeError as err:
            raise ModelError(f"{self.path}: OpenVINO cannot compile it for input {shape}: {err}") from err
        with self._lock:
            self._static[shape] = compiled
            while len(self._static) > STATIC_SHAPES_KEPT:
                self._static.popitem(last=False)
        return compiled

    def predict(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        compiled = self._compiled_for(batch.shape)
        requests = self._local.__dict__.setdefault("requests", {})
        request = requests.get(id(compiled), (None, None))[1]
        if request is None:
            with self._lock:  # forget the requests of models dropped since
                live = {id(c) for c in (self._dynamic, *self._static.values())}
            for key in [key for key in requests if key not in live]:
                del requests[key]
            request = compiled.create_infer_request()
            requests[id(compiled)] = (compiled, request)  # the model is held too, so its id stays unique
        request.infer({0: batch})
        # the output tensor's memory belongs to the request and is overwritten by its next call
        return request.get_output_tensor(0).data.copy()
