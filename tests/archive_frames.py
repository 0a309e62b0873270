"""What the archive tests share: frames and masks made by hand, an analysis to archive with them, and the
plain references the reduced pixels are checked against."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from latticewatch.frame import Analysis, Region


def reference_keep(mask: np.ndarray, low_value_class: int, margin_px: int) -> np.ndarray:
    """The pixels the archive keeps exactly: not of the low-value class, or within ``margin_px`` (square) of one."""
    high = mask != low_value_class
    if margin_px <= 0:
        return high
    return ndimage.maximum_filter(high, size=2 * margin_px + 1, mode="constant", cval=False)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-for-bit equality (NaN payloads and -0.0 included)."""
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def make_analysis(mask, *, confidence=0.97, pixel_size_nm=0.05, profile="nanoparticles", warnings=()):
    """An analysis of frame ``x`` with ``mask`` and one stacking-fault region."""
    region = Region(
        region_id=1,
        bbox=(2, 3, 10, 12),
        centroid_px=(6.0, 7.5),
        centroid_nm=(0.3, 0.375) if pixel_size_nm else None,
        area_px=50,
        area_nm2=0.125 if pixel_size_nm else None,
        equivalent_diameter_nm=0.4 if pixel_size_nm else None,
        eccentricity=0.3,
        solidity=0.95,
        touches_edge=False,
        agglomerate_suspect=False,
        features={"fft_peak": 1.5, "contrast": 0.2},
        label="stacking_fault",
        probabilities={"stacking_fault": 0.8, "no_stacking_fault": 0.2},
    )
    return Analysis(
        frame_id="x",
        mask=mask,
        regions=(region,),
        timings_s={"segment": 0.01},
        model_ids={"unet": "np-unet@1.0"},
        profile=profile,
        pixel_size_nm=pixel_size_nm,
        mean_confidence=confidence,
        warnings=tuple(warnings),
    )


def disc_mask(shape, centre, radius) -> np.ndarray:
    """A class-1 disc on class 0."""
    rr, cc = np.ogrid[: shape[0], : shape[1]]
    return (((rr - centre[0]) ** 2 + (cc - centre[1]) ** 2) <= radius**2).astype(np.uint8)


def noisy_frame(shape, seed=0, dtype=np.int16) -> np.ndarray:
    """Gaussian noise around 1000 (σ 30)."""
    rng = np.random.default_rng(seed)
    return rng.normal(1000, 30, shape).astype(dtype)
