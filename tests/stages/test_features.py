import numpy as np
import pytest

from latticewatch.stages.features import FEATURE_NAMES, FFT_SIZE, N_BINS, region_features


def reference_features(image, mask, pixel_size_nm):
    """Direct, loop-based computation of the paper's five features, written independently."""
    values = image[mask].astype(np.float64)
    mean = values.mean()
    padded = np.zeros((FFT_SIZE, FFT_SIZE))
    for (r, c), inside in np.ndenumerate(mask):
        if inside:
            padded[r, c] = image[r, c] - mean
    power = np.abs(np.fft.fft2(padded)) ** 2
    sums, counts = np.zeros(N_BINS), np.zeros(N_BINS)
    for u in range(FFT_SIZE):
        for v in range(FFT_SIZE):
            ku = (u if u < FFT_SIZE / 2 else u - FFT_SIZE) / FFT_SIZE
            kv = (v if v < FFT_SIZE / 2 else v - FFT_SIZE) / FFT_SIZE
            b = int(np.sqrt(ku**2 + kv**2) / 0.5 * N_BINS)
            if b < N_BINS:
                sums[b] += power[u, v]
                counts[b] += 1
    profile = sums / counts / values.size
    freq = (np.arange(N_BINS) + 0.5) * 0.5 / N_BINS / pixel_size_nm
    return {
        "fft_mean": profile.mean(),
        "fft_std": profile.std(),
        "fft_com": (freq * profile).sum() / profile.sum(),
        "real_mean": mean,
        "real_std": values.std(),
    }


def test_features_match_direct_reference():
    rng = np.random.default_rng(3)
    image = rng.random((50, 60)).astype(np.float32)
    yy, xx = np.indices(image.shape)
    mask = (yy - 25) ** 2 / 400 + (xx - 30) ** 2 / 700 < 1
    ours = region_features(image, mask, 0.05)
    ref = reference_features(image, mask, 0.05)
    assert set(ours) == set(FEATURE_NAMES)
    for name in FEATURE_NAMES:
        assert ours[name] == pytest.approx(ref[name], rel=1e-6), name


def test_fft_centre_of_mass_follows_the_lattice_spacing():
    yy, xx = np.indices((120, 120))
    mask = np.ones((120, 120), bool)
    coms = []
    for spacing_nm in (0.2, 0.3):
        fringes = np.cos(2 * np.pi * xx * 0.05 / spacing_nm).astype(np.float32)
        coms.append(region_features(fringes, mask, 0.05)["fft_com"])
    # the Fourier power sits at 1/spacing: finer fringes move the centre of mass outwards
    assert coms[0] == pytest.approx(1 / 0.2, rel=0.08)
    assert coms[1] == pytest.approx(1 / 0.3, rel=0.08)


def test_large_regions_are_cropped_to_the_fft_window():
    image = np.random.default_rng(0).random((400, 300)).astype(np.float32)
    feats = region_features(image, np.ones_like(image, bool), 0.05)
    assert np.isfinite(list(feats.values())).all()
