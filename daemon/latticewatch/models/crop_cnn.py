"""The per-region classifier network: a small CNN from a region's crop channels to class logits.

Needs torch (the ``[train]`` extra); inference runs the exported ONNX file (``models.export``).
Four blocks of 3×3 convolution, batch norm, ReLU and 2×2 max pooling (widths 16-32-64-128 by
default), then a global average pool, dropout and one linear layer. The global pool makes the
net indifferent to where in the window the fault lies and keeps it small (~100 k parameters), so
a frame's regions are classified in one batched call in a few milliseconds on a CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class CropCNN(nn.Module):
    """(N, C, S, S) crops → (N, n_classes) logits; `forward` gives softmax probabilities.

    Parameters
    ----------
    in_channels
        Channels of `latticewatch.stages.crops.CropSpec` (image, mask, log power …).
    n_classes
        Number of classes (five: `latticewatch.frame.CLASSES`).
    widths
        Filters of each conv block; each block halves the spatial size.
    dropout
        Dropout before the linear layer (active in training only).

    Examples
    --------
    >>> net = CropCNN(3, 5).eval()
    >>> net(torch.zeros(2, 3, 96, 96)).sum(dim=1)
    tensor([1., 1.], grad_fn=<SumBackward1>)
    """

    def __init__(self, in_channels: int, n_classes: int, widths: Sequence[int] = (16, 32, 64, 128),
                 dropout: float = 0.3):
        super().__init__()
        layers: list[nn.Module] = []
        previous = in_channels
        for width in widths:
            layers += [nn.Conv2d(previous, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            previous = width
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(previous, n_classes)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.features(x).mean(dim=(2, 3))
        return self.head(self.dropout(pooled))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x), dim=1)
