"""`latticewatch.stages.preprocess` on torch tensors, so a GPU backend preprocesses where it segments.

The same steps in the same order as `preprocess.preprocess` (resample to the model's pixel size,
exact 3×3 median with mirrored edges, normalise), on any torch device, computed as scipy and numpy
compute them (float64 where they use it). On the CPU the results equal the numpy stage's bit for bit
for the median, block-mean resampling, ``max`` and ``zscore``; Gaussian + linear resampling is within
one float32 rounding (≤ 2e-7 of the range); ``percentile`` and ``bezier_zscore`` within 2e-6, where
sums are taken in another order. On a CUDA device, division by a scalar is multiplication by its
reciprocal, one more rounding. ``tests/stages/test_preprocess_torch.py`` holds both to the numpy stage.

torch is imported here at module level: only the torch backend (``models.backends.torch_cuda``)
imports this module, and only once torch is known to be there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from latticewatch.stages.preprocess import Normalisation, Preprocessed, _block_size


def _mirror_index(n: int, before: int, after: int, device: torch.device) -> torch.Tensor:
    """Indices extending an axis of length ``n`` by ``before``/``after`` samples, mirrored about the
    edge pixels' outer edges (``d c b a | a b c d``: numpy's ``symmetric``, scipy's ``reflect``),
    repeating as scipy does when the extension is longer than the axis."""
    i = torch.remainder(torch.arange(-before, n + after, device=device), 2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def _pad_mirror(image: torch.Tensor, rows: tuple[int, int], cols: tuple[int, int]) -> torch.Tensor:
    h, w = image.shape
    return image[_mirror_index(h, *rows, image.device)][:, _mirror_index(w, *cols, image.device)]


def median3x3(image: torch.Tensor) -> torch.Tensor:
    """Exact 3×3 median with mirrored edges, the same sorting network as `preprocess.median3x3`.

    Examples
    --------
    >>> median3x3(torch.tensor([[0, 0, 0], [0, 9, 0], [0, 0, 0]])).max().item()
    0
    """
    p = _pad_mirror(image, (1, 1), (1, 1))
    top, mid, bot = p[:-2], p[1:-1], p[2:]
    lo, mid = torch.minimum(top, mid), torch.maximum(top, mid)
    mid, hi = torch.minimum(mid, bot), torch.maximum(mid, bot)
    lo, mid = torch.minimum(lo, mid), torch.maximum(lo, mid)
    # each padded column now holds its sorted (lo, mid, hi); combine three adjacent columns
    max_lo = torch.maximum(torch.maximum(lo[:, :-2], lo[:, 1:-1]), lo[:, 2:])
    min_hi = torch.minimum(torch.minimum(hi[:, :-2], hi[:, 1:-1]), hi[:, 2:])
    a, b, c = mid[:, :-2], mid[:, 1:-1], mid[:, 2:]
    med_mid = torch.maximum(torch.minimum(a, b), torch.minimum(torch.maximum(a, b), c))
    return torch.maximum(torch.minimum(max_lo, med_mid), torch.minimum(torch.maximum(max_lo, med_mid), min_hi))


def _bernstein2(t: torch.Tensor) -> torch.Tensor:
    return torch.stack([(1 - t) ** 2, 2 * t * (1 - t), t**2], dim=-1)


def bezier_background(image: torch.Tensor, subsample: int = 8) -> torch.Tensor:
    """`preprocess.bezier_background` in float64 on the image's device (separable least squares).

    Examples
    --------
    >>> yy, xx = torch.meshgrid(torch.arange(64.0) / 64, torch.arange(64.0) / 64, indexing="ij")
    >>> surface = 1 + 0.5 * xx * (1 - yy)
    >>> bool((bezier_background(surface, subsample=1) - surface).abs().max() < 1e-9)
    True
    """
    h, w = image.shape
    s = max(1, min(subsample, h // 4, w // 4))
    hh, ww = (h // s) * s, (w // s) * s
    coarse = image[:hh, :ww].double().reshape(hh // s, s, ww // s, s).mean(dim=(1, 3))
    grid = {"dtype": torch.float64, "device": image.device}
    bu = _bernstein2((torch.arange(coarse.shape[0], **grid) + 0.5) * s / h)
    bv = _bernstein2((torch.arange(coarse.shape[1], **grid) + 0.5) * s / w)
    coeffs = torch.linalg.pinv(bu) @ coarse @ torch.linalg.pinv(bv).T
    rows = _bernstein2((torch.arange(h, **grid) + 0.5) / h) @ coeffs
    return rows @ _bernstein2((torch.arange(w, **grid) + 0.5) / w).T


def _percentiles(x: torch.Tensor, qs: tuple[float, ...]) -> list[float]:
    """numpy's default (linear) percentiles; `torch.quantile` refuses inputs over 2²⁴ values."""
    ordered = x.flatten().sort().values
    n = ordered.numel()
    out = []
    for q in qs:
        position = q / 100 * (n - 1)
        below = int(position)
        low, high = ordered[below].item(), ordered[min(below + 1, n - 1)].item()
        out.append(low + (high - low) * (position - below))
    return out


def normalise(image: torch.Tensor, method: Normalisation) -> torch.Tensor:
    """`preprocess.normalise` on a tensor; returns float32 on the same device.

    Examples
    --------
    >>> z = normalise(torch.tensor([[1.0, 3.0], [5.0, 7.0]]), "zscore")
    >>> round(z.mean().item(), 6), round(z.std(correction=0).item(), 6)
    (0.0, 1.0)
    """
    x = image.to(torch.float32)
    if method == "max":
        peak = x.max().item()
        return x / peak if peak > 0 else torch.zeros_like(x)
    if method == "percentile":
        lo, hi = _percentiles(x, (0.5, 99.5))
        return ((x - lo) / max(hi - lo, 1e-12)).clamp_(0, 1)
    if method == "bezier_zscore":
        flat = x / bezier_background(x).clamp_min(1e-12).to(torch.float32)
        sigma = (flat.double() - 1.0).square().mean().sqrt().item()
        return (flat - flat.double().mean().item()) / max(sigma, 1e-12)
    if method == "zscore":
        wide = x.double()
        mean, sigma = wide.mean().item(), wide.std(correction=0).item()
        return (x - mean) / max(sigma, 1e-12)
    raise ValueError(f"unknown normalisation {method!r}; use 'max', 'percentile', 'bezier_zscore' or 'zscore'")


def _gaussian(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """``scipy.ndimage.gaussian_filter(image, sigma)`` on float32 (truncate 4, mirrored edges): each
    axis in float64 and stored as float32 before the next, as scipy does."""
    radius = int(4.0 * sigma + 0.5)
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64, device=image.device)
    kernel = torch.exp(-0.5 * taps**2 / sigma**2)
    kernel /= kernel.sum()
    x = _pad_mirror(image, (radius, radius), (0, 0)).double()[None, None]
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))[0, 0].to(torch.float32)
    x = _pad_mirror(x, (0, 0), (radius, radius)).double()[None, None]
    return F.conv2d(x, kernel.view(1, 1, 1, -1))[0, 0].to(torch.float32)


def _linear(image: torch.Tensor, n_out: int, dim: int) -> torch.Tensor:
    """Linear interpolation along ``dim`` to ``n_out`` samples on the pixel-edge grid, as
    ``ndimage.zoom(order=1, grid_mode=True, mode="grid-mirror")``: output ``o`` samples input
    coordinate ``(o + ½)·n_in/n_out − ½``; beyond the outer pixel centres the mirrored neighbour is
    the edge pixel itself. Coordinates and weights in float64, as scipy computes them."""
    n_in = image.shape[dim]
    coord = (torch.arange(n_out, dtype=torch.float64, device=image.device) + 0.5) * (n_in / n_out) - 0.5
    below = coord.floor()
    weight = coord - below
    i0, i1 = below.long().clamp(0, n_in - 1), (below.long() + 1).clamp(0, n_in - 1)
    shape = [1, 1]
    shape[dim] = n_out
    weight = weight.view(shape)
    return image.index_select(dim, i0) * (1 - weight) + image.index_select(dim, i1) * weight


def resample(image: torch.Tensor, factor: float) -> torch.Tensor:
    """`preprocess.resample` on a float32 tensor: block means for whole shrink factors, else a
    Gaussian anti-alias (when shrinking) and linear interpolation (rows, then columns).

    Examples
    --------
    >>> resample(torch.ones(8, 8), 0.5).shape
    torch.Size([4, 4])
    """
    if abs(factor - 1.0) < 1e-3:
        return image
    k = _block_size(factor)
    if k is not None:
        h, w = (image.shape[0] // k) * k, (image.shape[1] // k) * k
        # a sum then one division: the numbers numpy's float32 mean gives (exactly, for integer counts)
        return image[:h, :w].reshape(h // k, k, w // k, k).sum(dim=(1, 3)) / (k * k)
    if factor < 1:
        image = _gaussian(image, 0.5 / factor)
    rows, cols = (int(round(n * factor)) for n in image.shape)
    return _linear(_linear(image.double(), rows, 0), cols, 1).to(torch.float32)


@dataclass(frozen=True)
class DevicePreprocessed:
    """`Preprocessed` with its images still on the device."""

    image: torch.Tensor
    scale: float
    pixel_size_nm: float | None
    feature_image: torch.Tensor

    def to_host(self) -> Preprocessed:
        """The numpy `Preprocessed` the analyser's later stages read (one copy when both images are one)."""
        image = self.image.cpu().numpy()
        same = self.feature_image is self.image
        return Preprocessed(image, self.scale, self.pixel_size_nm, image if same else self.feature_image.cpu().numpy())


def preprocess_torch(
    pixels: torch.Tensor,
    pixel_size_nm: float | None,
    *,
    normalisation: Normalisation,
    model_pixel_size_nm: float | None,
    feature_normalisation: Normalisation | None = None,
) -> DevicePreprocessed:
    """`preprocess.preprocess` on a 2-D tensor of any dtype, on its device.

    The frame is converted to float32 first: the median commutes with that (monotonic) rounding,
    so the result equals the numpy stage's, which filters in the frame's own dtype.

    Examples
    --------
    >>> out = preprocess_torch(torch.ones(64, 64), 0.025, normalisation="max", model_pixel_size_nm=0.05)
    >>> tuple(out.image.shape), out.scale
    ((32, 32), 0.5)
    """
    scale, sampled_nm, image = 1.0, pixel_size_nm, pixels.to(torch.float32)
    if pixel_size_nm and model_pixel_size_nm and abs(pixel_size_nm / model_pixel_size_nm - 1.0) >= 1e-3:
        image = resample(image, pixel_size_nm / model_pixel_size_nm)
        scale = image.shape[0] / pixels.shape[0]
        sampled_nm = pixel_size_nm / scale
    filtered = median3x3(image)
    model_image = normalise(filtered, normalisation)
    own = feature_normalisation is not None and feature_normalisation != normalisation
    feature_image = normalise(filtered, feature_normalisation) if own else model_image
    return DevicePreprocessed(model_image, scale, sampled_nm, feature_image)
