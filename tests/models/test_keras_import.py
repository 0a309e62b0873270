"""Import of the published pyNanoFind weights, checked against a forward pass written in numpy."""

import numpy as np
import pytest

pytest.importorskip("torch")

from latticewatch.cli import main  # noqa: E402
from latticewatch.frame import Frame  # noqa: E402
from latticewatch.models.backends.onnxruntime import OnnxRuntimeBackend  # noqa: E402
from latticewatch.models.keras_import import KerasImportError, read_keras_weights  # noqa: E402
from latticewatch.runtime.analyser import Analyser  # noqa: E402
from shared_data import SHARED_DATA

WEIGHTS = SHARED_DATA / "pynanofind-unet-weights"
FILES = sorted(WEIGHTS.glob("*.h5"))
pytestmark = pytest.mark.skipif(not FILES, reason=f"published weights not found in {WEIGHTS}")


def conv_same(x, kernel, bias):
    """'same' 2-D convolution of (H, W, C) by a Keras (kh, kw, C, K) kernel."""
    kh, kw = kernel.shape[:2]
    p = np.pad(x, ((kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    out = np.zeros(x.shape[:2] + (kernel.shape[3],))
    for i in range(kh):
        for j in range(kw):
            out += p[i : i + x.shape[0], j : j + x.shape[1]] @ kernel[i, j]
    return out + bias


def batch_norm(x, w):
    return (x - w["moving_mean"]) / np.sqrt(w["moving_variance"] + 1e-4) * w["gamma"] + w["beta"]


def numpy_unet(image, layers):
    """The published network, layer by layer, straight from the h5 arrays (float64)."""
    conv = lambda n, x: conv_same(x, layers[f"conv2d_{n}"]["kernel"], layers[f"conv2d_{n}"]["bias"])  # noqa: E731
    bn = lambda n, x: batch_norm(x, layers[f"batch_normalization_{n}"])  # noqa: E731
    relu = lambda x: np.maximum(x, 0)  # noqa: E731
    pool = lambda x: x.reshape(x.shape[0] // 2, 2, x.shape[1] // 2, 2, -1).max(axis=(1, 3))  # noqa: E731
    up = lambda x: x.repeat(2, axis=0).repeat(2, axis=1)  # noqa: E731
    x, skips = image[..., None].astype(np.float64), []
    for n in range(1, 5):
        b = bn(n, conv(n, x))
        skips.append(relu(b))  # the skip carries the ReLU output …
        x = pool(b)  # … while pooling takes the batch-norm output
    x = relu(bn(6, conv(6, relu(bn(5, conv(5, x))))))
    for n, skip in zip((7, 9, 11, 13), reversed(skips)):
        x = np.concatenate([skip, up(x)], axis=-1)
        x = relu(bn(n + 1, conv(n + 1, relu(bn(n, conv(n, x))))))
    logits = conv_same(x, layers["final_layer"]["kernel"], layers["final_layer"]["bias"])
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True))[..., 1]


@pytest.mark.parametrize("h5", FILES, ids=lambda p: p.name)
def test_imported_profile_matches_numpy_forward_pass(tmp_path, h5, capsys):
    out = tmp_path / "profile"
    assert main(["models", "import-keras", str(h5), "--name", "pynanofind", "--out", str(out)]) == 0
    assert "written to" in capsys.readouterr().out
    rng = np.random.default_rng(0)
    image = rng.random((64, 48)).astype(np.float32)
    ours = OnnxRuntimeBackend(out / "unet.onnx").predict(image[None, None])[0, 0]
    reference = numpy_unet(image, read_keras_weights(h5))
    assert np.abs(ours - reference).max() <= 1e-4


def test_imported_profile_runs_in_the_pipeline(tmp_path):
    out = tmp_path / "profile"
    assert main(["models", "import-keras", str(FILES[0]), "--name", "pynanofind", "--out", str(out)]) == 0
    analyser = Analyser(out)
    assert analyser.manifest.segmentation.normalisation == "max" and analyser.classifier is None
    pixels = np.random.default_rng(1).poisson(100, (128, 128)).astype(np.uint16)
    analysis = analyser.analyse(Frame("f", pixels, None))
    assert analysis.mask.shape == (128, 128)
    assert all(r.label == "unclassified" for r in analysis.regions)


def test_not_a_weight_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_text("nope")
    with pytest.raises(KerasImportError, match="bad.h5: not a Keras HDF5 weight file"):
        read_keras_weights(bad)
