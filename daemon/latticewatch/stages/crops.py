"""The classifier's view of a region: a fixed-size window at the model's sampling, as channels.

Training and inference call the same function, so a crop the CNN learnt from and a crop it is
shown beside the microscope are made identically. The window is centred on the region's centroid
and *not* resized: lattice fringes keep the spacing the network learnt (Au {111} is ~4.7 px at
0.05 nm/px), which is what separates a fault from a perfect crystal. Regions larger than the
window are seen in their central part; the mask channel tells the network where the particle is.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

Channel = Literal["image", "mask", "log_power"]


class CropSpec(BaseModel):
    """How a region becomes the CNN's input (the manifest's ``classifier.input``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size_px: int = Field(96, ge=16, description="side of the square window at the model's pixel size")
    channels: tuple[Channel, ...] = Field(("image", "mask", "log_power"), min_length=1)


def _window(array: np.ndarray, centre: tuple[float, float], size: int, *, standardise: bool = False) -> np.ndarray:
    """``size``² window of ``array`` centred on ``centre`` (row, col); zeros outside the array.

    ``standardise`` brings the part inside the array to mean 0, sd 1 before padding: the frame's
    normalisation (whole frame at inference, one crop in training, max or z-score) then no longer
    changes what the network sees.
    """
    out = np.zeros((size, size), dtype=np.float32)
    r0, c0 = int(round(centre[0])) - size // 2, int(round(centre[1])) - size // 2
    h, w = array.shape
    src = (slice(min(max(r0, 0), h), min(max(r0 + size, 0), h)), slice(min(max(c0, 0), w), min(max(c0 + size, 0), w)))
    dst = (slice(src[0].start - r0, src[0].stop - r0), slice(src[1].start - c0, src[1].stop - c0))
    part = np.asarray(array[src], dtype=np.float32)
    if standardise and part.size:
        part = (part - part.mean(dtype=np.float64)) / (part.std(dtype=np.float64) + 1e-6)
    out[dst] = part
    return out


def _log_power(window: np.ndarray) -> np.ndarray:
    """Log power spectrum of the Hann-tapered window, centred (fftshift) and standardised."""
    taper = np.outer(np.hanning(window.shape[0]), np.hanning(window.shape[1])).astype(np.float32)
    power = np.abs(np.fft.fftshift(np.fft.fft2((window - window.mean()) * taper))) ** 2
    logp = np.log1p(power).astype(np.float32)
    return (logp - logp.mean()) / (logp.std() + 1e-6)


def classifier_input(image: np.ndarray, region: np.ndarray, centroid: tuple[float, float],
                     spec: CropSpec) -> np.ndarray:
    """One region's CNN input, shape ``(len(spec.channels), size, size)`` float32.

    Parameters
    ----------
    image
        The normalised frame at the model's pixel size (`Preprocessed.image`); the window is
        standardised (mean 0, sd 1) whatever the normalisation.
    region
        Boolean mask of this region, same shape as ``image``.
    centroid
        The region's centroid (row, col) in ``image`` pixels.
    spec
        Window size and channels.

    Examples
    --------
    >>> img = np.random.default_rng(0).normal(size=(128, 128)).astype(np.float32)
    >>> mask = np.zeros((128, 128), bool); mask[40:80, 50:90] = True
    >>> classifier_input(img, mask, (59.5, 69.5), CropSpec(size_px=64)).shape
    (3, 64, 64)
    """
    pixels = _window(image, centroid, spec.size_px, standardise=True)
    inside = _window(region.astype(np.float32), centroid, spec.size_px)
    channels = {"image": lambda: pixels, "mask": lambda: inside, "log_power": lambda: _log_power(pixels)}
    return np.stack([channels[name]() for name in spec.channels]).astype(np.float32, copy=False)
