"""Out of GPU memory: smaller batches, then tiles, then the CPU, with the same mask as a plain CPU run.

The accelerator is simulated by an injected fault: the real ONNX Runtime backend behind a wrapper that raises
`DeviceMemoryError` for inputs above a pixel budget, as a GPU with that much free memory would.
"""

import logging
import threading

import numpy as np
import pytest

from latticewatch.frame import Frame
from latticewatch.models.architectures import receptive_field
from latticewatch.models.backends import DeviceMemoryError, cpu_default, model_files, open_backend
from latticewatch.models.backends.fallback import FallbackBackend
from latticewatch.runtime.analyser import Analyser
from latticewatch.runtime.plugins import resolve_profile
from latticewatch.stages.preprocess import preprocess
from latticewatch.testing.synthetic.frames import generate_frame

DIRECTORY, MANIFEST = resolve_profile("nanoparticles")
SEG = MANIFEST.segmentation
GEOMETRY = {"divisor": SEG.divisor, "receptive_field_px": receptive_field(SEG.architecture, SEG.widths)}


class SmallGpu:
    """The real CPU backend, refusing (as a GPU out of memory would) any input above ``budget`` values."""

    name, device = "fake-gpu", "a GPU with little memory"

    def __init__(self, budget: int, role: str = "segmentation"):
        self.budget, self.calls = budget, []
        self._cpu = open_backend("onnxruntime", model_files(DIRECTORY, MANIFEST, role), threads=1)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        self.calls.append(batch.shape)
        if batch.size > self.budget:
            raise DeviceMemoryError(f"{self.name}: {batch.size} values do not fit in {self.budget}")
        return self._cpu.predict(batch)


@pytest.fixture(scope="module")
def cpu():
    return open_backend("onnxruntime", model_files(DIRECTORY, MANIFEST), threads=1)


def batch(n: int, side: int) -> np.ndarray:
    """``n`` synthetic frames with particles, preprocessed as the analyser does, as one (n, 1, side, side) batch."""
    rng = np.random.default_rng(n * side)
    images = [preprocess(generate_frame(rng, (side, side), 0.05, n_particles=3).image, 0.05,
                         normalisation=SEG.normalisation, model_pixel_size_nm=SEG.pixel_size_nm).image
              for _ in range(n)]
    return np.stack(images)[:, None]


def wrap(gpu: SmallGpu, **geometry) -> FallbackBackend:
    return FallbackBackend(gpu, model_files(DIRECTORY, MANIFEST, "classifier" if not geometry else "segmentation"),
                           threads=1, **geometry)


def test_a_batch_that_does_not_fit_runs_in_halves_on_the_same_device(cpu):
    images = batch(4, 256)
    fallback = wrap(SmallGpu(budget=2 * 256 * 256), **GEOMETRY)
    out = fallback.predict(images)
    np.testing.assert_allclose(out, cpu.predict(images), atol=1e-6)
    assert fallback.primary.calls == [(4, 1, 256, 256), (2, 1, 256, 256), (2, 1, 256, 256)]
    assert fallback.counts == {"batches": 1, "tiles": 0, "cpu": 0}
    assert fallback.take_notes() == ["backend_fallback: out of GPU memory on a GPU with little memory (fake-gpu) for "
                                     "a 4×1×256×256 batch; ran in smaller batches on the same device"]
    assert fallback.take_notes() == []


def test_each_thread_takes_the_notes_of_its_own_calls():
    # the segment thread and the finish pool's threads call one backend at once: a note is its frame's
    fallback = wrap(SmallGpu(budget=2 * 256 * 256), **GEOMETRY)
    fallback.predict(batch(4, 256))  # this thread's call falls back
    taken = {}

    def call_that_fits():
        fallback.predict(batch(1, 256))
        taken["other"] = fallback.take_notes()

    other = threading.Thread(target=call_that_fits)
    other.start()
    other.join()
    assert taken["other"] == []  # its call fitted; this thread's note is not its
    assert len(fallback.take_notes()) == 1


def test_an_image_that_does_not_fit_runs_in_overlapping_tiles_with_the_whole_image_result(cpu):
    image = batch(1, 1024)
    # tiles of 512² (256² core + margins) fit; the whole image does not
    fallback = wrap(SmallGpu(budget=300_000), **GEOMETRY)
    out = fallback.predict(image)
    expected = cpu.predict(image)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    assert np.array_equal(out > SEG.threshold, expected > SEG.threshold)
    assert fallback.counts == {"batches": 0, "tiles": 1, "cpu": 0} and len(fallback.primary.calls) == 1 + 16
    assert "ran in overlapping tiles on the same device" in fallback.take_notes()[0]


def test_when_nothing_fits_the_cpu_runs_it_and_the_mask_is_the_cpu_mask(cpu):
    images = batch(2, 1024)
    fallback = wrap(SmallGpu(budget=1000), **GEOMETRY)
    out = fallback.predict(images)
    expected = cpu.predict(images)
    np.testing.assert_allclose(out, expected, atol=1e-4)  # the CPU default may be OpenVINO: float32 rounding
    assert np.array_equal(out > SEG.threshold, expected > SEG.threshold)
    assert (out > SEG.threshold).any()  # never an empty mask in place of the answer
    assert fallback.counts == {"batches": 1, "tiles": 2, "cpu": 2}
    assert fallback.take_notes() == [
        "backend_fallback: out of GPU memory on a GPU with little memory (fake-gpu) for a 2×1×1024×1024 batch; ran in "
        "smaller batches on the same device, then in overlapping tiles on the same device, then on the CPU "
        f"({cpu_default()}-cpu)"]


def test_each_level_is_logged_loudly_once(caplog):
    fallback = wrap(SmallGpu(budget=1000), **GEOMETRY)
    images = batch(2, 832)  # just large enough to be tiled
    with caplog.at_level(logging.ERROR, logger="latticewatch.models.backends.fallback"):
        for _ in range(2):
            fallback.predict(images)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 3 and all(e.startswith("OUT OF GPU MEMORY on a GPU with little memory") for e in errors)
    assert "in smaller batches" in errors[0] and "in overlapping tiles" in errors[1] and "on the CPU" in errors[2]
    assert fallback.counts == {"batches": 2, "tiles": 4, "cpu": 4}
    assert len(fallback.take_notes()) == 2  # but every call that needed it says so


def test_the_classifier_splits_its_crops_then_uses_the_cpu_without_tiling():
    crops = np.random.default_rng(1).standard_normal((8, 3, 96, 96)).astype(np.float32)
    cpu = open_backend("onnxruntime", model_files(DIRECTORY, MANIFEST, "classifier"), threads=1)
    fallback = wrap(SmallGpu(budget=3 * 3 * 96 * 96, role="classifier"))
    np.testing.assert_allclose(fallback.predict(crops), cpu.predict(crops), atol=1e-6)
    assert fallback.counts == {"batches": 3, "tiles": 0, "cpu": 0}
    nothing_fits = wrap(SmallGpu(budget=100, role="classifier"))
    np.testing.assert_allclose(nothing_fits.predict(crops[:2]), cpu.predict(crops[:2]), atol=1e-6)
    assert nothing_fits.counts == {"batches": 1, "tiles": 0, "cpu": 2}


def test_the_analyser_puts_the_fallback_on_the_frame_and_gets_the_cpu_mask():
    image = generate_frame(np.random.default_rng(5), (768, 768), 0.05, n_particles=6).image
    frame = Frame("oom-frame", image, 0.05)
    plain = Analyser("nanoparticles", backend="onnxruntime", threads=1).analyse(frame)
    analyser = Analyser("nanoparticles", backend=wrap(SmallGpu(budget=1000), **GEOMETRY), threads=1)
    analysis = analyser.analyse(frame)
    assert np.array_equal(analysis.mask, plain.mask) and analysis.mask.any()
    assert [r.label for r in analysis.regions] == [r.label for r in plain.regions]
    (warning,) = [w for w in analysis.warnings if w.startswith("backend_fallback:")]
    assert "out of GPU memory on a GPU with little memory (fake-gpu) for a 1×1×768×768 batch" in warning
    assert analysis.model_ids["backend"] == "fake-gpu"
    again = analyser.analyse(Frame("next", image, 0.05))
    assert sum(w.startswith("backend_fallback:") for w in again.warnings) == 1  # each frame its own, not piled up
