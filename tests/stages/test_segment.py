import numpy as np
import pytest

from latticewatch.models.architectures import divisor, receptive_field
from latticewatch.stages.segment import segment

#: the paper's U-Net, as the random test network is built
UNET = {"divisor": divisor("unet", (4, 8, 16, 32)), "receptive_field_px": receptive_field("unet", (4, 8, 16, 32))}


def test_segment_pads_and_crops(random_unet_onnx, rng):
    from latticewatch.models.backends.onnxruntime import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend(random_unet_onnx, threads=2)
    image = rng.random((100, 75)).astype(np.float32)
    prob = segment(image, backend, **UNET)
    assert prob.shape == (100, 75) and prob.dtype == np.float32
    assert ((prob >= 0) & (prob <= 1)).all()


@pytest.mark.parametrize("shape", [(600, 520), (512, 700)])
def test_tiled_equals_whole_frame(random_unet_onnx, rng, shape):
    from latticewatch.models.backends.onnxruntime import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend(random_unet_onnx, threads=2)
    image = rng.random(shape).astype(np.float32)
    whole = segment(image, backend, max_pixels=10**8, **UNET)
    tiled = segment(image, backend, max_pixels=320 * 320, **UNET)  # forces several tiles
    np.testing.assert_allclose(tiled, whole, atol=1e-5)
