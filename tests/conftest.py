"""Shared fixtures: a small randomly initialised U-Net exported to a real ONNX file; a small filesystem."""

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def randomised_net():
    """``build(arch, widths, seed=0)``: see `nets.randomised_net` (needs torch)."""
    pytest.importorskip("torch")
    from nets import randomised_net

    return randomised_net


@pytest.fixture(scope="session")
def random_unet(randomised_net):
    """A 4-8-16-32 U-Net with randomised batch-norm statistics."""
    return randomised_net("unet", (4, 8, 16, 32))


@pytest.fixture(scope="session")
def random_unet_onnx():
    """That U-Net as a committed ONNX file (`fixtures/make_random_unet.py`), so runtime tests need no torch."""
    return FIXTURES / "random_unet.onnx"


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
