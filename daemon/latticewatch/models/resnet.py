"""ResNet-18-style encoder with a U-Net decoder or an FPN head (Groschner et al. 2020/2021 variants).

Groschner's thesis compares the plain U-Net with a U-Net and a feature pyramid network built on a
ResNet-18 encoder. These are the same designs at widths small enough for live CPU inference and
trained from scratch (no downloaded ImageNet weights: micrographs are single-channel and unlike
photographs, and the daemon must not fetch anything).

Both are ``models.unet.SegmentationNet``s: ``decoder_output(x)`` gives the features before the 1×1
``head``; the FPN's ``finish`` (bilinear ×4) is the spatial step after it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from latticewatch.models.unet import SegmentationNet


def conv_bn_relu(c_in: int, c_out: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class BasicBlock(nn.Module):
    """ResNet basic block: two 3×3 conv-BN with an identity (or strided 1×1 projection) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = (
            nn.Identity()
            if stride == 1 and c_in == c_out
            else nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNetEncoder(nn.Module):
    """ResNet-18 layout: 7×7 stride-2 stem, 3×3 stride-2 max-pool, four stages of two basic blocks
    (strides 1, 2, 2, 2). ``widths`` are the four stage widths (ResNet-18: 64, 128, 256, 512).

    ``forward`` returns the stem output (1/2 resolution) and the four stage outputs (1/4 … 1/32).
    """

    def __init__(self, widths: Sequence[int]):
        super().__init__()
        if len(widths) != 4:
            raise ValueError(f"a ResNet-18-style encoder has 4 stages; got widths {tuple(widths)}")
        self.widths = tuple(int(w) for w in widths)
        self.stem = conv_bn_relu(1, self.widths[0], kernel=7, stride=2)
        ins = (self.widths[0],) + self.widths[:-1]
        self.stages = nn.ModuleList(
            nn.Sequential(BasicBlock(c_in, c_out, 1 if i == 0 else 2), BasicBlock(c_out, c_out))
            for i, (c_in, c_out) in enumerate(zip(ins, self.widths))
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        features = [x]
        x = F.max_pool2d(x, 3, stride=2, padding=1)
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


def _up2(x: torch.Tensor) -> torch.Tensor:
    # nearest: exact in ONNX and cheap; the following 3×3 conv smooths the blocks
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


class _ResNetSegmentation(SegmentationNet):
    @property
    def divisor(self) -> int:
        """Input sides must be a multiple of this (stem, pool and three strided stages)."""
        return 32


class ResNetUNet(_ResNetSegmentation):
    """U-Net decoder on the ResNet-18-style encoder.

    Each decoder level upsamples ×2, concatenates the encoder feature of that scale and applies
    two conv-BN-ReLU (one at the 1/2 level); the last level returns to full resolution with a
    single narrow conv, since full-resolution convolutions dominate inference time.

    Parameters
    ----------
    widths
        The four encoder stage widths; decoder levels mirror them.
    n_classes
        Output channels (background, foreground).

    Examples
    --------
    >>> net = ResNetUNet((8, 16, 32, 64)).eval()
    >>> net(torch.zeros(1, 1, 64, 96)).shape, net.divisor
    (torch.Size([1, 2, 64, 96]), 32)
    """

    def __init__(self, widths: Sequence[int] = (8, 16, 32, 64), n_classes: int = 2):
        super().__init__()
        self.encoder = ResNetEncoder(widths)
        w = self.encoder.widths
        self.widths = w
        # (channels from below, skip channels, output channels) at 1/16, 1/8, 1/4, 1/2
        plan = [(w[3], w[2], w[2]), (w[2], w[1], w[1]), (w[1], w[0], w[0]), (w[0], w[0], w[0])]
        self.decoder = nn.ModuleList(
            nn.Sequential(conv_bn_relu(below + skip, out), conv_bn_relu(out, out)) if i < 3
            else conv_bn_relu(below + skip, out)
            for i, (below, skip, out) in enumerate(plan)
        )
        self.full = conv_bn_relu(w[0], max(4, w[0] // 2))
        self.head = nn.Conv2d(max(4, w[0] // 2), n_classes, 1)

    def decoder_output(self, x: torch.Tensor) -> torch.Tensor:
        c1, c2, c3, c4, c5 = self.encoder(x)
        y = c5
        for level, skip in zip(self.decoder, (c4, c3, c2, c1)):
            y = level(torch.cat([_up2(y), skip], dim=1))
        return self.full(_up2(y))


class FPN(_ResNetSegmentation):
    """Feature pyramid network (Lin et al. 2017) with a semantic-segmentation head (Kirillov et al.
    2019, panoptic FPN) on the ResNet-18-style encoder.

    1×1 laterals bring the stage outputs (1/4 … 1/32) to ``pyramid`` channels; a top-down path
    upsamples and sums; a 3×3 conv smooths each level. Each pyramid level then goes through
    conv-BN-ReLU + ×2 upsampling until 1/4, the levels are summed, a 1×1 head gives the class
    logits and bilinear ×4 upsampling returns them to full resolution.

    Examples
    --------
    >>> net = FPN((8, 16, 32, 64)).eval()
    >>> net(torch.zeros(2, 1, 64, 64)).shape
    torch.Size([2, 2, 64, 64])
    """

    def __init__(self, widths: Sequence[int] = (8, 16, 32, 64), n_classes: int = 2, pyramid: int | None = None,
                 seg: int | None = None):
        super().__init__()
        self.encoder = ResNetEncoder(widths)
        w = self.encoder.widths
        self.widths = w
        p = pyramid or max(8, w[1])
        s = seg or max(8, w[0])
        self.laterals = nn.ModuleList(nn.Conv2d(c, p, 1) for c in w)
        self.smooth = nn.ModuleList(nn.Conv2d(p, p, 3, padding=1) for _ in w)
        # level k (1/4 · 2^k) needs k upsampling steps to reach 1/4
        self.branches = nn.ModuleList(
            nn.ModuleList(conv_bn_relu(p if j == 0 else s, s) for j in range(max(1, k))) for k in range(len(w))
        )
        self.head = nn.Conv2d(s, n_classes, 1)

    def decoder_output(self, x: torch.Tensor) -> torch.Tensor:
        """Summed semantic features at 1/4 resolution (before the head)."""
        features = self.encoder(x)[1:]
        laterals = [lateral(f) for lateral, f in zip(self.laterals, features)]
        top_down = [laterals[-1]]
        for lateral in reversed(laterals[:-1]):
            top_down.insert(0, lateral + _up2(top_down[0]))
        total = None
        for k, (smooth, branch, level) in enumerate(zip(self.smooth, self.branches, top_down)):
            y = smooth(level)
            for block in branch:
                y = block(y)
                if k > 0:
                    y = _up2(y)
            total = y if total is None else total + y
        return total

    def finish(self, logits: torch.Tensor) -> torch.Tensor:
        """Bilinear ×4: the head works at 1/4 resolution."""
        return F.interpolate(logits, scale_factor=4.0, mode="bilinear", align_corners=False)
