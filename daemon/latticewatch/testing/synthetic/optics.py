"""The microscope of the analytic generator: optics and dose drawn per frame, and the
amorphous-carbon background they image.

The carbon is white noise filtered in Fourier space by a phase-contrast transfer function
``sin χ(k)`` (random defocus and Cs, so the power spectrum shows Thon rings) times a
temporal-coherence damping envelope, plus a faint long-range thickness variation.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from scipy import fft as sfft

# Contrast model, in units of the mean intensity (1.0 = vacuum-level beam through thin carbon).
_CARBON_STD = (0.04, 0.09)  # granular phase contrast of ~3 nm amorphous carbon
_THICKNESS_STD = (0.0, 0.015)  # slow mass-thickness variation of the support film
_THICKNESS_SIGMA_NM = (2.0, 6.0)
_EDGE_TAPER_NM = (0.15, 0.5)  # fringe contrast ramps up over this distance from the edge
_DEFOCUS_NM = (-120.0, -20.0)  # underfocus, where carbon shows its familiar Thon rings
_CS_MM = (0.0, 1.2)  # from aberration-corrected to a plain FEG objective
_FOCAL_SPREAD_NM = (2.0, 5.0)  # temporal coherence: information limit ~0.12–0.2 nm
_VOLTAGES_KV = (200.0, 300.0)


def _wavelength_nm(voltage_kv: float) -> float:
    """Relativistic electron wavelength."""
    v = voltage_kv * 1e3
    return 1.226426 / math.sqrt(v * (1.0 + 0.978476e-6 * v))


def draw_optics(rng: np.random.Generator, pixel_size_nm: float) -> dict[str, float]:
    """Voltage, lens, carbon texture and particle-edge taper of one frame (all recorded in its params).

    Examples
    --------
    >>> optics = draw_optics(np.random.default_rng(0), 0.05)
    >>> optics["voltage_kv"] in (200.0, 300.0), optics["defocus_nm"] < 0
    (True, True)
    """
    voltage = float(_VOLTAGES_KV[int(rng.integers(len(_VOLTAGES_KV)))])
    return {
        "voltage_kv": voltage,
        "wavelength_nm": _wavelength_nm(voltage),
        "defocus_nm": float(rng.uniform(*_DEFOCUS_NM)),
        "cs_mm": float(rng.uniform(*_CS_MM)),
        "focal_spread_nm": float(rng.uniform(*_FOCAL_SPREAD_NM)),
        "carbon_std": float(rng.uniform(*_CARBON_STD)),
        "thickness_std": float(rng.uniform(*_THICKNESS_STD)),
        "thickness_sigma_nm": float(rng.uniform(*_THICKNESS_SIGMA_NM)),
        "edge_taper_nm": float(max(rng.uniform(*_EDGE_TAPER_NM), pixel_size_nm)),
    }


def draw_dose(rng: np.random.Generator, lo: float, hi: float) -> float:
    """Electrons per pixel, log-uniform in ``[lo, hi]`` (``lo`` when the bounds are equal).

    Examples
    --------
    >>> draw_dose(np.random.default_rng(0), 50.0, 50.0)
    50.0
    """
    # Log-uniform: the low-dose end, where segmentation is hardest, is not under-represented.
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi)))) if hi > lo else float(lo)


@functools.lru_cache(maxsize=16)
def _frequency_grid(
    shape: tuple[int, int], pixel_size_nm: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """|k|² and |k|⁴ (nm⁻², nm⁻⁴) on the rfft2 grid, and each column's weight in the full
    spectrum. float32 is ample (phase errors < 1e-3 rad where the envelope lets anything through)
    and halves the cost of the filter, a third of a frame's time."""
    kr = sfft.fftfreq(shape[0], d=pixel_size_nm)
    kc = sfft.rfftfreq(shape[1], d=pixel_size_nm)
    k2 = kr[:, None] ** 2 + kc[None, :] ** 2
    k4 = (k2**2).astype(np.float32)
    k2 = k2.astype(np.float32)
    weight = np.full(kc.size, 2.0, dtype=np.float32)
    weight[0] = 1.0
    if shape[1] % 2 == 0:
        weight[-1] = 1.0
    for a in (k2, k4, weight):
        a.flags.writeable = False
    return k2, k4, weight


def carbon_contrast(
    rng: np.random.Generator, shape: tuple[int, int], pixel_size_nm: float, optics: dict
) -> np.ndarray:
    """Zero-mean amorphous-carbon contrast: CTF-filtered white noise plus slow thickness.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> carbon = carbon_contrast(rng, (64, 64), 0.05, draw_optics(rng, 0.05))
    >>> carbon.shape, abs(float(carbon.mean())) < 1e-6
    ((64, 64), True)
    """
    k2, k4, weight = _frequency_grid(shape, pixel_size_nm)
    lam = optics["wavelength_nm"]
    cs = optics["cs_mm"] * 1e6
    f32 = np.float32
    chi = f32(math.pi * lam * optics["defocus_nm"]) * k2
    chi += f32(0.5 * math.pi * cs * lam**3) * k4
    ctf = np.sin(chi, out=chi)
    # Temporal-coherence envelope exp(-½(πλΔ)²k⁴): the information limit of the microscope.
    ctf *= np.exp(f32(-0.5 * (math.pi * lam * optics["focal_spread_nm"]) ** 2) * k4)
    sigma = optics["thickness_sigma_nm"]
    slow = np.exp(f32(-2.0 * math.pi**2 * sigma**2) * k2)
    n = shape[0] * shape[1]

    def scale(h: np.ndarray, std: float) -> float:
        # Factor giving filtered unit white noise the standard deviation ``std`` (Parseval).
        var = float(np.square(h).sum(axis=0) @ weight) / n
        return std / math.sqrt(var) if var > 0 else 0.0

    filt = ctf
    filt *= f32(scale(ctf, optics["carbon_std"]))
    filt += f32(scale(slow, optics["thickness_std"])) * slow
    filt[0, 0] = 0.0  # zero mean: the carbon changes texture, not the mean intensity
    white = rng.standard_normal(shape, dtype=np.float32)
    spectrum = sfft.rfft2(white)
    spectrum *= filt
    return sfft.irfft2(spectrum, s=shape)


