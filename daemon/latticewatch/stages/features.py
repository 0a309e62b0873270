"""The five region features of Groschner et al. (2021).

Mean, standard deviation and centre of mass of the radially integrated Fourier transform of the
region, and the mean and standard deviation of its pixels in real space.

"Radially integrated" is read literally: the Fourier power of the region is summed along each
radial line through the origin, over the band of lattice spacings (0.17–0.40 nm), giving power
as a function of direction. Lattice fringes are peaks in that profile; amorphous carbon is flat.
The three Fourier features are then
- ``fft_mean``: mean band power per direction, in units of the white-noise floor (how much lattice),
- ``fft_std``: its spread over directions (anisotropy: fringes vs isotropic carbon),
- ``fft_com``: the centre of mass, in degrees from the strongest direction, of the power above the
  profile's median — near 0 for one fringe set (misoriented), about half the angle between two
  equally strong crossed sets (on zone axis), and moved by the extra streaks a stacking fault adds.
Measuring the angle from the strongest direction makes all five invariant to particle rotation.
(Summing over angle instead — a radial profile — was measured too: 0.40 balanced accuracy on the
synthetic classes against 0.66 for this reading, because it discards fringe directions.)
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import scipy.fft

FEATURE_NAMES: tuple[str, ...] = ("fft_mean", "fft_std", "fft_com", "real_mean", "real_std")
#: FFT side in pixels; regions larger than this are centre-cropped (12.8 nm at 0.05 nm/px).
FFT_SIZE = 256
#: Direction bins over 0–180° (Fourier power of a real image is centro-symmetric).
N_ANGLES = 90
#: Lattice band in nm (fringe spacings of fcc metals and CdSe sit inside) and the noise-floor band.
LATTICE_BAND_NM = (0.17, 0.40)
NOISE_FLOOR_NM = 0.12
#: The same bands in cycles/pixel for frames of unknown pixel size.
LATTICE_BAND_CYCLES = (0.1, 0.35)
NOISE_FLOOR_CYCLES = 0.4


@lru_cache(maxsize=8)
def _fourier_geometry(pixel_size_nm: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Where the lattice band and the noise floor sit in a real FFT, and the band's direction bins.

    The bands are chosen on the full FFT_SIZE² plane; each of their points is then looked up in the
    half plane a real-input FFT returns (power at −k equals power at k), so the band's bin sums and
    the floor's median see exactly the points of the full plane, in the same order.
    Returns the band's indices into the flattened half-plane power, their direction bins, the bin
    counts, and the noise-floor indices.
    """
    k = np.fft.fftfreq(FFT_SIZE)
    ky, kx = np.meshgrid(k, k, indexing="ij")
    radius = np.hypot(ky, kx)  # cycles/pixel
    if pixel_size_nm:
        lo, hi = pixel_size_nm / LATTICE_BAND_NM[1], pixel_size_nm / LATTICE_BAND_NM[0]
        floor = min(pixel_size_nm / NOISE_FLOOR_NM, 0.45)
    else:
        (lo, hi), floor = LATTICE_BAND_CYCLES, NOISE_FLOOR_CYCLES
    band = np.flatnonzero((radius >= lo) & (radius <= min(hi, 0.5)))
    angle = np.degrees(np.arctan2(ky.ravel()[band], kx.ravel()[band])) % 180.0
    bins = np.minimum((angle / 180.0 * N_ANGLES).astype(np.intp), N_ANGLES - 1)
    counts = np.bincount(bins, minlength=N_ANGLES).astype(np.float64)
    noise = np.flatnonzero(radius >= floor)
    # full-plane (row, col) → half-plane index: columns past Nyquist mirror to (−row, −col)
    rows, cols = np.indices((FFT_SIZE, FFT_SIZE))
    mirrored = cols > FFT_SIZE // 2
    rows = np.where(mirrored, -rows % FFT_SIZE, rows)
    cols = np.where(mirrored, FFT_SIZE - cols, cols)
    half = (rows * (FFT_SIZE // 2 + 1) + cols).ravel()
    return half[band], bins, np.maximum(counts, 1.0), half[noise]


#: Angular distance of each direction bin from bin 0, in degrees (the profile wraps at 180°).
_ANGLE_FROM_PEAK = np.minimum(np.arange(N_ANGLES), N_ANGLES - np.arange(N_ANGLES)) * (180.0 / N_ANGLES)


def angular_profile(crop: np.ndarray, pixel_size_nm: float | None) -> np.ndarray:
    """Lattice-band Fourier power per direction of a ≤ FFT_SIZE² crop, over its white-noise floor."""
    band, bins, counts, noise = _fourier_geometry(pixel_size_nm)
    # the real FFT: a quarter of the complex one's time; both run in single precision on a float32 crop
    # and round differently, ~1e-6 relative on a floor far below the lattice peaks
    power = (np.abs(scipy.fft.rfft2(crop, s=(FFT_SIZE, FFT_SIZE))) ** 2).ravel()
    floor = float(np.median(power[noise]))
    profile = np.bincount(bins, weights=power[band], minlength=N_ANGLES) / counts
    return profile / floor if floor > 0 else profile


def region_features(image: np.ndarray, region_mask: np.ndarray, pixel_size_nm: float | None) -> dict[str, float]:
    """Features of one region given its bounding-box crop of the preprocessed image and its mask.

    Examples
    --------
    >>> img = np.random.default_rng(0).random((40, 40)).astype(np.float32)
    >>> sorted(region_features(img, np.ones((40, 40), bool), 0.05))
    ['fft_com', 'fft_mean', 'fft_std', 'real_mean', 'real_std']
    """
    h, w = image.shape
    if h > FFT_SIZE or w > FFT_SIZE:
        # centre the window on the region pixel nearest the centroid: the bbox centre of a large
        # ring- or L-shaped agglomerate can hold no region pixels at all
        rows, cols = np.nonzero(region_mask)
        nearest = np.argmin((rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2)
        r0 = int(np.clip(rows[nearest] - FFT_SIZE // 2, 0, max(0, h - FFT_SIZE)))
        c0 = int(np.clip(cols[nearest] - FFT_SIZE // 2, 0, max(0, w - FFT_SIZE)))
        image = image[r0 : r0 + FFT_SIZE, c0 : c0 + FFT_SIZE]
        region_mask = region_mask[r0 : r0 + FFT_SIZE, c0 : c0 + FFT_SIZE]
    values = image[region_mask].astype(np.float64)
    mean = float(values.mean())
    profile = angular_profile(np.where(region_mask, image - mean, 0.0), pixel_size_nm)
    aligned = np.roll(profile, -int(np.argmax(profile)))
    excess = np.clip(aligned - np.median(aligned), 0.0, None)
    total = excess.sum()
    return {
        "fft_mean": float(profile.mean()),
        "fft_std": float(profile.std()),
        "fft_com": float((_ANGLE_FROM_PEAK * excess).sum() / total) if total > 0 else 0.0,
        "real_mean": mean,
        "real_std": float(values.std()),
    }
