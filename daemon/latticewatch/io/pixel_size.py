"""Pixel sizes a frame may be analysed at: one set of bounds for every reader, source and the analyser.

A pixel size comes from a file header, a SerialEM mdoc, a stream header or a calibration file.
Two kinds of bad value occur in practice:

* **Garbage** (NaN, ±Inf, 0, negative, 1e-9, 1e30): a header field never set, a unit mix-up, a
  corrupt or hostile message. `check_pixel_size` refuses anything that is not a finite number
  inside `PIXEL_SIZE_RANGE_NM`, 0.001–1 nm per pixel: HRTEM lattice imaging lives well inside
  it, and a frame coarser than 1 nm/px cannot show the lattice the models look at.
* **Valid but far from the model** (a 256² frame at 2 nm/px for a model trained at 0.05 nm/px is
  upsampled 40×: 10,240² pixels, minutes and gigabytes for one frame). `check_resampling`
  refuses a resampling that enlarges by more than `MAX_UPSAMPLING` per axis, that gives more
  than `MAX_MODEL_PIXELS`, or that leaves a side shorter than `latticewatch.frame.MIN_SIDE_PX`.

Both raise `PixelSizeError` (a `latticewatch.errors.FrameError`) with a message that names the
value, where it came from and the bounds, so a frame with such a pixel size is quarantined with a
clear reason (and archived whole) instead of failing somewhere inside a stage. Readers keep their
own, wider `PLAUSIBLE_PIXEL_NM` filter, which only decides whether a header value is a pixel size
at all (a diffraction calibration is not); the analyser applies these bounds to every frame, and
the stream source to every header before it spools a frame.
"""

from __future__ import annotations

import math
from typing import Any

from latticewatch.errors import FrameError
from latticewatch.frame import MIN_SIDE_PX

#: Pixel sizes (nm) a frame may be analysed at.
PIXEL_SIZE_RANGE_NM = (0.001, 1.0)
#: Header values (nm) outside this range are not pixel sizes at all (readers treat them as unknown):
#: header garbage, or a reciprocal-space calibration (diffraction) mislabelled as real space.
PLAUSIBLE_PIXEL_NM = (1e-4, 1e5)
#: Largest enlargement per axis when resampling a frame to the model's pixel size.
MAX_UPSAMPLING = 4.0
#: Largest model-resolution image one frame may become (6144², about 150 MB as float32).
MAX_MODEL_PIXELS = 6144 * 6144


class PixelSizeError(FrameError):
    """A pixel size that cannot be used: not a number, out of bounds, or too far from the model's."""


def check_pixel_size(value: Any, *, where: str = "pixel size") -> float:
    """``value`` as a float nm/px inside `PIXEL_SIZE_RANGE_NM`, or `PixelSizeError` saying why not.

    ``where`` names the value for the message (``"stack.mrc.mdoc [ZValue = 3] PixelSpacing"``).

    Examples
    --------
    >>> check_pixel_size(0.05)
    0.05
    >>> check_pixel_size(float("nan"), where="mdoc PixelSpacing")
    Traceback (most recent call last):
    ...
    latticewatch.io.pixel_size.PixelSizeError: mdoc PixelSpacing: nan nm per pixel is not a finite number
    """
    if isinstance(value, bool):  # True is an int to Python, never a pixel size
        raise PixelSizeError(f"{where}: {value!r} is not a number")
    try:
        nm = float(value)
    except (TypeError, ValueError):
        raise PixelSizeError(f"{where}: {value!r} is not a number") from None
    if not math.isfinite(nm):
        raise PixelSizeError(f"{where}: {nm} nm per pixel is not a finite number")
    low, high = PIXEL_SIZE_RANGE_NM
    if not low <= nm <= high:
        raise PixelSizeError(f"{where}: {nm:g} nm per pixel is outside the accepted {low:g}–{high:g} nm "
                             "(a header or unit error?)")
    return nm


def check_resampling(shape: tuple[int, ...], pixel_size_nm: float, model_pixel_size_nm: float | None, *,
                     where: str = "frame") -> None:
    """Refuse resampling a ``shape`` frame at ``pixel_size_nm`` to the model's sampling when it is absurd.

    Examples
    --------
    >>> check_resampling((4096, 4096), 0.025, 0.05)  # halved: fine
    >>> check_resampling((256, 256), 2.0, 0.05, where="cam:a.mrc#0")
    Traceback (most recent call last):
    ...
    latticewatch.io.pixel_size.PixelSizeError: cam:a.mrc#0: 2 nm per pixel would be enlarged 40× to the model's \
0.05 nm; at most 4× is allowed (is the pixel size right?)
    """
    if not model_pixel_size_nm:
        return
    factor = pixel_size_nm / model_pixel_size_nm
    if factor > MAX_UPSAMPLING:
        raise PixelSizeError(f"{where}: {pixel_size_nm:g} nm per pixel would be enlarged {factor:.3g}× to the "
                             f"model's {model_pixel_size_nm:g} nm; at most {MAX_UPSAMPLING:g}× is allowed "
                             "(is the pixel size right?)")
    rows, cols = (round(n * factor) for n in shape[:2])
    if rows * cols > MAX_MODEL_PIXELS:
        raise PixelSizeError(f"{where}: resampled to the model's {model_pixel_size_nm:g} nm per pixel it would be "
                             f"{cols}×{rows} pixels, above the limit of {MAX_MODEL_PIXELS} "
                             f"({math.isqrt(MAX_MODEL_PIXELS)}²)")
    if min(rows, cols) < MIN_SIDE_PX:
        raise PixelSizeError(f"{where}: resampled to the model's {model_pixel_size_nm:g} nm per pixel it would be "
                             f"only {cols}×{rows} pixels; at least {MIN_SIDE_PX} per side is needed "
                             "(is the pixel size right?)")
