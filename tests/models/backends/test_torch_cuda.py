"""The torch backend (kind ``cuda``): the network rebuilt from the shipped safetensors must compute what the
shipped ONNX computes.

Here (no GPU) it runs on the CPU in float32 against ONNX Runtime: on the 15 real tiles the probabilities
differ by at most ~3e-6 and not one mask pixel flips. The GPU tests (marked ``gpu``, skipped without a
CUDA device; ``scripts/gpu-check`` runs them) hold fp16 to the fp32 result and check the CUDA graphs,
the reused pinned buffers and the out-of-memory error.
"""

import re

import numpy as np
import pytest

from latticewatch.errors import ModelError
from latticewatch.io.readers import read_frames
from latticewatch.models.backends import DeviceMemoryError, ModelFiles, model_files, open_backend, unavailable
from latticewatch.runtime.bench import synthetic_frame
from latticewatch.runtime.plugins import resolve_profile
from latticewatch.stages.preprocess import pad_to_multiple, preprocess
from shared_data import SHARED_DATA, requires

torch = pytest.importorskip("torch")
from latticewatch.models.backends import torch_cuda  # noqa: E402  (needs torch to be useful)

CUDA = torch.cuda.is_available()
REAL = SHARED_DATA / "real-nanoparticles" / "images"
#: float32 torch (batch norms folded) vs ONNX Runtime: measured ≤ 3.2e-6 on the real tiles
FP32_ATOL = 2e-5


def profile_files(name: str, role: str = "segmentation") -> ModelFiles:
    return model_files(*resolve_profile(name), role)


def model_images(frames, seg) -> np.ndarray:
    """The frames preprocessed as the analyser does, padded to the net's divisor, as one batch."""
    images = []
    for f in frames:
        pre = preprocess(f.pixels, f.pixel_size_nm, normalisation=seg.normalisation,
                         model_pixel_size_nm=seg.pixel_size_nm)
        images.append(pad_to_multiple(pre.image, seg.divisor)[0])
    return np.stack(images)[:, None]


def real_tiles() -> list:
    return [frame for path in sorted(REAL.glob("*.mrc")) for frame in read_frames(path)]


@pytest.fixture(scope="module")
def nanoparticles():
    directory, manifest = resolve_profile("nanoparticles")
    files = model_files(directory, manifest)
    return manifest.segmentation, files, open_backend("onnxruntime", files, threads=1)


@pytest.fixture(scope="module")
def on_cpu(nanoparticles):
    return torch_cuda.TorchBackend(nanoparticles[1], device="cpu")


@requires("real-nanoparticles", "images")
def test_cpu_equals_the_shipped_onnx_on_the_real_tiles(nanoparticles, on_cpu):
    seg, _, ort = nanoparticles
    batch = model_images(real_tiles(), seg)
    assert len(batch) == 15
    theirs, ours = ort.predict(batch), on_cpu.predict(batch)
    assert ours.shape == theirs.shape and ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=FP32_ATOL)
    np.testing.assert_array_equal(ours >= seg.threshold, theirs >= seg.threshold)


def test_cpu_equals_the_shipped_onnx_on_synthetic_frames(nanoparticles, on_cpu):
    seg, _, ort = nanoparticles
    batch = model_images([synthetic_frame(1024, seed) for seed in (0, 1)], seg)
    ours, theirs = on_cpu.predict(batch), ort.predict(batch)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=FP32_ATOL)
    assert not np.array_equal(ours[0], ours[1])
    np.testing.assert_array_equal(on_cpu.predict_mask(batch, seg.threshold), (theirs >= seg.threshold).view(np.uint8))


def test_cpu_equals_the_graphene_fpn_onnx():
    files = profile_files("graphene")
    batch = np.random.default_rng(1).normal(size=(2, 1, 256, 320)).astype(np.float32)
    ours = torch_cuda.TorchBackend(files, device="cpu").predict(batch)
    np.testing.assert_allclose(ours, open_backend("onnxruntime", files, threads=1).predict(batch), rtol=0,
                               atol=FP32_ATOL)


def test_cpu_equals_the_crop_classifier_onnx():
    files = profile_files("nanoparticles", "classifier")
    crops = np.random.default_rng(2).normal(size=(7, 3, 96, 96)).astype(np.float32)
    ours = torch_cuda.TorchBackend(files, device="cpu").predict(crops)
    assert ours.shape == (7, 5)
    np.testing.assert_allclose(ours, open_backend("onnxruntime", files, threads=1).predict(crops), rtol=0,
                               atol=FP32_ATOL)


def test_prepare_on_device_is_the_preprocess_stage(nanoparticles, on_cpu):
    seg = nanoparticles[0]
    f = synthetic_frame(512)
    kw = {"normalisation": seg.normalisation, "model_pixel_size_nm": seg.pixel_size_nm}
    ours = on_cpu.prepare_on_device(f.pixels, f.pixel_size_nm, **kw)
    theirs = preprocess(f.pixels, f.pixel_size_nm, **kw)
    np.testing.assert_array_equal(ours.image, theirs.image)
    assert (ours.scale, ours.pixel_size_nm) == (theirs.scale, theirs.pixel_size_nm)


def test_a_profile_without_weights_or_with_the_wrong_ones_is_refused(tmp_path):
    files = profile_files("nanoparticles")
    with pytest.raises(ModelError, match="no safetensors weights"):
        torch_cuda.TorchBackend(ModelFiles(files.onnx, None, "unet", files.widths), device="cpu")
    wrong = ModelFiles(files.onnx, files.weights, "fpn", (8, 16, 32, 64))
    with pytest.raises(ModelError, match=r"unet\.safetensors: not the weights of a fpn"):
        torch_cuda.TorchBackend(wrong, device="cpu")


def test_a_batch_that_is_not_four_dimensional_is_refused(on_cpu):
    with pytest.raises(ModelError, match=r"expected a non-empty \(N, C, H, W\) batch, got shape \(64, 64\)"):
        on_cpu.predict(np.zeros((64, 64), np.float32))


@pytest.mark.skipif(CUDA, reason="this machine has a CUDA GPU")
def test_without_a_gpu_the_kind_says_why_and_does_not_open():
    reason = torch_cuda.unavailable()
    assert reason is not None and ("without CUDA" in reason or "sees no CUDA device" in reason)
    assert unavailable("cuda") == reason
    with pytest.raises(ModelError, match=re.escape(reason)):
        open_backend("cuda", profile_files("nanoparticles"))
    with pytest.raises(ModelError, match=f"backend cuda: {re.escape(reason)}"):
        torch_cuda.open(profile_files("nanoparticles"))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
class TestOnTheGpu:
    @pytest.fixture(scope="class")
    def fp16(self):
        return open_backend("cuda", profile_files("nanoparticles"))

    @pytest.fixture(scope="class")
    def fp32(self):
        return open_backend("cuda", profile_files("nanoparticles"), fp16=False)

    @pytest.fixture(scope="class")
    def camera_frames(self):
        return [synthetic_frame(4096, seed) for seed in (0, 1)]

    @pytest.fixture(scope="class")
    def frames(self, nanoparticles, camera_frames):
        """Two synthetic 4096² frames (2048² at the model's sampling), plus the real tiles when present."""
        seg = nanoparticles[0]
        batches = [model_images([f], seg) for f in camera_frames]
        if REAL.is_dir():
            batches.append(model_images(real_tiles(), seg))
        return batches

    def test_names_its_device(self, fp16):
        assert fp16.name == "torch-cuda-fp16" and fp16.device == torch.cuda.get_device_name()

    def test_fp32_equals_onnx_and_fp16_masks_agree(self, nanoparticles, fp16, fp32, frames):
        seg, _, ort = nanoparticles
        for batch in frames:
            exact = ort.predict(batch)
            single, half = fp32.predict(batch), fp16.predict(batch)
            # fp32 convolutions run as TF32 on the GPU (torch's default): ~1e-3
            assert np.abs(single - exact).max() < 5e-3
            assert np.abs(half - exact).max() < 2e-2
            flipped = np.count_nonzero((half >= seg.threshold) != (exact >= seg.threshold))
            assert flipped <= 1e-3 * exact.size, f"{flipped} of {exact.size} mask pixels differ from fp32"

    def test_the_mask_path_thresholds_on_the_gpu(self, nanoparticles, fp16, frames):
        seg = nanoparticles[0]
        mask = fp16.predict_mask(frames[0], seg.threshold)
        assert mask.dtype == np.uint8 and mask.shape == frames[0].shape
        np.testing.assert_array_equal(mask, (fp16.predict(frames[0]) >= seg.threshold).view(np.uint8))

    def test_one_graph_and_the_same_pinned_buffers_serve_every_call_of_a_shape(self, fp16, frames):
        batch = frames[0]
        first = fp16.predict(batch)
        shape = (1, *batch.shape[1:])
        entry = fp16._captured[shape]
        graph, pointers = entry.graph, [b.data_ptr() for b in entry.pinned_in]
        np.testing.assert_array_equal(fp16.predict(batch.copy()), first)
        assert fp16._captured[shape] is entry and entry.graph is graph
        assert [b.data_ptr() for b in entry.pinned_in] == pointers

    def test_a_batch_of_frames_pipelines_in_chunks_with_the_same_result(self, fp16, frames):
        # three 2048² frames: three chunks through two staging slots
        batch = np.concatenate([frames[0], frames[1], frames[0][:, :, ::-1].copy()])
        together = fp16.predict(batch)
        for i in range(3):
            np.testing.assert_array_equal(together[i], fp16.predict(batch[i : i + 1])[0])

    def test_the_classifier_on_the_gpu(self):
        files = profile_files("nanoparticles", "classifier")
        crops = np.random.default_rng(2).normal(size=(5, 3, 96, 96)).astype(np.float32)
        ours = open_backend("cuda", files).predict(crops)
        np.testing.assert_allclose(ours, open_backend("onnxruntime", files, threads=1).predict(crops), atol=2e-2)

    def test_preprocessing_on_the_gpu(self, nanoparticles, fp16, camera_frames):
        seg = nanoparticles[0]
        f = camera_frames[0]
        kw = {"normalisation": seg.normalisation, "model_pixel_size_nm": seg.pixel_size_nm}
        for _ in range(2):  # the second call reuses the pinned upload buffer
            ours = fp16.prepare_on_device(f.pixels, f.pixel_size_nm, **kw)
        theirs = preprocess(f.pixels, f.pixel_size_nm, **kw)
        np.testing.assert_allclose(ours.image, theirs.image, rtol=0, atol=1e-5 * np.abs(theirs.image).max())

    def test_out_of_memory_is_a_device_memory_error_and_the_backend_survives(self, fp16, frames):
        # one 2¹⁸ × 2¹⁸ float32 image is 256 GiB: its device input buffer cannot be allocated (a view of
        # one zero here, so the host needs no memory for it)
        absurd = np.broadcast_to(np.float32(0), (1, 1, 1 << 18, 1 << 18))
        before = torch.cuda.memory_allocated()
        with pytest.raises(DeviceMemoryError, match="ran out of memory for a batch of shape"):
            fp16.predict(absurd)
        assert torch.cuda.memory_allocated() <= before + (64 << 20)
        assert fp16.predict(frames[0]).shape == frames[0].shape


def test_the_analyser_on_the_torch_backend_finds_what_it_finds_on_onnx_runtime(on_cpu):
    from latticewatch.runtime.analyser import Analyser

    frame = synthetic_frame(1024, 3)
    ours = Analyser("nanoparticles", backend=on_cpu, threads=1).analyse(frame)
    theirs = Analyser("nanoparticles", backend="onnxruntime", threads=1).analyse(frame)
    assert ours.model_ids["backend"] == "torch-cpu-fp32"
    np.testing.assert_array_equal(ours.mask, theirs.mask)
    assert [r.label for r in ours.regions] == [r.label for r in theirs.regions] and ours.regions
