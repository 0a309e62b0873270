"""Inference backends for the segmentation network. Each maps an (N, 1, H, W) float32 batch to an
(N, 1, H, W) float32 particle-probability batch."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class SegmentationBackend(Protocol):
    name: str

    def predict(self, batch: np.ndarray) -> np.ndarray: ...
