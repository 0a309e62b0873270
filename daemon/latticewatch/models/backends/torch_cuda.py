"""Torch on a CUDA GPU (backend kind ``cuda``): the profile's network rebuilt from its safetensors weights.

The network is the training code's own (`models.architectures`), loaded from ``ModelFiles.weights``
and reshaped exactly as the ONNX exporter does (`models.export.ParticleProbability` for a
segmentation net: one particle probability; the classifier with its softmax), so `predict` returns
what the profile's ONNX returns. Batch norms are folded into the convolutions (`torch.fx` fusion).

On CUDA the net runs in fp16 (``fp16=False``: fp32) and channels-last, and each input shape is
captured once as a **CUDA graph**: a frame then costs one graph launch instead of ~100 kernel
launches from Python. CUDA graphs rather than ``torch.compile(mode="reduce-overhead")``: capture
takes milliseconds per new frame shape instead of tens of seconds of Inductor/Triton compilation
(on a fresh machine, and again for each shape a session brings), needs no compiler at run time,
and the convolutions, which dominate, are cuDNN's either way (``cudnn.benchmark`` picks them per
shape before capture).

Per shape, pinned host buffers and device staging buffers are allocated once and reused. A batch
goes through in chunks (one frame of 2048², or several smaller frames or crops) on three streams:
chunk k+1 is uploaded on the upload stream while the graph computes chunk k and chunk k−1's result
is downloaded, ordered by CUDA events. `predict_mask` thresholds on the GPU so that only the uint8
mask crosses PCIe. `prepare_on_device` runs the analyser's preprocessing on the GPU
(`stages.preprocess_torch`).

The same class runs on ``device="cpu"`` in float32 (no graphs, no streams): that is how CI, which has
no GPU, holds the rebuilt network to the shipped ONNX file.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from latticewatch.errors import ModelError
from latticewatch.models.backends import DeviceMemoryError, ModelFiles, cpu_device
from latticewatch.stages.preprocess import Normalisation, Preprocessed

log = logging.getLogger(__name__)

#: Input shapes whose CUDA graphs and buffers are kept; the least recently used beyond this is dropped.
MAX_SHAPES = 16
#: Input values per chunk: one 2048² frame, or that many pixels of smaller frames or crops in one graph.
CHUNK_VALUES = 2048 * 2048


def unavailable() -> str | None:
    """Why torch cannot run a network on a CUDA GPU here, or ``None`` when it can.

    Examples
    --------
    >>> unavailable()  # doctest: +SKIP
    'torch 2.13.0+cpu is built without CUDA'
    """
    try:
        import torch
    except ModuleNotFoundError:
        return "torch is not installed (pip install torch, a CUDA build)"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is built without CUDA"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device"
    return None


def open(model: ModelFiles, *, threads: int | None = None, plan_cache: Path | None = None,
         fp16: bool | None = None) -> TorchBackend:
    """The registry's entry point: ``model`` on the first CUDA GPU, fp16 unless ``fp16=False``.

    ``threads`` and ``plan_cache`` concern other kinds and are ignored.

    Examples
    --------
    >>> backend = open(files)  # doctest: +SKIP
    >>> backend.name, backend.device  # doctest: +SKIP
    ('torch-cuda-fp16', 'NVIDIA H200')
    """
    reason = unavailable()
    if reason:
        raise ModelError(f"backend cuda: {reason}")
    return TorchBackend(model, device="cuda", fp16=fp16 is not False)


def load_network(model: ModelFiles):
    """The eval-mode torch module that computes what ``model.onnx`` computes, batch norms folded.

    Examples
    --------
    >>> net = load_network(files)  # doctest: +SKIP
    """
    from safetensors.torch import load_file

    from latticewatch.models.architectures import build_classifier, build_net
    from latticewatch.models.export import ParticleProbability

    with warnings.catch_warnings():
        # the module imports torch.jit's deprecated script_method (for mkldnn); its conv-BN fusion does not use it
        warnings.simplefilter("ignore", DeprecationWarning)
        from torch.fx.experimental.optimization import fuse

    if model.weights is None:
        raise ModelError(f"{model.onnx}: no safetensors weights beside it; the cuda backend builds the network "
                         "in torch from them (the manifest's 'weights')")
    try:
        state = load_file(str(model.weights))
        if model.role == "classifier":
            # the classifier's input channels and classes are the shapes of its first and last layers
            net = build_classifier(model.architecture, state["features.0.weight"].shape[1],
                                   state["head.weight"].shape[0], model.widths)
        else:
            net = build_net(model.architecture, model.widths)
        net.load_state_dict(state)
    except (OSError, KeyError, RuntimeError, ValueError) as err:
        raise ModelError(f"{model.weights}: not the weights of a {model.architecture} {model.widths}: {err}") from err
    net.eval()
    return fuse(net if model.role == "classifier" else ParticleProbability(net).eval())


def _chunk_size(n: int, values_per_item: int) -> int:
    """Items per graph launch: as many as fit in `CHUNK_VALUES` (at least one), rounded up to a power
    of two so that a few graph sizes serve every batch size.

    >>> _chunk_size(7, 3 * 96 * 96), _chunk_size(3, 2048 * 2048)
    (8, 1)
    """
    m = min(n, max(1, CHUNK_VALUES // values_per_item))
    return 1 << (m - 1).bit_length()


class _Captured:
    """One input shape on the GPU: the captured graph, its static tensors, and two of every staging
    buffer (pinned host in/out, device in/out) with the events that say when each is free."""

    def __init__(self, forward, shape: tuple[int, ...], device, stream):
        import torch

        self.static_in = torch.zeros(shape, dtype=torch.float32, device=device)
        # warm up off the default stream, as capture requires; cudnn.benchmark picks this shape's kernels here
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(2):
                forward(self.static_in)
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA work (preprocessing, the classifier) may go on meanwhile
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"), torch.no_grad():
            self.static_out = forward(self.static_in)
        self.stage_in = [torch.empty_like(self.static_in) for _ in range(2)]
        self.pinned_in = [torch.empty(shape, dtype=torch.float32, pin_memory=True) for _ in range(2)]
        self.uploaded, self.consumed = [torch.cuda.Event() for _ in range(2)], [torch.cuda.Event() for _ in range(2)]
        self.outputs: dict[torch.dtype, tuple[list, list]] = {}  # dtype → (device staging, pinned host) pairs
        self.computed, self.downloaded = [torch.cuda.Event() for _ in range(2)], [torch.cuda.Event() for _ in range(2)]

    def output_buffers(self, dtype) -> tuple[list, list]:
        import torch

        if dtype not in self.outputs:
            shape = self.static_out.shape
            self.outputs[dtype] = ([torch.empty(shape, dtype=dtype, device=self.static_out.device) for _ in range(2)],
                                   [torch.empty(shape, dtype=dtype, pin_memory=True) for _ in range(2)])
        return self.outputs[dtype]


class TorchBackend:
    """A profile's network in torch, on a CUDA GPU (fp16 or fp32, CUDA graphs) or on the CPU (fp32).

    Parameters
    ----------
    model
        The network's files; ``model.weights`` (safetensors) is what is loaded.
    device
        ``"cuda"`` (or ``"cuda:1"`` …) or ``"cpu"``.
    fp16
        Half precision (CUDA only; ignored on the CPU).

    Examples
    --------
    >>> backend = TorchBackend(files, device="cpu")  # doctest: +SKIP
    >>> backend.predict(np.zeros((1, 1, 64, 64), np.float32)).shape  # doctest: +SKIP
    (1, 1, 64, 64)
    """

    def __init__(self, model: ModelFiles, *, device: str = "cuda", fp16: bool = True):
        import torch

        self.model = model
        self._device = torch.device(device)
        self._cuda = self._device.type == "cuda"
        self._dtype = torch.float16 if fp16 and self._cuda else torch.float32
        net = load_network(model).to(self._device, self._dtype)
        self._net = net.to(memory_format=torch.channels_last)
        precision = "fp16" if self._dtype == torch.float16 else "fp32"
        self.name = f"torch-{self._device.type}-{precision}"
        self._captured: OrderedDict[tuple[int, ...], _Captured] = OrderedDict()
        self._lock, self._prepare_lock = threading.Lock(), threading.Lock()
        self._pinned_frame: Any = None  # the last frame's pinned upload buffer (a camera's frames share a shape)
        if self._cuda:
            # the fastest convolutions per input shape (process-wide: the classifier's torch backend gains too)
            torch.backends.cudnn.benchmark = True
            index = self._device.index if self._device.index is not None else torch.cuda.current_device()
            self._device = torch.device("cuda", index)
            self.device = torch.cuda.get_device_name(index)
            self._upload, self._compute, self._download, self._prepare = (
                torch.cuda.Stream(self._device) for _ in range(4))
        else:
            self.device = cpu_device(torch.get_num_threads())

    def _forward(self, batch):
        import torch

        return self._net(batch.to(self._dtype, memory_format=torch.channels_last)).float()

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Float32 batch in (``(N, 1, H, W)`` images or ``(N, C, S, S)`` crops), float32 out, as the ONNX."""
        return self._run(batch, None)

    def predict_mask(self, batch: np.ndarray, threshold: float) -> np.ndarray:
        """``predict(batch) >= threshold`` as uint8, thresholded on the device so that only the mask is
        copied back (a quarter of the probability's bytes).

        Examples
        --------
        >>> backend.predict_mask(images, 0.5).dtype  # doctest: +SKIP
        dtype('uint8')
        """
        return self._run(batch, float(threshold))

    def _run(self, batch: np.ndarray, threshold: float | None) -> np.ndarray:
        import torch

        batch = np.asarray(batch)
        if batch.ndim != 4 or len(batch) == 0:
            raise ModelError(f"{self.model.onnx}: expected a non-empty (N, C, H, W) batch, got shape {batch.shape}")
        if not self._cuda:
            with torch.no_grad():
                out = self._forward(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))).numpy()
            return out if threshold is None else (out >= threshold).view(np.uint8)
        try:
            with self._lock:
                return self._pipelined(batch, threshold)
        except torch.cuda.OutOfMemoryError as err:
            problem = str(err).splitlines()[0]
        raise self._out_of_memory(f"a batch of shape {batch.shape}", problem)

    def _out_of_memory(self, what: str, problem: str) -> DeviceMemoryError:
        """The error for an out-of-memory in ``what``, once the failed call's tensors are given back.

        Called after the ``except`` block has ended: the exception's traceback, and with it the frames that
        hold the tensors allocated so far, is gone by then, so emptying the cache frees them.
        """
        import torch

        torch.cuda.empty_cache()
        return DeviceMemoryError(f"{self.model.onnx}: {self.device} ran out of memory for {what} ({problem}); "
                                 "a smaller input may fit")

    def _entry(self, shape: tuple[int, ...]) -> _Captured:
        if shape in self._captured:
            self._captured.move_to_end(shape)
        else:
            log.info("%s: capturing a CUDA graph for input shape %s on %s", self.model.onnx, shape, self.device)
            self._captured[shape] = _Captured(self._forward, shape, self._device, self._compute)
            if len(self._captured) > MAX_SHAPES:
                self._captured.popitem(last=False)
        return self._captured[shape]

    def _pipelined(self, batch: np.ndarray, threshold: float | None) -> np.ndarray:
        import torch

        n, item = len(batch), batch.shape[1:]
        size = _chunk_size(n, int(np.prod(item)))
        entry = self._entry((size, *item))
        staged, pinned = entry.output_buffers(torch.float32 if threshold is None else torch.bool)
        out = np.empty((n, *entry.static_out.shape[1:]), np.float32 if threshold is None else np.uint8)
        pending = None
        for k, start in enumerate(range(0, n, size)):
            j, stop = k % 2, min(n, start + size)
            entry.uploaded[j].synchronize()  # the host may refill pinned_in[j] once its last upload is done
            host = entry.pinned_in[j].numpy()
            host[: stop - start] = batch[start:stop]
            host[stop - start :] = 0
            with torch.cuda.stream(self._upload):
                self._upload.wait_event(entry.consumed[j])
                entry.stage_in[j].copy_(entry.pinned_in[j], non_blocking=True)
                entry.uploaded[j].record()
            with torch.cuda.stream(self._compute):
                self._compute.wait_event(entry.uploaded[j])
                entry.static_in.copy_(entry.stage_in[j])
                entry.consumed[j].record()
                entry.graph.replay()
                self._compute.wait_event(entry.downloaded[j])
                if threshold is None:
                    staged[j].copy_(entry.static_out)
                else:
                    torch.ge(entry.static_out, threshold, out=staged[j])
                entry.computed[j].record()
            with torch.cuda.stream(self._download):
                self._download.wait_event(entry.computed[j])
                pinned[j].copy_(staged[j], non_blocking=True)
                entry.downloaded[j].record()
            if pending is not None:
                self._drain(entry, pinned, out, *pending)
            pending = (j, start, stop)
        self._drain(entry, pinned, out, *pending)
        return out

    @staticmethod
    def _drain(entry: _Captured, pinned: list, out: np.ndarray, j: int, start: int, stop: int) -> None:
        entry.downloaded[j].synchronize()
        result = pinned[j].numpy()[: stop - start]
        out[start:stop] = result.view(np.uint8) if result.dtype == np.bool_ else result

    def prepare_on_device(
        self,
        pixels: np.ndarray,
        pixel_size_nm: float | None,
        *,
        normalisation: Normalisation,
        model_pixel_size_nm: float | None,
        feature_normalisation: Normalisation | None = None,
    ) -> Preprocessed:
        """`latticewatch.stages.preprocess.preprocess` (same arguments, same result) run on this
        backend's device: the raw frame is uploaded once through a pinned buffer kept for the frame shape,
        on its own stream so it overlaps a segmentation running on another thread. Raises
        `DeviceMemoryError` when the frame does not fit (the numpy stage then does it on the CPU).

        Examples
        --------
        >>> pre = backend.prepare_on_device(frame.pixels, frame.pixel_size_nm, normalisation="zscore",
        ...                                 model_pixel_size_nm=0.05)  # doctest: +SKIP
        """
        import torch

        from latticewatch.stages.preprocess_torch import preprocess_torch

        options = {"normalisation": normalisation, "model_pixel_size_nm": model_pixel_size_nm,
                   "feature_normalisation": feature_normalisation}
        if not self._cuda:
            return preprocess_torch(torch.from_numpy(np.ascontiguousarray(pixels)), pixel_size_nm,
                                    **options).to_host()
        pixels = np.ascontiguousarray(pixels)
        try:
            with self._prepare_lock, torch.cuda.stream(self._prepare):
                host = None if self._pinned_frame is None else self._pinned_frame.numpy()
                if host is None or host.shape != pixels.shape or host.dtype != pixels.dtype:
                    self._pinned_frame = torch.from_numpy(pixels).pin_memory()  # a pinned copy, kept for reuse
                else:
                    host[...] = pixels
                frame = self._pinned_frame.to(self._device, non_blocking=True)
                # to_host copies back on this stream, so the pinned buffer is free again when it returns
                return preprocess_torch(frame, pixel_size_nm, **options).to_host()
        except torch.cuda.OutOfMemoryError as err:
            problem = str(err).splitlines()[0]
        raise self._out_of_memory(f"preprocessing a {pixels.shape[0]}×{pixels.shape[1]} frame", problem)
