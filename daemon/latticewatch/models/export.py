"""Export trained nets to ONNX for inference (needs torch: the ``[train]`` extra).

Any segmentation net of ``models.architectures`` can be exported: they all expose ``decoder_output``,
a 1×1 two-class ``head`` and a linear spatial ``finish`` (identity, or upsampling for the FPN).
A region classifier (`export_classifier_onnx`) is exported with its softmax inside the graph.
"""

from __future__ import annotations

import copy
import os
import warnings

import numpy as np
import torch
from torch import nn


class ParticleProbability(nn.Module):
    """The net with its 2-class softmax rewritten as one sigmoid of the logit difference.

    softmax([l0, l1])[1] == sigmoid(l1 - l0) exactly, and folding the difference into the 1×1 head
    (weights w1 - w0, bias b1 - b0) halves the head and removes a channel-axis softmax that ONNX
    Runtime runs slowly (~60 ms of ~190 ms on a 1024² frame). ``finish`` (e.g. the FPN's bilinear
    upsampling) is linear and acts per channel, so it commutes with taking the difference.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        head = net.head
        self.head = nn.Conv2d(head.in_channels, 1, 1)
        with torch.no_grad():
            self.head.weight.copy_(head.weight[1:2] - head.weight[0:1])
            self.head.bias.copy_(head.bias[1:2] - head.bias[0:1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net.finish(self.head(self.net.decoder_output(x))))


def export_onnx(net: nn.Module, path: str | os.PathLike, *, opset: int = 17) -> None:
    """Write ``net`` (in eval mode) as ONNX with input ``image`` and output ``particle_probability``,
    both (N, 1, H, W) with dynamic batch and spatial sizes (multiples of ``net.divisor``).

    Examples
    --------
    >>> from latticewatch.models.architectures import build_net
    >>> export_onnx(build_net("resnet18-unet"), "net.onnx")  # doctest: +SKIP
    """
    wrapper = ParticleProbability(net.eval()).eval()
    example = torch.zeros(1, 1, 4 * net.divisor, 4 * net.divisor)
    with warnings.catch_warnings():
        # the TorchScript exporter is deprecated but exact and dependency-free for this plain CNN
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            wrapper,
            example,
            str(path),
            input_names=["image"],
            output_names=["particle_probability"],
            dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"},
                          "particle_probability": {0: "batch", 2: "height", 3: "width"}},
            opset_version=opset,
            dynamo=False,
        )


def export_classifier_onnx(net: nn.Module, path: str | os.PathLike, *, channels: int, size_px: int,
                           opset: int = 17) -> None:
    """Write a region classifier (in eval mode) as ONNX: input ``crops`` (N, C, S, S) float32, output
    ``probabilities`` (N, n_classes), softmax included, dynamic batch (a frame's regions in one call).

    Examples
    --------
    >>> from latticewatch.models.architectures import build_classifier
    >>> export_classifier_onnx(build_classifier("crop-cnn", 3, 5), "cnn.onnx", channels=3, size_px=96)  # doctest: +SKIP
    """
    net = net.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # as in export_onnx
        torch.onnx.export(
            net,
            torch.zeros(2, channels, size_px, size_px),
            str(path),
            input_names=["crops"],
            output_names=["probabilities"],
            dynamic_axes={"crops": {0: "batch"}, "probabilities": {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )


def torch_probability(net: nn.Module, image: np.ndarray) -> np.ndarray:
    """Eager torch reference in float64: particle probability of a 2-D image (sides divisible).

    Double precision makes it the exact answer that any float32 backend is compared with; two
    float32 implementations (eager torch, ONNX Runtime) each sit within ~7e-5 of it on trained
    weights but can differ from each other by more, since they sum in different orders.
    """
    reference = copy.deepcopy(net).double().eval()
    with torch.no_grad():
        return reference(torch.from_numpy(np.asarray(image, np.float64))[None, None])[0, 1].numpy()
