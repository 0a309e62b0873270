"""The segmentation architectures a profile can name, and their geometry.

``manifest.segmentation.architecture`` + ``widths`` identify the network completely: training and
retraining build it with `build_net` (needs torch), while the inference side, which has no torch,
asks `divisor` and `receptive_field` how to pad and tile frames for the exported ONNX file.

Every net built here has the same interface: ``logits(x)`` (N, 2, H, W), ``forward(x)`` (softmax
probabilities), ``divisor`` (input sides must be multiples of it), and for export
``decoder_output(x)``, a 1×1 ``head`` and a linear spatial ``finish`` after it.

==================  ==========================================================  ================
name                network                                                     default widths
==================  ==========================================================  ================
``unet``            Groschner et al. (2021) pyNanoFind U-Net (one conv/level)  4 8 16 32
``resnet18-unet``   ResNet-18-style encoder (2 basic blocks × 4 stages), U-Net  8 16 32 64
                    decoder with skips
``fpn``             same encoder, feature pyramid + panoptic-FPN semantic head  8 16 32 64
==================  ==========================================================  ================

Region classifiers (``training["classifier"].metrics["architecture"]`` of a ``kind = "cnn"``
classifier) are built by `build_classifier`: ``crop-cnn`` (`models.crop_cnn.CropCNN`, widths
16 32 64 128), crops (N, C, S, S) → class logits.
"""

from __future__ import annotations

from collections.abc import Sequence

from latticewatch.errors import ModelError

ARCHITECTURES: tuple[str, ...] = ("unet", "resnet18-unet", "fpn")
DEFAULT_WIDTHS: dict[str, tuple[int, ...]] = {
    "unet": (4, 8, 16, 32), "resnet18-unet": (8, 16, 32, 64), "fpn": (8, 16, 32, 64),
}
CLASSIFIER_ARCHITECTURES: tuple[str, ...] = ("crop-cnn",)
CLASSIFIER_DEFAULT_WIDTHS: dict[str, tuple[int, ...]] = {"crop-cnn": (16, 32, 64, 128)}


class ArchitectureError(ModelError, ValueError):
    """An unknown architecture name, or widths that do not fit it."""


def check(arch: str, widths: Sequence[int]) -> tuple[int, ...]:
    """Validate an architecture name and its widths; returns the widths as a tuple of ints.

    >>> check("fpn", [8, 16, 32, 64])
    (8, 16, 32, 64)
    """
    if arch not in ARCHITECTURES:
        raise ArchitectureError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    widths = tuple(int(w) for w in widths)
    if not widths or min(widths) < 1:
        raise ArchitectureError(f"{arch}: widths must be positive integers, got {widths}")
    if arch != "unet" and len(widths) != 4:
        raise ArchitectureError(f"{arch}: needs 4 widths (one per ResNet stage), got {len(widths)}: {widths}")
    return widths


def divisor(arch: str, widths: Sequence[int]) -> int:
    """Input sides must be a multiple of this.

    >>> divisor("unet", (4, 8, 16, 32)), divisor("resnet18-unet", (8, 16, 32, 64))
    (16, 32)
    """
    widths = check(arch, widths)
    return 2 ** len(widths) if arch == "unet" else 32


def _walk(ops: Sequence[tuple[str, int]]) -> int:
    """Receptive field of a chain of ('conv', kernel[, stride]) / ('up', factor) steps, in input px.

    Upsampling is counted as widening the field by one input step (bilinear needs two neighbours;
    nearest needs one, so this errs on the safe side for tiling margins).
    """
    rf, jump = 1.0, 1.0
    for op in ops:
        if op[0] == "conv":
            kernel, stride = op[1], op[2] if len(op) > 2 else 1
            rf += (kernel - 1) * jump
            jump *= stride
        else:
            rf += jump
            jump /= op[1]
    return int(rf)


_RESNET_ENCODER = [("conv", 7, 2), ("conv", 3, 2)] + [("conv", 3)] * 4 + ([("conv", 3, 2)] + [("conv", 3)] * 3) * 3


def receptive_field(arch: str, widths: Sequence[int]) -> int:
    """Receptive field (input pixels, an upper bound) of one output pixel: tiles of a large frame
    overlap by half of it, so that the stitched result equals the whole-frame result.

    >>> receptive_field("unet", (4, 8, 16, 32))
    200
    """
    widths = check(arch, widths)
    if arch == "unet":
        levels = len(widths)
        down, bottom, up = [("conv", 3), ("conv", 2, 2)], [("conv", 3)] * 2, [("up", 2), ("conv", 3), ("conv", 3)]
        return _walk(down * levels + bottom + up * levels)
    if arch == "resnet18-unet":
        decoder = ([("up", 2)] + [("conv", 3)] * 2) * 3 + [("up", 2), ("conv", 3), ("up", 2), ("conv", 3)]
        return _walk(_RESNET_ENCODER + decoder)
    # fpn: deepest path = smoothing conv at 1/32, three conv + up steps to 1/4, bilinear ×4
    return _walk(_RESNET_ENCODER + [("conv", 3)] + [("conv", 3), ("up", 2)] * 3 + [("up", 4)])


def build_net(arch: str, widths: Sequence[int] | None = None):
    """A freshly initialised torch network (needs torch: the ``[train]`` extra).

    Parameters
    ----------
    arch
        One of `ARCHITECTURES`.
    widths
        Filters per level (``unet``) or per ResNet stage; default `DEFAULT_WIDTHS`.

    Examples
    --------
    >>> import torch
    >>> net = build_net("fpn", (8, 16, 32, 64)).eval()
    >>> net.logits(torch.zeros(1, 1, 64, 64)).shape, net.divisor
    (torch.Size([1, 2, 64, 64]), 32)
    """
    widths = check(arch, DEFAULT_WIDTHS.get(arch, ()) if widths is None else widths)
    if arch == "unet":
        from latticewatch.models.unet import UNet

        return UNet(widths)
    from latticewatch.models.resnet import FPN, ResNetUNet

    return ResNetUNet(widths) if arch == "resnet18-unet" else FPN(widths)


def build_classifier(arch: str, in_channels: int, n_classes: int, widths: Sequence[int] | None = None,
                     dropout: float = 0.3):
    """A freshly initialised region classifier (needs torch: the ``[train]`` extra).

    Examples
    --------
    >>> import torch
    >>> build_classifier("crop-cnn", 3, 5).eval().logits(torch.zeros(1, 3, 64, 64)).shape
    torch.Size([1, 5])
    """
    if arch not in CLASSIFIER_ARCHITECTURES:
        raise ArchitectureError(f"unknown classifier {arch!r}; choose one of {', '.join(CLASSIFIER_ARCHITECTURES)}")
    widths = tuple(int(w) for w in (CLASSIFIER_DEFAULT_WIDTHS[arch] if widths is None else widths))
    if not widths or min(widths) < 1:
        raise ArchitectureError(f"{arch}: widths must be positive integers, got {widths}")
    from latticewatch.models.crop_cnn import CropCNN

    return CropCNN(in_channels, n_classes, widths, dropout)
