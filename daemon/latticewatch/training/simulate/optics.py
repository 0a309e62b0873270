"""The microscope: imaging conditions drawn per image, and the detector that turns an image
intensity into electron counts.

:func:`draw_conditions` draws the pixel size, defocus, residual aberrations (A1, B2, A2, Cs,
C5), focal spread, illumination convergence, dose, detector, carbon thickness and which side
of the film the particles sit on (the lens itself is applied by abTEM,
:mod:`latticewatch.training.simulate.multislice`).

:func:`detect` integrates the intensity over each detector pixel (mean of ``f × f`` samples:
the pixel's own sinc MTF, with aliasing, as on a real camera), then ``MTF(ν) = 1 / (1 + (ν/ν₀)^p)``
(ν in units of Nyquist) models the charge spread. A ``counting`` camera (direct electron
detector in counting mode) blurs the signal and then counts, so its noise is white; an
``integrating`` camera (scintillator + CMOS, e.g. a Ceta) counts electrons and then blurs them,
so its noise is blurred too. Counts are ``Poisson(dose · pixel area · intensity)``, stored as
float32.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from latticewatch.training.simulate.config import SimulationConfig, weighted_choice


def draw_conditions(rng: np.random.Generator, config: SimulationConfig) -> dict[str, Any]:
    """Imaging conditions of one image: optics, dose, detector, carbon, sampling.

    Aberrations are in abTEM's polar notation (``C10 = -defocus``; magnitudes in Å, angles in
    radians) and repeated in microscopists' names and units. ``defocus_nm > 0`` is underfocus.

    Examples
    --------
    >>> c = draw_conditions(np.random.default_rng(0), SimulationConfig())
    >>> c["simulation"]["oversampling"] >= 2, 200 <= c["dose_e_per_a2"] <= 5000
    (True, True)
    """
    px_nm = float(rng.uniform(*config.pixel_size_nm))
    px = 10.0 * px_nm
    defocus_nm = float(rng.uniform(*config.defocus_nm))
    a1, b2, a2 = (float(rng.uniform(*r))
                  for r in (config.astigmatism_a1_nm, config.coma_b2_nm, config.astigmatism_a2_nm))
    phi12, phi21, phi23 = (float(rng.uniform(0, 2 * math.pi)) for _ in range(3))
    cs_um, c5_mm = float(rng.uniform(*config.cs_um)), float(rng.uniform(*config.c5_mm))
    focal_nm = float(rng.uniform(*config.focal_spread_nm))
    convergence = float(rng.uniform(*config.convergence_mrad))
    lo, hi = config.dose_e_per_a2
    dose = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    detector = weighted_choice(rng, config.detectors)
    nu0 = float(rng.uniform(*(config.mtf_nu0_counting if detector == "counting" else config.mtf_nu0_integrating)))
    power = float(rng.uniform(*config.mtf_power))
    carbon_nm = float(rng.uniform(*config.carbon_thickness_nm))
    side = "beam_entrance" if rng.random() < 0.5 else "beam_exit"
    f = max(2, math.ceil(px / config.max_sim_sampling_angstrom - 1e-9))
    return {
        "pixel_size_nm": px_nm,
        "energy_kev": config.energy_kev,
        "defocus_nm": defocus_nm,
        "defocus_convention": "positive = underfocus (abTEM defocus = -C10)",
        "aberrations": {
            "C10": -10.0 * defocus_nm, "C12": 10.0 * a1, "phi12": phi12, "C21": 10.0 * b2, "phi21": phi21,
            "C23": 10.0 * a2, "phi23": phi23, "C30": 1e4 * cs_um, "C50": 1e7 * c5_mm,
        },
        "aberrations_readable": {
            "A1_nm": a1, "A1_angle_deg": math.degrees(phi12), "B2_nm": b2, "B2_angle_deg": math.degrees(phi21),
            "A2_nm": a2, "A2_angle_deg": math.degrees(phi23), "Cs_um": cs_um, "C5_mm": c5_mm,
        },
        "focal_spread_rms_nm": focal_nm,
        "information_limit_nm": _information_limit_nm(focal_nm, config.energy_kev),
        "convergence_mrad": convergence,
        "dose_e_per_a2": dose,
        "dose_e_per_px": dose * px * px,
        "detector": {"mode": detector, "mtf_nu0": nu0, "mtf_power": power,
                     "mtf_at_nyquist": _blur_mtf(np.array(1.0), nu0, power).item() * 2 / math.pi},
        "carbon": {"thickness_nm": carbon_nm, "density_g_cm3": config.carbon_density_g_cm3,
                   "min_distance_angstrom": config.carbon_min_distance_angstrom},
        "particles_side": side,
        "simulation": {
            "oversampling": f,
            "sampling_angstrom": px / f,
            "gpts": config.size * f,
            "slice_thickness_angstrom": config.slice_thickness_angstrom,
            "focal_nodes": config.focal_nodes,
            "potential": "abTEM independent-atom model, Lobato parametrisation, infinite projection",
            "antialias": "abTEM 2/3 of Nyquist",
        },
    }


def wavelength_angstrom(energy_kev: float) -> float:
    """Relativistic electron wavelength (Å).

    Examples
    --------
    >>> round(wavelength_angstrom(300.0), 5)
    0.01969
    """
    e = energy_kev * 1e3
    return 12.2642598 / math.sqrt(e * (1.0 + 0.97846e-6 * e))


def _information_limit_nm(focal_rms_nm: float, energy_kev: float) -> float:
    # where the temporal envelope exp(-(π λ Δ)² k⁴ / 2) drops to exp(-2)
    lam = wavelength_angstrom(energy_kev)
    return float(math.sqrt(math.pi * lam * 10.0 * focal_rms_nm / 2.0) / 10.0)


def _blur_mtf(nu: np.ndarray, nu0: float, power: float) -> np.ndarray:
    return 1.0 / (1.0 + (nu / nu0) ** power)




def detect(
    intensity: np.ndarray,
    oversampling: int,
    dose_per_px: float,
    detector: dict[str, Any],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Detector pixels from an oversampled intensity: integrate, blur, count.

    Parameters
    ----------
    intensity
        ``[x, y]`` intensity (vacuum = 1), side ``oversampling · n``.
    oversampling
        Samples per detector pixel along each axis.
    dose_per_px
        Electrons per detector pixel in vacuum.
    detector
        ``mode`` (``counting``: blur then Poisson, white noise; ``integrating``: Poisson then blur),
        ``mtf_nu0`` and ``mtf_power`` of ``1 / (1 + (ν/ν₀)^p)``, ν in units of Nyquist.
    rng
        Source of the shot noise.

    Returns
    -------
    counts, expected
        ``[row, col]`` float32 counts and the noise-free expectation (after the blur).

    Examples
    --------
    >>> flat = np.ones((64, 64))
    >>> counts, expected = detect(flat, 2, 100.0, {"mode": "counting", "mtf_nu0": 2.0, "mtf_power": 2.0},
    ...                           np.random.default_rng(0))
    >>> counts.shape, round(float(expected.mean()), 6), abs(float(counts.mean()) - 100) < 3
    ((32, 32), 100.0, True)
    """
    n = intensity.shape[0] // oversampling
    side = n * oversampling
    binned = intensity[:side, :side].reshape(n, oversampling, n, oversampling).mean(axis=(1, 3))
    image = binned.T * dose_per_px  # [x, y] -> [row = y, col = x]
    ky = np.fft.fftfreq(image.shape[0])[:, None]
    kx = np.fft.rfftfreq(image.shape[1])[None, :]
    mtf = _blur_mtf(np.hypot(ky, kx) / 0.5, detector["mtf_nu0"], detector["mtf_power"])

    def blur(a: np.ndarray) -> np.ndarray:
        return np.fft.irfft2(np.fft.rfft2(a) * mtf, s=a.shape)

    expected = blur(image)
    if detector["mode"] == "counting":
        counts = rng.poisson(np.clip(expected, 0, None)).astype(np.float64)
    elif detector["mode"] == "integrating":
        counts = blur(rng.poisson(np.clip(image, 0, None)).astype(np.float64))
    else:
        raise ValueError(f"unknown detector mode {detector['mode']!r}")
    return counts.astype(np.float32), expected.astype(np.float32)


