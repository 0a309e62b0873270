"""The Groschner et al. (2021) U-Net in torch, for training and as the eager reference.

The layer order follows the published pyNanoFind network exactly, so that its Keras weights map
one-to-one (see ``keras_import``): one 3×3 conv + batch-norm per encoder level, max-pooling taken
from the batch-norm output *before* the ReLU while the skip connection carries the ReLU output, a
centre block of two conv-BN-ReLU, and decoder levels of nearest upsample, concatenation
``[skip, upsampled]``, conv-BN-ReLU, dropout, conv-BN-ReLU. A 1×1 conv and softmax give the
background/particle probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

#: Keras' BatchNormalization epsilon in the published model; kept so imported weights match.
BN_EPS = 1e-4


class ConvBN(nn.Module):
    """3×3 'same' convolution followed by batch normalisation (no activation)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.bn = nn.BatchNorm2d(c_out, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class DecoderLevel(nn.Module):
    def __init__(self, c_below: int, c_skip: int, c_out: int, dropout: float):
        super().__init__()
        self.first = ConvBN(c_skip + c_below, c_out)
        self.dropout = nn.Dropout(dropout)
        self.second = ConvBN(c_out, c_out)

    def forward(self, below: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(below, scale_factor=2.0, mode="nearest")
        x = F.relu(self.first(torch.cat([skip, up], dim=1)))
        return F.relu(self.second(self.dropout(x)))


class SegmentationNet(nn.Module):
    """The interface every segmentation net of ``models.architectures`` shares.

    Subclasses define ``decoder_output`` (features before the 1×1 ``head``), ``head`` and
    ``divisor``; ``finish`` is the purely spatial, linear step after the head (identity here), so
    that ``export_onnx`` can fold the two-class softmax into one sigmoid of the logit difference.
    """

    head: nn.Conv2d

    def decoder_output(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def finish(self, logits: torch.Tensor) -> torch.Tensor:
        """Spatial step after the head (none: the net decodes to full resolution)."""
        return logits

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (N, n_classes, H, W)."""
        return self.finish(self.head(self.decoder_output(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities (N, n_classes, H, W)."""
        return torch.softmax(self.logits(x), dim=1)


class UNet(SegmentationNet):
    """Segmentation U-Net with configurable widths (paper: 4-8-16-32).

    Parameters
    ----------
    widths
        Filters per encoder level; the centre block uses the last width.
    n_classes
        Output channels of the softmax (background, particle).
    dropout
        Dropout rate between the two decoder convolutions.

    Examples
    --------
    >>> net = UNet().eval()
    >>> net(torch.zeros(1, 1, 64, 64)).shape
    torch.Size([1, 2, 64, 64])
    """

    def __init__(self, widths: Sequence[int] = (4, 8, 16, 32), n_classes: int = 2, dropout: float = 0.1):
        super().__init__()
        self.widths = tuple(int(w) for w in widths)
        ins = (1,) + self.widths[:-1]
        self.encoder = nn.ModuleList(ConvBN(i, o) for i, o in zip(ins, self.widths))
        centre = self.widths[-1]
        self.centre = nn.ModuleList([ConvBN(centre, centre), ConvBN(centre, centre)])
        belows = (centre,) + tuple(reversed(self.widths))[:-1]
        self.decoder = nn.ModuleList(
            DecoderLevel(b, s, s, dropout) for b, s in zip(belows, reversed(self.widths))
        )
        self.head = nn.Conv2d(self.widths[0], n_classes, 1)

    @property
    def divisor(self) -> int:
        """Input sides must be a multiple of this (one halving per encoder level)."""
        return 2 ** len(self.widths)

    def decoder_output(self, x: torch.Tensor) -> torch.Tensor:
        """Output of the last decoder level, before the 1×1 head."""
        skips = []
        for level in self.encoder:
            normed = level(x)
            skips.append(F.relu(normed))
            x = F.max_pool2d(normed, 2)
        for block in self.centre:
            x = F.relu(block(x))
        for level, skip in zip(self.decoder, reversed(skips)):
            x = level(x, skip)
        return x
