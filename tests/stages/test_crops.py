import numpy as np
import pytest
from scipy import ndimage

from latticewatch.stages.crops import CropSpec, classifier_input, labelled_inputs
from latticewatch.stages.isolate import measure


@pytest.mark.parametrize("channels", [("image", "mask", "log_power"), ("mask",), ("log_power", "image")])
def test_labelled_inputs_equal_one_classifier_input_per_region(channels):
    # the windowed label test against the plain reference: a whole-frame mask per region
    rng = np.random.default_rng(3)
    image = rng.normal(size=(150, 170)).astype(np.float32)
    mask = ndimage.gaussian_filter(rng.random((150, 170)), 4) > 0.52  # many regions, some on the border
    labels = ndimage.label(mask)[0]
    regions = measure(labels)
    assert len(regions) > 5 and any(r.touches_edge for r in regions)
    spec = CropSpec(size_px=48, channels=channels)
    reference = np.stack([classifier_input(image, labels == r.label, r.centroid, spec) for r in regions])
    got = labelled_inputs(image, labels, [(r.label, r.centroid) for r in regions], spec)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, reference)


def test_labelled_inputs_of_no_regions():
    empty = labelled_inputs(np.zeros((64, 64), np.float32), np.zeros((64, 64), np.int32), [], CropSpec(size_px=32))
    assert empty.shape == (0, 3, 32, 32)


def test_classifier_input_equals_a_plain_reference():
    # written out one window at a time, as the CNN's training crops were first made
    rng = np.random.default_rng(8)
    image = rng.normal(2.0, 3.0, size=(100, 90)).astype(np.float32)
    region = np.zeros((100, 90), bool)
    region[5:40, 60:90] = True
    centroid = (22.0, 75.0)
    r0, c0 = 22 - 32, 75 - 32
    pixels = np.zeros((64, 64), np.float32)
    part = image[max(r0, 0) : r0 + 64, max(c0, 0) : c0 + 64]
    pixels[-r0 : -r0 + part.shape[0], : part.shape[1]] = (part - part.mean(dtype=np.float64)) / (
        part.std(dtype=np.float64) + 1e-6)
    inside = np.zeros((64, 64), np.float32)
    inside[-r0 : -r0 + part.shape[0], : part.shape[1]] = region[max(r0, 0) : r0 + 64, max(c0, 0) : c0 + 64]
    taper = np.outer(np.hanning(64), np.hanning(64)).astype(np.float32)
    logp = np.log1p(np.abs(np.fft.fftshift(np.fft.fft2((pixels - pixels.mean()) * taper))) ** 2).astype(np.float32)
    log_power = (logp - logp.mean()) / (logp.std() + 1e-6)
    got = classifier_input(image, region, centroid, CropSpec(size_px=64))
    np.testing.assert_array_equal(got, np.stack([pixels, inside, log_power]))
