"""The committed `fixtures/random_unet.onnx` (used by runtime tests without torch) is the net it claims to be."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from latticewatch.models.backends.onnxruntime import OnnxRuntimeBackend  # noqa: E402
from latticewatch.models.export import torch_probability  # noqa: E402


def test_committed_fixture_equals_a_fresh_export_of_the_randomised_unet(random_unet, random_unet_onnx, rng):
    image = rng.normal(size=(64, 96)).astype(np.float32)
    expected = torch_probability(random_unet, image)
    got = OnnxRuntimeBackend(random_unet_onnx, threads=1).predict(image[None, None])[0, 0]
    assert np.abs(got - expected).max() < 1e-4, "regenerate with: python tests/fixtures/make_random_unet.py"
