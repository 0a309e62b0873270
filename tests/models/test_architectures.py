"""Every registered architecture: shape and divisor rules, ONNX export equal to the float64 torch
reference, a receptive-field bound the tiler can rely on, and manifest validation."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from latticewatch.models import architectures  # noqa: E402
from latticewatch.models.architectures import (  # noqa: E402
    ARCHITECTURES,
    ArchitectureError,
    build_net,
    check,
    divisor,
    receptive_field,
)
from latticewatch.models.backends.onnxruntime import OnnxRuntimeBackend  # noqa: E402
from latticewatch.models.export import export_onnx, torch_probability  # noqa: E402

SMALL = {"unet": (4, 8, 16), "resnet18-unet": (4, 8, 8, 16), "fpn": (4, 8, 8, 16)}


@pytest.fixture(scope="module", params=ARCHITECTURES)
def exported(request, tmp_path_factory, randomised_net):
    net = randomised_net(request.param, SMALL[request.param])
    path = tmp_path_factory.mktemp("arch") / f"{request.param}.onnx"
    export_onnx(net, path)
    return request.param, net, OnnxRuntimeBackend(path, threads=1)


def test_onnx_equals_float64_torch_at_two_sizes(exported, rng):
    arch, net, backend = exported
    d = net.divisor
    for shape in [(2 * d, 2 * d), (3 * d, 5 * d)]:  # dynamic spatial axes, square and not
        image = rng.standard_normal(shape).astype(np.float32)
        ours = backend.predict(image[None, None])[0, 0]
        assert ours.shape == shape
        assert np.abs(ours - torch_probability(net, image)).max() <= 1e-4, arch


def test_logits_forward_and_divisor(exported):
    arch, net, _ = exported
    assert net.divisor == divisor(arch, SMALL[arch])
    x = torch.rand(2, 1, 2 * net.divisor, 3 * net.divisor)
    with torch.no_grad():
        logits, probs = net.logits(x), net(x)
    assert logits.shape == (2, 2, 2 * net.divisor, 3 * net.divisor)
    torch.testing.assert_close(probs, torch.softmax(logits, dim=1))
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 2 * net.divisor, 3 * net.divisor))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_receptive_field_bounds_the_real_one(arch, randomised_net):
    """Gradient of one central output pixel w.r.t. the input: non-zero only inside the bound."""
    net = randomised_net(arch, SMALL[arch])
    rf = receptive_field(arch, SMALL[arch])
    side = (rf // net.divisor + 3) * net.divisor
    x = torch.rand(1, 1, side, side, dtype=torch.float64, requires_grad=True)
    net.double().logits(x)[0, 1, side // 2, side // 2].backward()
    rows, cols = np.nonzero(x.grad[0, 0].numpy())
    extent = max(rows.max() - rows.min(), cols.max() - cols.min()) + 1
    assert extent <= rf, f"{arch}: output depends on {extent} px, bound says {rf}"


def test_fpn_tiled_equals_whole_frame(tmp_path, rng, randomised_net):
    """The tiler relies on divisor and receptive field; bilinear upsampling must not break it."""
    from latticewatch.stages.segment import segment

    net = randomised_net("fpn", SMALL["fpn"])
    export_onnx(net, tmp_path / "fpn.onnx")
    backend = OnnxRuntimeBackend(tmp_path / "fpn.onnx", threads=1)
    image = rng.standard_normal((960, 200)).astype(np.float32)
    geometry = {"divisor": divisor("fpn", SMALL["fpn"]), "receptive_field_px": receptive_field("fpn", SMALL["fpn"])}
    whole = segment(image, backend, max_pixels=10**8, **geometry)
    tiled = segment(image, backend, max_pixels=900 * 200, **geometry)  # forces tiles along the rows
    np.testing.assert_allclose(tiled, whole, atol=1e-5)


def test_unknown_architecture_and_bad_widths_are_refused():
    with pytest.raises(ArchitectureError, match="unknown architecture 'vit'"):
        build_net("vit")
    with pytest.raises(ArchitectureError, match="needs 4 widths"):
        check("resnet18-unet", (8, 16, 32))
    assert architectures.DEFAULT_WIDTHS.keys() == set(ARCHITECTURES)


def test_manifest_records_the_architecture():
    from pydantic import ValidationError

    from latticewatch.models.manifest import SegmentationModel

    seg = SegmentationModel(onnx="fpn.onnx", architecture="fpn", widths=(8, 16, 32, 64), pixel_size_nm=None)
    assert seg.divisor == 32
    assert SegmentationModel(onnx="u.onnx", pixel_size_nm=0.05).architecture == "unet"  # old manifests still load
    with pytest.raises(ValidationError, match="needs 4 widths"):
        SegmentationModel(onnx="r.onnx", architecture="resnet18-unet", widths=(8, 16), pixel_size_nm=None)
