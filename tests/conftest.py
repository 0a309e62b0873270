"""Shared fixtures: a small randomly initialised U-Net exported to a real ONNX file."""

import numpy as np
import pytest


@pytest.fixture(scope="session")
def random_unet():
    """A 4-8-16-32 U-Net with randomised batch-norm statistics (so BN is not the identity)."""
    torch = pytest.importorskip("torch")
    from latticewatch.models.unet import UNet

    torch.manual_seed(0)
    net = UNet()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return net.eval()


@pytest.fixture(scope="session")
def random_unet_onnx(random_unet, tmp_path_factory):
    from latticewatch.models.export import export_onnx

    path = tmp_path_factory.mktemp("onnx") / "unet.onnx"
    export_onnx(random_unet, path)
    return path


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
