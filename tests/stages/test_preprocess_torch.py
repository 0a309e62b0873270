"""`stages.preprocess_torch` against the numpy stage it reimplements (`stages.preprocess`).

On the CPU: bit for bit for the median, block means of integer frames, ``max`` and ``zscore``; within
2e-6 (absolute, on unit-scale outputs) for ``percentile`` and ``bezier_zscore`` and one float32 rounding
for Gaussian + linear resampling, where sums are taken in another order. On a GPU (skipped without
one), within 1e-5 relative: CUDA divides by a scalar through its reciprocal.
"""

import numpy as np
import pytest
from scipy import ndimage

from latticewatch.runtime.bench import synthetic_frame
from latticewatch.stages import preprocess as reference

torch = pytest.importorskip("torch")
from latticewatch.stages import preprocess_torch as on_torch  # noqa: E402  (needs torch)

CUDA = torch.cuda.is_available()
NORMALISATIONS = ("max", "percentile", "zscore", "bezier_zscore")


def frame(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random(shape) * 3000 - (1000 if np.issubdtype(dtype, np.signedinteger) else 0)
    x[shape[0] // 3, shape[1] // 2] = 30000  # an X-ray spike
    return x.astype(dtype)


@pytest.mark.parametrize("shape", [(16, 16), (17, 33), (64, 5), (3, 3), (1, 7)])
@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.float32, np.float64])
def test_median_equals_scipy_exactly(shape, dtype):
    x = frame(shape, dtype)
    theirs = ndimage.median_filter(x, 3, mode="reflect")
    np.testing.assert_array_equal(on_torch.median3x3(torch.from_numpy(x)).numpy(), theirs)


def test_median_of_a_uint16_frame_through_float32_is_exact():
    x = frame((33, 20), np.uint16)
    np.testing.assert_array_equal(on_torch.median3x3(torch.from_numpy(x).float()).numpy(),
                                  ndimage.median_filter(x, 3, mode="reflect").astype(np.float32))


@pytest.mark.parametrize("factor", [0.5, 0.25, 1 / 3])
def test_block_means_of_integer_frames_are_exact(factor):
    x = frame((301, 298), np.uint16)
    ours = on_torch.resample(torch.from_numpy(x).float(), factor).numpy()
    np.testing.assert_array_equal(ours, reference.resample(x.astype(np.float32), factor))


@pytest.mark.parametrize("factor", [0.6, 0.37, 1.4, 2.3, 0.15])
def test_gaussian_and_linear_resampling_match_scipy(factor):
    # 0.15 on a small frame: the Gaussian's radius (13) is longer than the frame, so its mirrored
    # edges repeat, as scipy's do
    x = frame((9, 11) if factor == 0.15 else (300, 301), np.float32)
    ours = on_torch.resample(torch.from_numpy(x), factor).numpy()
    theirs = reference.resample(x, factor)
    assert ours.shape == theirs.shape and ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-7 * np.abs(theirs).max())


@pytest.mark.parametrize("method", NORMALISATIONS)
def test_normalise_matches(method):
    x = reference.median3x3(frame((130, 97), np.float32))
    ours = on_torch.normalise(torch.from_numpy(x), method).numpy()
    theirs = reference.normalise(x, method)
    assert ours.dtype == np.float32
    if method in ("max", "zscore"):
        np.testing.assert_array_equal(ours, theirs)
    else:
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-6)


def test_normalise_refuses_an_unknown_method():
    with pytest.raises(ValueError, match="unknown normalisation 'gamma'"):
        on_torch.normalise(torch.ones(4, 4), "gamma")


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.float32])
@pytest.mark.parametrize("pixel_size_nm", [0.025, 0.05, 0.0125, 0.03, 0.07, None])
@pytest.mark.parametrize("method", NORMALISATIONS)
def test_preprocess_equals_the_numpy_stage(dtype, pixel_size_nm, method):
    x = frame((257, 190), dtype)
    theirs = reference.preprocess(x, pixel_size_nm, normalisation=method, model_pixel_size_nm=0.05)
    ours = on_torch.preprocess_torch(torch.from_numpy(x), pixel_size_nm, normalisation=method,
                                     model_pixel_size_nm=0.05).to_host()
    assert (ours.scale, ours.pixel_size_nm) == (theirs.scale, theirs.pixel_size_nm)
    assert ours.image.shape == theirs.image.shape and ours.image.dtype == np.float32
    if method in ("max", "zscore") and pixel_size_nm not in (0.03, 0.07):  # no Gaussian + linear resampling
        np.testing.assert_array_equal(ours.image, theirs.image)
    else:
        np.testing.assert_allclose(ours.image, theirs.image, rtol=0, atol=2e-6)
    assert ours.feature_image is ours.image


def test_a_separate_feature_normalisation_is_kept_apart():
    x = synthetic_frame(256).pixels
    kw = {"normalisation": "zscore", "model_pixel_size_nm": 0.05, "feature_normalisation": "max"}
    theirs = reference.preprocess(x, 0.025, **kw)
    ours = on_torch.preprocess_torch(torch.from_numpy(x), 0.025, **kw).to_host()
    np.testing.assert_array_equal(ours.image, theirs.image)
    np.testing.assert_array_equal(ours.feature_image, theirs.feature_image)
    assert ours.feature_image is not ours.image


@pytest.fixture(scope="module")
def camera_frame():
    return synthetic_frame(2048).pixels


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
@pytest.mark.parametrize("method", NORMALISATIONS)
@pytest.mark.parametrize("pixel_size_nm", [0.025, 0.03])
def test_on_the_gpu_within_float32_rounding(method, pixel_size_nm, camera_frame):
    x = camera_frame
    theirs = reference.preprocess(x, pixel_size_nm, normalisation=method, model_pixel_size_nm=0.05)
    ours = on_torch.preprocess_torch(torch.from_numpy(x).cuda(), pixel_size_nm, normalisation=method,
                                     model_pixel_size_nm=0.05).to_host()
    assert ours.image.shape == theirs.image.shape
    np.testing.assert_allclose(ours.image, theirs.image, rtol=0, atol=1e-5 * np.abs(theirs.image).max())
