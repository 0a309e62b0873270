import math

import numpy as np
import pytest

from latticewatch.stages.features import (
    FEATURE_NAMES,
    FFT_SIZE,
    LATTICE_BAND_NM,
    N_ANGLES,
    NOISE_FLOOR_NM,
    region_features,
)


def reference_features(image, mask, pixel_size_nm):
    """Direct, loop-based computation of the five features, written independently of the module."""
    values = image[mask].astype(np.float64)
    mean = values.mean()
    padded = np.zeros((FFT_SIZE, FFT_SIZE))
    for (r, c), inside in np.ndenumerate(mask):
        if inside:
            padded[r, c] = image[r, c] - mean
    power = np.abs(np.fft.fft2(padded)) ** 2
    sums, counts, noise = np.zeros(N_ANGLES), np.zeros(N_ANGLES), []
    for u in range(FFT_SIZE):
        for v in range(FFT_SIZE):
            ku = (u if u < FFT_SIZE / 2 else u - FFT_SIZE) / FFT_SIZE
            kv = (v if v < FFT_SIZE / 2 else v - FFT_SIZE) / FFT_SIZE
            k_nm = math.hypot(ku, kv) / pixel_size_nm  # cycles per nm
            if 1 / LATTICE_BAND_NM[1] <= k_nm <= 1 / LATTICE_BAND_NM[0]:
                b = min(int((math.degrees(math.atan2(ku, kv)) % 180) / 180 * N_ANGLES), N_ANGLES - 1)
                sums[b] += power[u, v]
                counts[b] += 1
            if k_nm * pixel_size_nm >= min(pixel_size_nm / NOISE_FLOOR_NM, 0.45):
                noise.append(power[u, v])
    profile = sums / np.maximum(counts, 1) / np.median(noise)
    peak = int(np.argmax(profile))
    excess = [max(profile[(peak + i) % N_ANGLES] - np.median(profile), 0.0) for i in range(N_ANGLES)]
    distance = [min(i, N_ANGLES - i) * 180 / N_ANGLES for i in range(N_ANGLES)]
    return {
        "fft_mean": profile.mean(),
        "fft_std": profile.std(),
        "fft_com": sum(d * e for d, e in zip(distance, excess)) / sum(excess),
        "real_mean": mean,
        "real_std": values.std(),
    }


def test_features_match_direct_reference():
    rng = np.random.default_rng(3)
    yy, xx = np.indices((50, 60))
    image = (rng.random((50, 60)) + np.cos(2 * np.pi * (0.3 * xx + 0.1 * yy) * 0.05 / 0.25)).astype(np.float32)
    mask = (yy - 25) ** 2 / 400 + (xx - 30) ** 2 / 700 < 1
    ours = region_features(image, mask, 0.05)
    ref = reference_features(image, mask, 0.05)
    assert set(ours) == set(FEATURE_NAMES)
    for name in FEATURE_NAMES:
        assert ours[name] == pytest.approx(ref[name], rel=1e-6), name


def test_features_match_direct_reference_when_the_noise_floor_is_far_below_the_lattice():
    # a smooth (median-filtered, block-averaged) frame has little power at high frequency: the floor
    # is ~4e-6 of the peak here. The FFT of the float32 crop runs in single precision, and the real
    # FFT the module uses rounds differently from the reference's complex one: ~6e-7 on the features
    from scipy import ndimage

    rng = np.random.default_rng(4)
    yy, xx = np.indices((90, 80))
    lattice = np.cos(2 * np.pi * (0.6 * xx + 0.8 * yy) * 0.05 / 0.235)
    image = ndimage.gaussian_filter(rng.random((90, 80)) + lattice, 1.5).astype(np.float32)
    mask = (yy - 45) ** 2 / 1600 + (xx - 40) ** 2 / 1200 < 1
    ours, ref = region_features(image, mask, 0.05), reference_features(image, mask, 0.05)
    for name in FEATURE_NAMES:
        assert ours[name] == pytest.approx(ref[name], rel=1e-5), name


def fringes(angles_deg, spacing_nm=0.25, size=120, pixel_size_nm=0.05):
    yy, xx = np.indices((size, size)) * pixel_size_nm
    image = np.zeros((size, size))
    for a in angles_deg:
        t = math.radians(a)
        image += np.cos(2 * np.pi * (xx * math.cos(t) + yy * math.sin(t)) / spacing_nm)
    return (image + 0.2 * np.random.default_rng(0).standard_normal(image.shape)).astype(np.float32)


def test_one_fringe_set_vs_crossed_sets():
    mask = np.ones((120, 120), bool)
    one = region_features(fringes([20]), mask, 0.05)
    crossed = region_features(fringes([20, 90]), mask, 0.05)
    # two equal sets 70° apart: half the excess power at 0°, half at 70° → centre of mass ≈ 35°
    assert one["fft_com"] < 10 < crossed["fft_com"]
    assert crossed["fft_com"] == pytest.approx(35, abs=8)


def test_features_do_not_depend_on_rotation():
    mask = np.ones((120, 120), bool)
    a = region_features(fringes([10, 70]), mask, 0.05)
    b = region_features(fringes([100, 160]), mask, 0.05)
    assert a["fft_com"] == pytest.approx(b["fft_com"], abs=6)
    assert a["fft_mean"] == pytest.approx(b["fft_mean"], rel=0.15)


def test_lattice_stands_out_from_amorphous_noise():
    mask = np.ones((120, 120), bool)
    lattice = region_features(fringes([30, 90]), mask, 0.05)
    carbon = region_features(np.random.default_rng(1).standard_normal((120, 120)).astype(np.float32), mask, 0.05)
    assert lattice["fft_mean"] > 5 * carbon["fft_mean"] and lattice["fft_std"] > 5 * carbon["fft_std"]


def test_large_regions_and_unknown_pixel_size():
    image = np.random.default_rng(0).random((400, 300)).astype(np.float32)
    for px in (0.05, None):
        feats = region_features(image, np.ones_like(image, bool), px)
        assert np.isfinite(list(feats.values())).all()


def test_large_region_with_an_empty_centre_still_has_finite_features():
    # a 400×400 ring: the centred FFT_SIZE window would hold no region pixel
    yy, xx = np.mgrid[:400, :400]
    radius = np.hypot(yy - 200, xx - 200)
    ring = (radius > 180) & (radius < 195)
    image = np.random.default_rng(1).random((400, 400)).astype(np.float32)
    feats = region_features(image, ring, 0.05)
    assert all(np.isfinite(v) for v in feats.values())
    assert feats["real_mean"] == pytest.approx(float(image[ring].mean()), abs=0.05)
