"""The OpenVINO backend must give ONNX Runtime's answer: same probabilities (within float32 rounding), same masks,
same classes, on real micrographs and a synthetic frame, for both shipped profiles.

Measured on the 15 real tiles and a synthetic 1024² frame: probabilities differ by at most 3.4e-6 (U-Net) and
1.7e-6 (FPN), the CNN's class probabilities (48 regions) by 3e-7; not one mask pixel differs. That needs float32
inference: on CPUs with bfloat16, OpenVINO's default precision would be bf16.
"""

import resource
import time

import numpy as np
import pytest

from latticewatch.frame import Frame
from latticewatch.io.readers import read_frames
from latticewatch.models.backends import model_files, open_backend
from latticewatch.runtime.analyser import Analyser
from latticewatch.runtime.plugins import resolve_profile
from latticewatch.testing.synthetic.frames import generate_frame
from shared_data import SHARED_DATA, requires

pytest.importorskip("openvino")

REAL = SHARED_DATA / "real-nanoparticles" / "images"
#: largest |p_openvino - p_onnxruntime|; measured ≤ 3.4e-6
PROBABILITY_ATOL = 1e-4
#: share of thresholded mask pixels that must agree; measured 1.0
MASK_AGREEMENT = 0.999


def frames() -> list[Frame]:
    synthetic = generate_frame(np.random.default_rng(3), shape=(1024, 1024), pixel_size_nm=0.05, n_particles=8)
    found = [Frame("synthetic", synthetic.image, 0.05)]
    for path in sorted(REAL.glob("*.mrc")):
        found += list(read_frames(path))
    return found


@requires("real-nanoparticles", "images")
@pytest.mark.parametrize("profile", ["nanoparticles", "graphene"])
def test_openvino_segments_like_onnxruntime_on_real_and_synthetic_frames(profile):
    ort, ov = (Analyser(profile, backend=kind, threads=2) for kind in ("onnxruntime", "openvino"))
    assert ov.model_ids["backend"] == "openvino-cpu" and ort.model_ids["backend"] == "onnxruntime-cpu"
    threshold = ort.manifest.segmentation.threshold
    tested = frames()
    assert len(tested) == 16
    for frame in tested:
        p_ort, p_ov = (a.segment_batch([a.prepare(frame)])[0] for a in (ort, ov))
        assert np.abs(p_ov - p_ort).max() <= PROBABILITY_ATOL, frame.frame_id
        assert np.mean((p_ov > threshold) == (p_ort > threshold)) >= MASK_AGREEMENT, frame.frame_id


@requires("real-nanoparticles", "images")
def test_openvino_classifies_the_regions_like_onnxruntime():
    ort, ov = (Analyser("nanoparticles", backend=kind, threads=2) for kind in ("onnxruntime", "openvino"))
    assert ov.classifier.backend.name == "openvino-cpu"
    n_regions = 0
    for frame in frames():
        a, b = ort.analyse(frame), ov.analyse(frame)
        assert np.mean(a.mask == b.mask) >= MASK_AGREEMENT
        assert [r.label for r in a.regions] == [r.label for r in b.regions], frame.frame_id
        for ra, rb in zip(a.regions, b.regions):
            assert max(abs(ra.probabilities[c] - rb.probabilities[c]) for c in ra.probabilities) <= PROBABILITY_ATOL
        n_regions += len(a.regions)
    assert n_regions >= 20  # the comparison saw particles, not empty frames


def test_one_compiled_model_takes_any_batch_and_frame_shape():
    files = model_files(*resolve_profile("nanoparticles"))
    ov, ort = open_backend("openvino", files, threads=1), open_backend("onnxruntime", files, threads=1)
    rng = np.random.default_rng(0)
    batch = rng.standard_normal((3, 1, 96, 160)).astype(np.float32)
    together = ov.predict(batch)
    np.testing.assert_allclose(together, ort.predict(batch), atol=PROBABILITY_ATOL)
    for i in range(3):  # a batch gives each item what it gets alone
        np.testing.assert_allclose(ov.predict(batch[i : i + 1]), together[i : i + 1], atol=1e-6)
    square = rng.standard_normal((1, 1, 256, 256)).astype(np.float32)
    out = ov.predict(square)
    assert out.shape == (1, 1, 256, 256)
    assert together.shape == (3, 1, 96, 160)  # the earlier result is a copy, not the request's reused buffer
    np.testing.assert_allclose(out, ort.predict(square), atol=PROBABILITY_ATOL)


def test_a_shape_that_comes_again_runs_on_its_own_static_model_with_the_same_answer():
    from latticewatch.models.backends.openvino import STATIC_SHAPES_KEPT

    ov = open_backend("openvino", model_files(*resolve_profile("nanoparticles")), threads=1)
    rng = np.random.default_rng(1)
    frames = [rng.standard_normal((1, 1, 64 + 16 * k, 128)).astype(np.float32) for k in range(STATIC_SHAPES_KEPT + 1)]
    first = ov.predict(frames[0])  # once: the dynamic model
    assert ov.static_shapes() == []
    again = ov.predict(frames[0])  # again: compiled for this shape
    assert ov.static_shapes() == [frames[0].shape]
    np.testing.assert_array_equal(again, first)  # measured: bit for bit
    for frame in frames[1:]:
        ov.predict(frame), ov.predict(frame)
    # the least recently used shape was dropped, and runs on the dynamic model again, with the same answer
    assert ov.static_shapes() == [f.shape for f in frames[1:]]
    np.testing.assert_array_equal(ov.predict(frames[0]), first)
    # the classifier's batches (one per frame, as many crops as regions) keep the dynamic model
    cnn = open_backend("openvino", model_files(*resolve_profile("nanoparticles"), role="classifier"), threads=1)
    crops = rng.standard_normal((3, 3, 96, 96)).astype(np.float32)
    cnn.predict(crops), cnn.predict(crops)
    assert cnn.static_shapes() == []


def test_the_device_names_the_threads_and_idle_workers_do_not_spin():
    backend = open_backend("openvino", model_files(*resolve_profile("nanoparticles")), threads=2)
    assert backend.device.startswith("CPU") and backend.device.endswith("(2 threads)")
    backend.predict(np.zeros((1, 1, 512, 512), np.float32))
    time.sleep(0.2)  # past any short spin-wait after the last run
    before = resource.getrusage(resource.RUSAGE_SELF)
    time.sleep(1.0)
    after = resource.getrusage(resource.RUSAGE_SELF)
    busy = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert busy < 0.1, f"{busy:.2f} s of CPU in 1 s idle: the inference threads spin while waiting"
