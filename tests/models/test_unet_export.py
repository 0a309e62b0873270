import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from latticewatch.models.backends.onnxruntime import OnnxRuntimeBackend  # noqa: E402
from latticewatch.models.export import torch_probability  # noqa: E402
from latticewatch.models.unet import UNet  # noqa: E402


def test_architecture_matches_the_paper():
    net = UNet((4, 8, 16, 32))
    assert [level.conv.out_channels for level in net.encoder] == [4, 8, 16, 32]
    assert all(level.conv.kernel_size == (3, 3) for level in net.encoder)  # one 3×3 conv per level
    assert [block.conv.out_channels for block in net.centre] == [32, 32]
    # decoder input = skip + upsampled: 32+32, 16+32, 8+16, 4+8 (as in the published weights)
    assert [d.first.conv.in_channels for d in net.decoder] == [64, 48, 24, 12]
    assert [d.second.conv.out_channels for d in net.decoder] == [32, 16, 8, 4]
    assert net.head.out_channels == 2
    out = net.eval()(torch.rand(2, 1, 64, 48))
    assert out.shape == (2, 2, 64, 48)
    torch.testing.assert_close(out.sum(1), torch.ones(2, 64, 48))


def test_widths_are_configurable():
    net = UNet((8, 16, 32)).eval()
    assert net.divisor == 8
    assert net(torch.rand(1, 1, 24, 40)).shape == (1, 2, 24, 40)


def test_exported_onnx_is_valid_and_matches_torch(random_unet, random_unet_onnx, rng):
    onnx.checker.check_model(onnx.load(str(random_unet_onnx)), full_check=True)
    backend = OnnxRuntimeBackend(random_unet_onnx, threads=2)
    for shape in [(64, 64), (96, 160), (256, 256)]:  # dynamic spatial size
        image = rng.random(shape).astype(np.float32)
        ours = backend.predict(image[None, None])[0, 0]
        reference = torch_probability(random_unet, image)
        assert np.abs(ours - reference).max() <= 1e-4


def test_onnx_batch_dimension(random_unet_onnx, rng):
    backend = OnnxRuntimeBackend(random_unet_onnx, threads=1)
    batch = rng.random((3, 1, 32, 32)).astype(np.float32)
    together = backend.predict(batch)
    single = np.concatenate([backend.predict(batch[i : i + 1]) for i in range(3)])
    np.testing.assert_allclose(together, single, atol=1e-6)
