"""Segmentation: run the U-Net over the whole frame, or in overlapping tiles when it is too large."""

from __future__ import annotations

import numpy as np

from latticewatch.models.backends import SegmentationBackend
from latticewatch.stages.preprocess import pad_to_multiple


def segment(
    image: np.ndarray,
    backend: SegmentationBackend,
    *,
    divisor: int,
    receptive_field_px: int,
    max_pixels: int = 2048 * 2048,
) -> np.ndarray:
    """Particle probability for a preprocessed float32 image, same shape as the input.

    The whole frame goes through the network at once when it fits in ``max_pixels``; larger
    frames are cut into tiles whose margins cover half the receptive field on every side, and
    tile origins sit on the network's pooling grid, so the stitched result equals the
    whole-frame result.

    ``divisor`` (input sides must be multiples of it) and ``receptive_field_px`` describe the
    network (``models.architectures.divisor`` / ``receptive_field``).

    Examples
    --------
    >>> prob = segment(np.zeros((100, 120), np.float32), backend, divisor=16, receptive_field_px=200)  # doctest: +SKIP
    >>> prob.shape  # doctest: +SKIP
    (100, 120)
    """
    padded, (h, w) = pad_to_multiple(image, divisor)
    if padded.size <= max_pixels:
        return backend.predict(padded[None, None])[0, 0, :h, :w]

    margin = -(-receptive_field_px // 2 // divisor) * divisor + divisor
    core = max(divisor, (int(np.sqrt(max_pixels)) - 2 * margin) // divisor * divisor)
    out = np.empty((h, w), np.float32)
    ph, pw = padded.shape
    for r0 in range(0, h, core):
        for c0 in range(0, w, core):
            tr0, tc0 = max(0, r0 - margin), max(0, c0 - margin)
            tr1, tc1 = min(ph, r0 + core + margin), min(pw, c0 + core + margin)
            # origins and ends are multiples of the divisor, so the tile needs no padding
            prob = backend.predict(padded[None, None, tr0:tr1, tc0:tc1])[0, 0]
            r1, c1 = min(h, r0 + core), min(w, c0 + core)
            out[r0:r1, c0:c1] = prob[r0 - tr0 : r1 - tr0, c0 - tc0 : c1 - tc0]
    return out
