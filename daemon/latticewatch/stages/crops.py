"""The classifier's view of a region: a fixed-size window at the model's sampling, as channels.

Training and inference call the same function, so a crop the CNN learnt from and a crop it is
shown beside the microscope are made identically. The window is centred on the region's centroid
and *not* resized: lattice fringes keep the spacing the network learnt (Au {111} is ~4.7 px at
0.05 nm/px), which is what separates a fault from a perfect crystal. Regions larger than the
window are seen in their central part; the mask channel tells the network where the particle is.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

Channel = Literal["image", "mask", "log_power"]


class CropSpec(BaseModel):
    """How a region becomes the CNN's input (the manifest's ``classifier.input``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size_px: int = Field(96, ge=16, description="side of the square window at the model's pixel size")
    channels: tuple[Channel, ...] = Field(("image", "mask", "log_power"), min_length=1)


def _window(array: np.ndarray, centre: tuple[float, float], size: int, *, standardise: bool = False,
            dtype: np.dtype | type = np.float32) -> np.ndarray:
    """``size``² window of ``array`` centred on ``centre`` (row, col); zeros outside the array.

    ``standardise`` brings the part inside the array to mean 0, sd 1 before padding: the frame's
    normalisation (whole frame at inference, one crop in training, max or z-score) then no longer
    changes what the network sees.
    """
    out = np.zeros((size, size), dtype=dtype)
    r0, c0 = int(round(centre[0])) - size // 2, int(round(centre[1])) - size // 2
    h, w = array.shape
    src = (slice(min(max(r0, 0), h), min(max(r0 + size, 0), h)), slice(min(max(c0, 0), w), min(max(c0 + size, 0), w)))
    dst = (slice(src[0].start - r0, src[0].stop - r0), slice(src[1].start - c0, src[1].stop - c0))
    part = np.asarray(array[src], dtype=dtype)
    if standardise and part.size:
        part = (part - part.mean(dtype=np.float64)) / (part.std(dtype=np.float64) + 1e-6)
    out[dst] = part
    return out


@lru_cache(maxsize=4)
def _taper(size: int) -> np.ndarray:
    return np.outer(np.hanning(size), np.hanning(size)).astype(np.float32)


def _log_power(windows: np.ndarray) -> np.ndarray:
    """Log power spectrum of each Hann-tapered window (the last two axes), centred (fftshift) and standardised.

    Several windows go through one FFT call: the same numbers per window, without numpy's per-call
    overhead, which is most of the time for a 96² window.
    """
    axes = (-2, -1)
    centred = windows - windows.mean(axis=axes, keepdims=True)
    power = np.abs(np.fft.fftshift(np.fft.fft2(centred * _taper(windows.shape[-1]), axes=axes), axes=axes)) ** 2
    logp = np.log1p(power).astype(np.float32)
    return (logp - logp.mean(axis=axes, keepdims=True)) / (logp.std(axis=axes, keepdims=True) + 1e-6)


def _stack_channels(pixels: np.ndarray, inside: np.ndarray, spec: CropSpec) -> np.ndarray:
    """The requested channels of windows ``(..., size, size)`` (``pixels`` standardised, ``inside`` 0/1),
    stacked on the axis before the window's: ``(..., channels, size, size)`` float32."""
    channels = {"image": lambda: pixels, "mask": lambda: inside, "log_power": lambda: _log_power(pixels)}
    return np.stack([channels[name]() for name in spec.channels], axis=-3).astype(np.float32, copy=False)


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
    return _stack_channels(pixels, _window(region.astype(np.float32), centroid, spec.size_px), spec)


def labelled_inputs(image: np.ndarray, labels: np.ndarray, regions: Sequence[tuple[int, tuple[float, float]]],
                    spec: CropSpec) -> np.ndarray:
    """The CNN inputs of several regions of one labelled frame, shape ``(N, channels, size, size)``.

    The same arrays as `classifier_input` with ``labels == label`` for each region, but the label
    test runs on each window only: on a 2048² model image with 70 regions the whole-frame masks
    cost ~120 ms, the windows well under 1 ms.

    Parameters
    ----------
    image
        The normalised frame at the model's pixel size.
    labels
        The regions' labels (0 background), same shape as ``image``.
    regions
        ``(label, centroid)`` of each region, in the order wanted.
    spec
        Window size and channels.

    Examples
    --------
    >>> img = np.random.default_rng(0).normal(size=(128, 128)).astype(np.float32)
    >>> labels = np.zeros((128, 128), np.int32); labels[40:80, 50:90] = 1
    >>> labelled_inputs(img, labels, [(1, (59.5, 69.5))], CropSpec(size_px=64)).shape
    (1, 3, 64, 64)
    """
    size = spec.size_px
    pixels, inside = np.empty((2, len(regions), size, size), np.float32)
    for i, (label, centroid) in enumerate(regions):
        pixels[i] = _window(image, centroid, size, standardise=True)
        # labels outside the frame read as 0, never a region's label: the mask is 0 there as in classifier_input
        inside[i] = _window(labels, centroid, size, dtype=labels.dtype) == label
    return _stack_channels(pixels, inside, spec)
