"""The whole pipeline on fresh synthetic frames, with the shipped nanoparticle profile."""

import numpy as np
import pytest

from latticewatch.errors import FrameError
from latticewatch.frame import CLASSES, Frame
from latticewatch.runtime.analyser import Analyser
from latticewatch.testing.synthetic.frames import generate_frame


@pytest.fixture(scope="module")
def analyser():
    return Analyser("nanoparticles", threads=2)


@pytest.fixture(scope="module")
def sample():
    return generate_frame(np.random.default_rng(7), shape=(1024, 1024), pixel_size_nm=0.025, n_particles=6,
                          dose_range=(100.0, 150.0))


def dice(a, b):
    a, b = a.astype(bool), b.astype(bool)
    return 2 * (a & b).sum() / (a.sum() + b.sum())


@pytest.fixture(scope="module")
def multislice():
    """A fresh abTEM image (Au/Pd at 0.04 nm/px, 384²), like the shipped profile's simulated training data."""
    from latticewatch.training.simulate.config import preset_config
    from latticewatch.training.simulate.image import simulate_image
    from latticewatch.training.simulate.multislice import configure_abtem

    configure_abtem()
    config = preset_config("default", size=384, pixel_size_nm=(0.04, 0.04), materials={"Au": 1.0, "Pd": 1.0},
                           particles_per_image=(3, 4), particle_size_nm=(3, 6), max_sim_sampling_angstrom=0.25)
    return simulate_image(config, 0, 0)


def test_finds_the_particles_of_a_fresh_multislice_frame(analyser, multislice):
    px, shape = multislice.record["pixel_size_nm"], multislice.counts.shape
    analysis = analyser.analyse(Frame("simulated#0", multislice.counts, px), keep_probability=True)
    assert analysis.mask.shape == shape and analysis.mask.dtype == np.uint8
    # one frame; the manifest's 20-frame abTEM hold-out is 0.913 pooled
    assert dice(analysis.mask, multislice.instances > 0) > 0.8
    assert analysis.probability.shape == shape and analysis.probability.dtype == np.float32
    assert set(analysis.timings_s) == {"preprocess", "segment", "isolate", "domain", "features", "classify", "assemble"}
    assert analysis.model_ids["profile"].startswith("nanoparticles@")
    assert len(analysis.regions) >= 3
    for region in analysis.regions:
        assert region.label in CLASSES
        assert sum(region.probabilities.values()) == pytest.approx(1.0)
        r0, c0, r1, c1 = region.bbox
        assert 0 <= r0 < r1 <= shape[0] and 0 <= c0 < c1 <= shape[1]
        assert r0 <= region.centroid_px[0] <= r1 and c0 <= region.centroid_px[1] <= c1
        # physical units follow from the frame's pixel size
        assert region.area_nm2 == pytest.approx(region.area_px * px**2, rel=0.05)
        assert region.equivalent_diameter_nm == pytest.approx(np.sqrt(4 * region.area_nm2 / np.pi))
        assert region.centroid_nm == pytest.approx((region.centroid_px[0] * px, region.centroid_px[1] * px), abs=1e-3)


def test_sizes_in_nm_do_not_depend_on_camera_sampling(analyser, sample):
    """The same field at 0.025 and 0.05 nm/px gives the same particle areas in nm²."""
    fine = analyser.analyse(Frame("fine", sample.image, 0.025))
    coarse_pixels = sample.image.reshape(512, 2, 512, 2).mean(axis=(1, 3)).astype(np.float32)
    coarse = analyser.analyse(Frame("coarse", coarse_pixels, 0.05))
    assert sum(r.area_nm2 for r in fine.regions) == pytest.approx(sum(r.area_nm2 for r in coarse.regions), rel=0.1)


def test_unknown_pixel_size_is_reported_not_guessed(analyser, sample):
    analysis = analyser.analyse(Frame("nopx", sample.image[:256, :256], None))
    assert any("pixel size unknown" in w for w in analysis.warnings)
    assert all(r.area_nm2 is None and r.centroid_nm is None for r in analysis.regions)


@pytest.mark.parametrize(
    "pixels, message",
    [
        (np.zeros((1, 1), np.uint16), "1×1 px"),
        (np.zeros((8, 64, 64), np.uint16), "expected a 2-D image"),
        (np.full((64, 64), np.nan, np.float32), "4096 NaN/Inf pixels"),
        (np.zeros((64, 64), np.complex64), "unsupported pixel type"),
    ],
)
def test_bad_frames_are_refused_with_their_id(analyser, pixels, message):
    with pytest.raises(FrameError, match=message) as err:
        analyser.analyse(Frame("cam#12", pixels, 0.05))
    assert str(err.value).startswith("cam#12:")


def test_the_forest_sees_its_own_normalisation_whatever_the_network_uses(tmp_path, analyser, sample):
    """A profile whose network is normalised otherwise still gives the forest the features it was trained on."""
    import json
    import shutil

    copy = tmp_path / "profile"
    shutil.copytree(analyser.directory, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["classifier"] = manifest["baseline_classifier"]  # the shipped forest, kept beside the CNN
    assert manifest["classifier"]["normalisation"] == "max" != manifest["segmentation"]["normalisation"]
    manifest["segmentation"]["normalisation"] = "percentile"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    other = Analyser(copy, threads=1)
    analyser = Analyser(analyser.directory, threads=1, classifier="baseline")
    frame = Frame("t:1", sample.image, 0.025)
    ours, theirs = analyser.prepare(frame), other.prepare(frame)
    assert not np.allclose(ours.pre.image, theirs.pre.image)  # the networks see different images
    probability = analyser.segment_batch([ours])[0]  # one map for both, so the regions are the same
    expected, got = analyser.finish(ours, probability), other.finish(theirs, probability)
    assert len(got.regions) == len(expected.regions) > 0
    assert [r.features for r in got.regions] == [r.features for r in expected.regions]


def test_a_network_call_holds_at_most_max_pixels_and_batching_changes_no_probability(sample):
    """Same-shape frames waiting together share network calls, each of at most ``max_pixels``."""
    from latticewatch.models.backends.onnxruntime import OnnxRuntimeBackend

    class Counting(OnnxRuntimeBackend):
        def predict(self, batch):
            calls.append(batch.shape)
            return super().predict(batch)

    single = Analyser("nanoparticles", backend="onnxruntime", threads=2)
    path = single.directory / single.manifest.segmentation.onnx
    calls: list[tuple] = []
    # the 1024² frame at 0.025 nm/px is 512² at the model's sampling: two fit in 2 × 512²
    batched = Analyser("nanoparticles", backend=Counting(path, threads=2), threads=2, max_pixels=2 * 512 * 512)
    frame = Frame("batched", sample.image, 0.025)
    prepared = [batched.prepare(frame) for _ in range(3)]
    probabilities = batched.segment_batch(prepared)
    assert calls == [(2, 1, 512, 512), (1, 1, 512, 512)]
    alone = single.segment_batch([single.prepare(frame)])[0]
    for probability in probabilities:
        np.testing.assert_allclose(probability, alone, atol=1e-5)
