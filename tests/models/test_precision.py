"""The fp16 copies of the shipped networks against their float32 originals, on ONNX Runtime (CPU).

Measured on this machine (``tests/models/test_precision.py``; the same numbers print with ``-s``):

| profile, frames | max abs Δp | mask pixels equal | pooled Dice | worst frame Dice | CNN labels equal |
|---|---|---|---|---|---|
| nanoparticles, 15 real tiles | 2.5e-3 | 99.997 % | 0.99994 | 0.99958 | 37/37 crops |
| nanoparticles, 8 simulated 512² frames | 3.4e-3 | 99.994 % | 0.99987 | 0.99949 | 40/40 crops |
| graphene, 13 real frames | 1.7e-3 | 99.999 % | 0.99994 | 0.99961 | — |

`FP16_TOLERANCE` (max Δp ≤ 0.02, ≥ 99.9 % pixels equal, Dice ≥ 0.999) keeps a margin over these.
"""

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from latticewatch.errors import ModelError
from latticewatch.frame import Frame
from latticewatch.io.readers import read_frames
from latticewatch.models.architectures import receptive_field
from latticewatch.models.backends.onnxruntime import OnnxRuntimeBackend
from latticewatch.models.precision import FP16_TOLERANCE, agreement, to_fp16, write_fp16
from latticewatch.runtime.analyser import Analyser
from latticewatch.stages.segment import segment
from latticewatch.testing.synthetic.frames import generate_frame
from shared_data import requires, shared_data

PLUGINS = Path(__file__).resolve().parents[2] / "plugins"
SHIPPED = [PLUGINS / "latticewatch_nanoparticles" / "unet.onnx", PLUGINS / "latticewatch_nanoparticles" / "cnn.onnx",
           PLUGINS / "latticewatch_graphene" / "fpn.onnx"]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_fp16_copy_computes_in_half_precision_behind_float32_io(path, tmp_path):
    half = onnx.load(str(write_fp16(path, tmp_path / "half.onnx")))
    onnx.checker.check_model(half, full_check=True)
    io_types = [v.type.tensor_type.elem_type for v in (*half.graph.input, *half.graph.output)]
    assert io_types == [TensorProto.FLOAT, TensorProto.FLOAT]
    assert [n.op_type for n in (half.graph.node[0], half.graph.node[-1])] == ["Cast", "Cast"]
    weights = [t for t in half.graph.initializer if t.dims and np.prod(t.dims) > 4]
    assert weights and all(t.data_type == TensorProto.FLOAT16 for t in weights)
    inferred = onnx.shape_inference.infer_shapes(half, strict_mode=True)
    # every tensor between the two casts is half precision, except the float32-only Resize scales
    floats = {v.name for v in inferred.graph.value_info if v.type.tensor_type.elem_type == TensorProto.FLOAT}
    resize_inputs = {name for n in half.graph.node if n.op_type == "Resize" for name in n.input[1:]}
    cast_inputs = {n.input[0] for n in half.graph.node if n.op_type == "Cast"}
    assert floats <= resize_inputs | cast_inputs
    # the float32 file is untouched: same bytes as the profile ships
    assert onnx.load(str(path)).graph.initializer[0].data_type == TensorProto.FLOAT


def test_weights_out_of_float16_range_are_refused():
    model = onnx.load(str(SHIPPED[0]))
    first = model.graph.initializer[0]
    big = numpy_helper.to_array(first).copy()
    big.flat[0] = 1e6
    first.CopyFrom(numpy_helper.from_array(big, first.name))
    with pytest.raises(ModelError, match=f"{first.name}.*does not fit in float16"):
        to_fp16(model)


def test_unreadable_onnx_names_the_file(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(ModelError, match="bad.onnx: not a readable ONNX file"):
        write_fp16(bad, tmp_path / "out.onnx")


class _RecordingBackend:
    """The profile's own CNN backend, keeping each batch of crops it was given (to replay them in fp16)."""

    def __init__(self, backend):
        self.backend, self.name, self.crops = backend, backend.name, []

    def predict(self, batch):
        self.crops.append(np.array(batch))
        return self.backend.predict(batch)


def _parity(profile: str, frames: list[Frame], tmp_path: Path):
    """fp32 vs fp16 probabilities of the profile's networks on ``frames``, prepared as the analyser does."""
    analyser = Analyser(profile, threads=2)
    seg = analyser.manifest.segmentation
    fp32 = OnnxRuntimeBackend(analyser.directory / seg.onnx, threads=2)
    fp16 = OnnxRuntimeBackend(write_fp16(analyser.directory / seg.onnx, tmp_path / "seg.fp16.onnx"), threads=2)
    recorder = None
    if analyser.manifest.classifier is not None and analyser.manifest.classifier.kind == "cnn":
        recorder = analyser.classifier.backend = _RecordingBackend(analyser.classifier.backend)
    options = {"divisor": seg.divisor, "receptive_field_px": receptive_field(seg.architecture, seg.widths)}
    references, candidates, worst = [], [], 1.0
    for frame in frames:
        prepared = analyser.prepare(frame)
        analyser.finish(prepared, analyser.segment_batch([prepared])[0])  # the regions' crops, for the CNN
        reference = segment(prepared.pre.image, fp32, **options)
        candidate = segment(prepared.pre.image, fp16, **options)
        worst = min(worst, agreement(reference, candidate, seg.threshold).dice)
        references.append(reference.ravel())
        candidates.append(candidate.ravel())
    pooled = agreement(np.concatenate(references), np.concatenate(candidates), seg.threshold)
    print(f"{profile}, {len(frames)} frames: {pooled}; worst frame Dice {worst:.5f}")
    assert pooled.within(FP16_TOLERANCE), pooled
    assert worst >= FP16_TOLERANCE.dice
    if recorder is not None:
        crops = np.concatenate(recorder.crops)
        onnx_path = analyser.directory / analyser.manifest.classifier.onnx
        p32 = OnnxRuntimeBackend(onnx_path, threads=2).predict(crops)
        p16 = OnnxRuntimeBackend(write_fp16(onnx_path, tmp_path / "cnn.fp16.onnx"), threads=2).predict(crops)
        print(f"  CNN on {len(crops)} crops: max |Δp| {np.abs(p32 - p16).max():.2e}")
        assert len(crops) >= 10
        assert np.abs(p32 - p16).max() <= FP16_TOLERANCE.max_abs_diff
        assert np.array_equal(p32.argmax(axis=1), p16.argmax(axis=1))


@requires("real-nanoparticles", "images")
def test_fp16_parity_on_the_real_nanoparticle_tiles(tmp_path):
    images = shared_data("real-nanoparticles", "images") / "images"
    frames = [f for path in sorted(images.glob("*.mrc")) for f in read_frames(path)]
    assert len(frames) == 15
    _parity("nanoparticles", frames, tmp_path)


def test_fp16_parity_on_simulated_frames(tmp_path):
    rng = np.random.default_rng(7)
    frames = [Frame(f"sim:{i}", generate_frame(rng, shape=(512, 512), pixel_size_nm=0.05).image, 0.05)
              for i in range(8)]
    _parity("nanoparticles", frames, tmp_path)


@requires("graphene-contamination", "images")
def test_fp16_parity_on_real_graphene_frames(tmp_path):
    images = sorted((shared_data("graphene-contamination", "images") / "images").glob("*.png"))
    frames = [f for path in images[:: max(1, len(images) // 12)] for f in read_frames(path)]
    _parity("graphene", frames, tmp_path)
