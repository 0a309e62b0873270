"""Shared fixtures: a small randomly initialised U-Net exported to a real ONNX file; a small filesystem."""

import os
import subprocess

import numpy as np
import pytest


@pytest.fixture(scope="session")
def randomised_net():
    """``build(arch, widths, seed=0)``: an eval-mode segmentation net whose batch-norm layers are not
    the identity (random statistics), so export and parity tests exercise them."""
    torch = pytest.importorskip("torch")
    from latticewatch.models.architectures import build_net

    def build(arch: str, widths, seed: int = 0):
        torch.manual_seed(seed)
        net = build_net(arch, widths)
        with torch.no_grad():
            for module in net.modules():
                if isinstance(module, torch.nn.BatchNorm2d):
                    module.running_mean.uniform_(-0.2, 0.2)
                    module.running_var.uniform_(0.5, 2.0)
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.uniform_(-0.2, 0.2)
        return net.eval()

    return build


@pytest.fixture(scope="session")
def random_unet(randomised_net):
    """A 4-8-16-32 U-Net with randomised batch-norm statistics."""
    return randomised_net("unet", (4, 8, 16, 32))


@pytest.fixture(scope="session")
def random_unet_onnx(random_unet, tmp_path_factory):
    from latticewatch.models.export import export_onnx

    path = tmp_path_factory.mktemp("onnx") / "unet.onnx"
    export_onnx(random_unet, path)
    return path


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture
def mount_tmpfs(tmp_path):
    """``mount_tmpfs("1m")``: a size-limited tmpfs at a fresh folder, unmounted afterwards.

    Mounting needs root (or CAP_SYS_ADMIN); elsewhere the test skips and says so.
    """
    mounted = []

    def mount(size: str):
        mountpoint = tmp_path / f"fs{len(mounted)}"
        mountpoint.mkdir()
        if os.geteuid() != 0:
            pytest.skip("mounting a size-limited tmpfs needs root; run as root (e.g. in the CI container)")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(mountpoint)],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (no CAP_SYS_ADMIN?): {done.stderr.strip()}")
        mounted.append(mountpoint)
        return mountpoint

    yield mount
    for mountpoint in mounted:
        if subprocess.run(["umount", str(mountpoint)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, check=False)
