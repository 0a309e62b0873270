"""The five region features of Groschner et al. (2021).

Mean, standard deviation and centre of mass of the radially integrated Fourier power of the
region, and the mean and standard deviation of its pixels in real space. The region is cut out
with its mask (mean-subtracted inside, zero outside) and zero-padded to a fixed FFT size, so the
radial bins are the same physical spatial frequencies for every region of a given pixel size.
"""

from __future__ import annotations

import numpy as np

FEATURE_NAMES: tuple[str, ...] = ("fft_mean", "fft_std", "fft_com", "real_mean", "real_std")
#: FFT side in pixels; regions larger than this are centre-cropped (10 nm at 0.05 nm/px = 200 px).
FFT_SIZE = 256
N_BINS = 64


def _radial_bins(size: int, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Bin index of every FFT pixel by |k| (0 … Nyquist), and the bin centres in cycles/pixel."""
    k = np.fft.fftfreq(size)
    radius = np.hypot(k[:, None], k[None, :])
    index = np.minimum((radius / 0.5 * n_bins).astype(np.int64), n_bins)  # n_bins = beyond Nyquist
    centres = (np.arange(n_bins) + 0.5) * 0.5 / n_bins
    return index.ravel(), centres


_BIN_INDEX, _BIN_CENTRES = _radial_bins(FFT_SIZE, N_BINS)
_BIN_COUNTS = np.bincount(_BIN_INDEX, minlength=N_BINS + 1)[:N_BINS]


def radial_profile(crop: np.ndarray) -> np.ndarray:
    """Mean Fourier power in each of ``N_BINS`` annuli from 0 to Nyquist of a ≤ FFT_SIZE² crop."""
    power = np.abs(np.fft.fft2(crop, s=(FFT_SIZE, FFT_SIZE))) ** 2
    sums = np.bincount(_BIN_INDEX, weights=power.ravel(), minlength=N_BINS + 1)[:N_BINS]
    return sums / _BIN_COUNTS


def region_features(image: np.ndarray, region_mask: np.ndarray, pixel_size_nm: float | None) -> dict[str, float]:
    """Features of one region given its bounding-box crop of the preprocessed image and its mask.

    ``fft_com`` is in cycles/nm when the pixel size is known, else cycles/pixel. Power is divided
    by the region's area so that large and small particles of the same lattice compare.

    Examples
    --------
    >>> img = np.random.default_rng(0).random((40, 40)).astype(np.float32)
    >>> sorted(region_features(img, np.ones((40, 40), bool), 0.05))
    ['fft_com', 'fft_mean', 'fft_std', 'real_mean', 'real_std']
    """
    h, w = image.shape
    if h > FFT_SIZE or w > FFT_SIZE:
        r0, c0 = max(0, (h - FFT_SIZE) // 2), max(0, (w - FFT_SIZE) // 2)
        image = image[r0 : r0 + FFT_SIZE, c0 : c0 + FFT_SIZE]
        region_mask = region_mask[r0 : r0 + FFT_SIZE, c0 : c0 + FFT_SIZE]
    values = image[region_mask].astype(np.float64)
    mean = float(values.mean())
    cut = np.where(region_mask, image - mean, 0.0)
    profile = radial_profile(cut) / max(values.size, 1)
    freqs = _BIN_CENTRES / pixel_size_nm if pixel_size_nm else _BIN_CENTRES
    total = profile.sum()
    return {
        "fft_mean": float(profile.mean()),
        "fft_std": float(profile.std()),
        "fft_com": float((freqs * profile).sum() / total) if total > 0 else 0.0,
        "real_mean": mean,
        "real_std": float(values.std()),
    }
