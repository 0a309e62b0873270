"""Out of device memory is not a lost frame: retry smaller on the accelerator, then on the CPU.

`FallbackBackend` wraps an accelerator backend. When it raises `DeviceMemoryError` the same input is
run, in this order, as smaller batches (halving N), as overlapping tiles of one image (the tiling of
`latticewatch.stages.segment.segment`, so the stitched probabilities equal the whole-image ones),
and finally on the CPU backend. The first use of each level logs one ERROR; every call that needed
one leaves a note (`take_notes`) that the analyser puts on the frame's analysis.
"""

from __future__ import annotations

import logging
import math
import threading

import numpy as np

from latticewatch.models.backends import (
    ACCELERATORS,
    DeviceMemoryError,
    ModelFiles,
    SegmentationBackend,
    cpu_default,
    open_backend,
    resolve,
)
from latticewatch.stages.segment import segment

log = logging.getLogger(__name__)

_WHAT = {"batches": "in smaller batches on the same device", "tiles": "in overlapping tiles on the same device",
         "cpu": "on the CPU"}


class FallbackBackend:
    """An accelerator backend that survives running out of device memory.

    Parameters
    ----------
    primary
        The accelerator backend (its ``predict`` raises `DeviceMemoryError` when an input does not fit).
    model
        The network's files: the CPU backend is opened from them the first time it is needed.
    divisor, receptive_field_px
        The segmentation net's geometry (``models.architectures``), for tiling one image;
        ``None`` (the classifier) skips the tiling level.
    threads
        CPU threads of the CPU backend.
    cpu
        An already open CPU backend to use instead of opening one from ``model`` (tests, or a
        process that has one anyway).

    Examples
    --------
    >>> backend = FallbackBackend(trt, files, divisor=16, receptive_field_px=200)  # doctest: +SKIP
    >>> probs = backend.predict(batch)  # doctest: +SKIP
    >>> backend.take_notes()  # doctest: +SKIP
    ['backend_fallback: out of GPU memory on NVIDIA H200 (tensorrt-fp16) for a 4×1×2048×2048 batch; ran in ...']
    """

    def __init__(self, primary: SegmentationBackend, model: ModelFiles, *, divisor: int | None = None,
                 receptive_field_px: int | None = None, threads: int | None = None,
                 cpu: SegmentationBackend | None = None):
        self.primary = primary
        self.name, self.device = primary.name, primary.device
        self.model, self.threads = model, threads
        self.divisor, self.receptive_field_px = divisor, receptive_field_px
        self._cpu = cpu
        #: how many times each level ran (``batches``, ``tiles``, ``cpu``), for status pages and tests
        self.counts = {level: 0 for level in _WHAT}
        # per thread: frames are segmented on one thread and classified on others at the same time, and
        # each note belongs to the frame whose call needed the fallback
        self._local = threading.local()

    def predict(self, batch: np.ndarray) -> np.ndarray:
        try:
            return self.primary.predict(batch)
        except DeviceMemoryError as err:
            log.debug("%s: %s", self.name, err)
        used: list[str] = []
        out = self._in_parts(batch, used) if len(batch) > 1 else self._one(batch, used)
        what = {**_WHAT, "cpu": f"on the CPU ({self._cpu.name})" if self._cpu else _WHAT["cpu"]}
        note = (f"backend_fallback: out of GPU memory on {self.device} ({self.name}) for a "
                f"{'×'.join(map(str, batch.shape))} batch; ran "
                + ", then ".join(what[level] for level in dict.fromkeys(used)))
        self._local.notes = [*getattr(self._local, "notes", []), note]
        return out

    def take_notes(self) -> list[str]:
        """The fallback notes of this thread's calls since its last `take_notes` (then forgotten).

        >>> FallbackBackend(cpu_backend, files).take_notes()  # doctest: +SKIP
        []
        """
        notes, self._local.notes = getattr(self._local, "notes", []), []
        return notes

    def _level(self, level: str, used: list[str], subject: str, how: str = "") -> None:
        if self.counts[level] == 0:
            log.error("OUT OF GPU MEMORY on %s (%s): running %s %s%s; every frame this happens to carries a "
                      "backend_fallback warning (this is logged once)", self.device, self.name, subject, _WHAT[level],
                      how)
        self.counts[level] += 1
        used.append(level)

    def _in_parts(self, batch: np.ndarray, used: list[str]) -> np.ndarray:
        """``batch`` (which did not fit) in two halves, each halved again while it does not fit."""
        half = len(batch) // 2
        self._level("batches", used, f"a batch of {len(batch)}", f" ({half} + {len(batch) - half})")
        parts = []
        for part in (batch[:half], batch[half:]):
            try:
                parts.append(self.primary.predict(part))
            except DeviceMemoryError:
                parts.append(self._in_parts(part, used) if len(part) > 1 else self._one(part, used))
        return np.concatenate(parts)

    def _one(self, batch: np.ndarray, used: list[str]) -> np.ndarray:
        """One image that did not fit: tiles of half the side, a quarter …, then the CPU."""
        if self.divisor is not None and self.receptive_field_px is not None:
            image = batch[0, 0]
            max_pixels = image.size // 4
            # a tile's margins take about one receptive field of its side: below two, most of each tile
            # is margin and the CPU is the faster way out
            while max_pixels >= (2 * self.receptive_field_px) ** 2:
                self._level("tiles", used, f"a {image.shape[0]}×{image.shape[1]} image",
                            f" (≤ {math.isqrt(max_pixels)}² px each, margins included)")
                try:
                    return segment(image, self.primary, divisor=self.divisor,
                                   receptive_field_px=self.receptive_field_px, max_pixels=max_pixels)[None, None]
                except DeviceMemoryError:
                    max_pixels //= 4
        if self._cpu is None:
            self._cpu = open_backend(cpu_default(), self.model, threads=self.threads)
        self._level("cpu", used, f"a {'×'.join(map(str, batch.shape))} input")
        return self._cpu.predict(batch)


def open_guarded(kind: str, model: ModelFiles, *, threads: int | None = None, divisor: int | None = None,
                 receptive_field_px: int | None = None) -> SegmentationBackend:
    """`open_backend`, with an accelerator wrapped in a `FallbackBackend` (same ``name`` and ``device``).

    ``divisor`` and ``receptive_field_px``: the segmentation net's geometry, for the tiling level.

    >>> backend = open_guarded("auto", files, threads=2, divisor=16, receptive_field_px=200)  # doctest: +SKIP
    """
    backend = open_backend(kind, model, threads=threads)
    if resolve(kind) not in ACCELERATORS:
        return backend
    return FallbackBackend(backend, model, divisor=divisor, receptive_field_px=receptive_field_px, threads=threads)
