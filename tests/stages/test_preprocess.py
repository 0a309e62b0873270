import numpy as np
import pytest
from scipy import ndimage

from latticewatch.stages.preprocess import (
    bezier_background,
    exact_block_sums,
    median3x3,
    normalise,
    pad_to_multiple,
    preprocess,
    resample,
)


@pytest.mark.parametrize("shape", [(16, 16), (17, 33), (64, 5), (3, 3), (1, 6), (97, 40)])  # 97: strips of 32 + 1
@pytest.mark.parametrize("dtype", [np.uint16, np.int16, np.float32, np.int8, np.uint32])
def test_median3x3_equals_scipy_reference(shape, dtype):
    rng = np.random.default_rng(1)
    x = (rng.random(shape) * 100 - (50 if np.issubdtype(dtype, np.signedinteger) else 0)).astype(dtype)
    np.testing.assert_array_equal(median3x3(x), ndimage.median_filter(x, 3, mode="reflect"))


@pytest.mark.parametrize("k", [2, 3, 4, 16])
@pytest.mark.parametrize("dtype", [np.uint16, np.int16, np.uint8, np.int8])
@pytest.mark.parametrize("counts", ["full range", "low dose"])  # 32- and 16-bit sums
def test_integer_frames_preprocess_exactly_like_the_float_reference(k, dtype, counts):
    # the fast path (integer block sums, median, then divide) against the plain one it replaces:
    # float32 block means, then the median; bit-identical
    info = np.iinfo(dtype)
    lo, hi = (info.min, info.max) if counts == "full range" else (max(info.min, -20), 120)
    x = np.random.default_rng(k).integers(lo, hi, (203, 150), endpoint=True).astype(dtype)
    reference = normalise(median3x3(resample(x.astype(np.float32), 1 / k)), "zscore")
    out = preprocess(x, 0.01, normalisation="zscore", model_pixel_size_nm=0.01 * k)
    assert out.image.dtype == np.float32
    np.testing.assert_array_equal(out.image, reference)


def test_exact_block_sums_refuses_what_float32_cannot_hold():
    assert exact_block_sums(np.ones((8, 8), np.float32), 2) is None
    assert exact_block_sums(np.ones((8, 8), np.uint32), 2) is None
    assert exact_block_sums(np.ones((40, 40), np.uint16), 17) is None  # 17² · 65535 ≥ 2²⁴
    assert exact_block_sums(np.full((5, 7), 65535, np.uint16), 2).tolist() == [[4 * 65535] * 3] * 2


@pytest.mark.parametrize(("dtype", "largest", "accumulator"), [
    (np.uint16, 16383, np.uint16), (np.uint16, 16384, np.uint32), (np.uint8, 255, np.uint16),
    (np.int16, 8191, np.int16), (np.int16, -8192, np.int32), (np.int8, -128, np.int16)])
def test_exact_block_sums_stay_16_bit_while_they_fit(dtype, largest, accumulator):
    x = np.zeros((6, 6), dtype)
    x[2:4, 2:4] = largest
    sums = exact_block_sums(x, 2)
    assert sums.dtype == accumulator and int(sums[1, 1]) == 4 * largest


def test_median_removes_xray_spike():
    x = np.full((32, 32), 100, np.uint16)
    x[10, 10] = 65000
    assert median3x3(x).max() == 100


def test_max_normalisation_divides_by_maximum():
    x = np.array([[0, 5], [10, 20]], np.uint16)
    np.testing.assert_allclose(normalise(x, "max"), x / 20.0)


def test_percentile_normalisation_range():
    x = np.random.default_rng(0).normal(100, 10, (64, 64))
    y = normalise(x, "percentile")
    assert y.min() == 0 and y.max() == 1 and y.dtype == np.float32


def test_bezier_zscore_removes_quadratic_illumination():
    h, w = 128, 96
    u, v = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    illumination = 1000 * (1 + 0.5 * u - 0.3 * v**2 + 0.2 * u * v)
    fitted = bezier_background(illumination, subsample=1)
    np.testing.assert_allclose(fitted, illumination, rtol=2e-3)
    rng = np.random.default_rng(0)
    texture = 1 + 0.05 * rng.standard_normal((h, w))
    z = normalise(illumination * texture, "bezier_zscore")
    assert abs(z.mean()) < 1e-4
    # the illumination ramp is gone: both halves have the same mean
    assert abs(z[: h // 2].mean() - z[h // 2 :].mean()) < 0.1


def test_zscore_does_not_depend_on_gain_or_offset():
    x = np.random.default_rng(0).random((32, 32)).astype(np.float32)
    z = normalise(x, "zscore")
    assert z.dtype == np.float32 and abs(float(z.mean())) < 1e-5 and abs(float(z.std()) - 1) < 1e-4
    np.testing.assert_allclose(normalise(3.7 * x + 1000, "zscore"), z, atol=1e-3)
    assert not np.allclose(normalise(0.5 * x + 0.5, "max"), normalise(x, "max"), atol=1e-2)  # what max does
    assert not normalise(np.full((4, 4), 7.0), "zscore").any()  # a flat frame: zeros, not NaN


def test_unknown_normalisation_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown normalisation 'zz'"):
        normalise(np.ones((4, 4)), "zz")


def test_resample_integer_factor_is_block_mean():
    x = np.arange(16, dtype=np.float32).reshape(4, 4)
    np.testing.assert_allclose(resample(x, 0.5), [[2.5, 4.5], [10.5, 12.5]])


def test_resample_keeps_fringe_frequency():
    # a 0.25 nm fringe sampled at 0.03 nm/px, resampled to 0.05 nm/px, stays at 0.25 nm
    n = 300
    x = np.cos(2 * np.pi * np.arange(n) * 0.03 / 0.25)[None, :].repeat(64, 0).astype(np.float32)
    y = resample(x, 0.03 / 0.05)
    spectrum = np.abs(np.fft.rfft(y[32] - y[32].mean()))
    peak_period_px = y.shape[1] / np.argmax(spectrum)
    assert peak_period_px * 0.05 == pytest.approx(0.25, rel=0.03)


def test_pad_to_multiple():
    padded, shape = pad_to_multiple(np.ones((30, 17)), 16)
    assert padded.shape == (32, 32) and shape == (30, 17)


def test_preprocess_resamples_only_with_known_pixel_size():
    x = np.ones((128, 128), np.uint16)
    assert preprocess(x, 0.025, normalisation="max", model_pixel_size_nm=0.05).image.shape == (64, 64)
    unknown = preprocess(x, None, normalisation="max", model_pixel_size_nm=0.05)
    assert unknown.image.shape == (128, 128) and unknown.scale == 1.0 and unknown.pixel_size_nm is None


def test_xray_spike_removed_after_resampling():
    rng = np.random.default_rng(0)
    frame = rng.poisson(100, (128, 128)).astype(np.uint16)
    frame[40, 41] = 60000  # X-ray hit at camera sampling
    out = preprocess(frame, 0.025, normalisation="max", model_pixel_size_nm=0.05)
    # max-normalised: without the spike the brightest model pixel is near the Poisson tail
    assert out.image.shape == (64, 64)
    assert np.sort(out.image.ravel())[-1] == pytest.approx(np.sort(out.image.ravel())[-2], rel=0.1)
