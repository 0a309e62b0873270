"""Pure array code of the archive: reduce a frame to the arrays it stores, and restore it.

Nothing here touches files. :func:`reduce_frame` turns one frame (pixels + class mask) into a
:class:`ReducedFrame` — a handful of 1-D arrays — and :func:`restore_pixels` turns it back. The
HDF5 layout that stores those arrays lives in :mod:`latticewatch.sinks.archive.layout`; the
run-length coding and margin dilation it builds on in :mod:`~latticewatch.sinks.archive.runs`,
the packing of codes into bytes in :mod:`~latticewatch.sinks.archive.bitpack`.

Conventions (shared with the on-disk layout):

* Every run is taken over the frame raveled in C order (row after row), so runs may wrap from
  the end of one row to the start of the next.
* ``exact_runs`` holds alternating run lengths, *low-value first* (the first may be 0): the
  frame is ``low, exact, low, exact, …``. ``exact_pixels`` is the concatenation of the exact
  runs in the frame's own dtype. Everything not exact is the *low stream*: the concatenation of
  the low runs, which the policy encodes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from latticewatch.errors import ConfigError, InputError
from latticewatch.sinks.archive.bitpack import container_bits, pack_codes
from latticewatch.sinks.archive.runs import change_points, dilate_square, length_dtype, rle, run_lengths, runs_to_bool

__all__ = ["Policy", "ReducedFrame", "margin_to_pixels", "reduce_frame", "restore_mask", "restore_pixels"]

# --------------------------------------------------------------------------------------- policy


@dataclass(frozen=True)
class Policy:
    """How the low-value class is kept.

    ``drop`` replaces it by one fill value, ``mean`` by the mean of each run (runs are split at
    row ends, so a background-only row keeps its own level), ``quantize:N`` keeps N bits of it.

    Examples
    --------
    >>> Policy.parse("quantize:4")
    Policy(kind='quantize', fill=0.0, bits=4)
    >>> str(Policy.parse("drop:nan"))
    'drop:nan'
    """

    kind: str = "drop"
    fill: float = 0.0
    bits: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("drop", "mean", "quantize"):
            raise ConfigError(f"unknown archive policy {self.kind!r}: use drop[:FILL], mean or quantize:N")
        if self.kind == "quantize" and not 1 <= self.bits <= 16:
            raise ConfigError(f"quantize:N needs 1 <= N <= 16 bits, got {self.bits}")

    @classmethod
    def parse(cls, text: str | Policy) -> Policy:
        """Read ``drop``, ``drop:FILL``, ``mean`` or ``quantize:N``."""
        if isinstance(text, Policy):
            return text
        name, _, arg = str(text).strip().partition(":")
        name = name.strip().lower()
        try:
            if name == "drop":
                return cls("drop", fill=float(arg) if arg else 0.0)
            if name == "mean" and not arg:
                return cls("mean")
            if name == "quantize" and arg:
                return cls("quantize", bits=int(arg))
        except ValueError as exc:  # a number that is not one, or out of range (ConfigError above)
            raise ConfigError(f"bad archive policy {text!r}: {exc} (use drop[:FILL], mean or quantize:N)") from None
        raise ConfigError(f"bad archive policy {text!r}: use drop[:FILL], mean or quantize:N")

    def __str__(self) -> str:
        if self.kind == "drop":
            return "drop" if self.fill == 0 else f"drop:{self.fill:g}"
        if self.kind == "quantize":
            return f"quantize:{self.bits}"
        return self.kind


def margin_to_pixels(margin_nm: float, pixel_size_nm: float | None) -> tuple[int, str]:
    """Convert the margin to whole pixels, rounding up so that the margin is never short.

    Returns the radius and the unit it was read in (``"nm"``, or ``"px"`` when the pixel size is
    unknown and the number is taken as pixels).

    Examples
    --------
    >>> margin_to_pixels(0.5, 0.02)
    (25, 'nm')
    >>> margin_to_pixels(3, None)
    (3, 'px')
    """
    if margin_nm < 0:
        raise ConfigError(f"archive margin must be >= 0, got {margin_nm}")
    if pixel_size_nm is None:
        return math.ceil(round(margin_nm, 9)), "px"
    if pixel_size_nm <= 0:
        raise InputError(f"pixel size must be > 0 nm, got {pixel_size_nm}")
    # round() first: 0.5 / 0.02 is 25.000000000000004 and must not become 26
    return math.ceil(round(margin_nm / pixel_size_nm, 9)), "nm"


# ------------------------------------------------------------------------------- reduced frame


@dataclass(frozen=True)
class ReducedFrame:
    """One frame after data reduction: the arrays the archive stores (see module docstring).

    ``low_values`` / ``low_lengths`` encode the low stream per policy:

    * ``drop``: nothing; ``low_attrs["fill"]`` is the fill value.
    * ``mean``: one value per run (``low_values``, frame dtype) and its length.
    * ``quantize``: codes (uint8/uint16) either run-length coded (``low_attrs["encoding"] ==
      "rle"``, with ``low_lengths``) or one per pixel (``"dense"``, packed ``8 // container``
      codes to a byte, first code in the high bits) — whichever is smaller, as run-length
      coding a noisy background would *grow* it. Integer frames keep the top
      ``bits`` bits of ``value - offset`` (``low_attrs["shift"]``); float frames use a uniform
      step (``low_attrs["step"]``).
    """

    shape: tuple[int, int]
    dtype: str  # the frame's own dtype, byte order included (numpy ``dtype.str``)
    policy: Policy
    exact_runs: np.ndarray
    exact_pixels: np.ndarray  # native byte order, same kind and size as ``dtype``
    mask_values: np.ndarray | None = None
    mask_lengths: np.ndarray | None = None
    low_values: np.ndarray | None = None
    low_lengths: np.ndarray | None = None
    low_attrs: dict[str, Any] = field(default_factory=dict)
    lossless: bool = False
    lossless_reason: str = ""
    low_value_class: int = 0
    margin_px: int = 0

    @property
    def n_pixels(self) -> int:
        return int(self.shape[0]) * int(self.shape[1])

    @property
    def n_exact(self) -> int:
        return int(self.exact_pixels.size)

    @property
    def n_low(self) -> int:
        return self.n_pixels - self.n_exact

    @property
    def raw_nbytes(self) -> int:
        """Size of the frame as raw pixels in its own dtype."""
        return self.n_pixels * np.dtype(self.dtype).itemsize

    @property
    def exact_everywhere(self) -> bool:
        """True when every pixel is restored bit-exact (lossless frame or no low pixels)."""
        return self.n_low == 0


def _native(dtype: np.dtype) -> np.dtype:
    return dtype.newbyteorder("=") if dtype.byteorder not in ("=", "|") else dtype


def _fill_value(fill: float, dtype: np.dtype) -> np.generic:
    """The drop fill in the frame's dtype; integer frames get it rounded and clipped to range."""
    if dtype.kind in "iu":
        if not math.isfinite(fill):
            fill = 0.0
        info = np.iinfo(dtype)
        return dtype.type(min(max(int(round(fill)), int(info.min)), int(info.max)))
    with np.errstate(over="ignore"):
        return dtype.type(fill)


def reduce_frame(
    pixels: np.ndarray,
    mask: np.ndarray | None,
    *,
    low_value_class: int = 0,
    policy: str | Policy = "drop",
    margin_px: int = 0,
    lossless: bool = False,
    lossless_reason: str = "",
    quantize_encoding: str = "auto",
) -> ReducedFrame:
    """Reduce one frame: the non-low classes plus a margin exactly, the low class per policy.

    Parameters
    ----------
    pixels
        2-D frame in its own dtype (any integer or float type; other kinds are kept losslessly).
    mask
        Class map of the same shape (uint8), or ``None`` — then the frame must be ``lossless``.
    low_value_class
        The class that may be reduced (0 = background for nanoparticles, 1 = contamination for
        graphene). Every other class is "high value" and kept bit-exact.
    policy
        ``drop[:FILL]``, ``mean`` or ``quantize:N`` (see :class:`Policy`).
    margin_px
        Radius of the square margin around the high-value pixels that is also kept exactly.
    lossless
        Keep the whole frame exactly (safety valve, ``reduce = false``, no analysis).
    lossless_reason
        Why, for the record.
    quantize_encoding
        ``auto`` (smaller of the two), ``rle`` or ``dense``; only tests need the last two.

    Examples
    --------
    >>> px = np.arange(12, dtype=np.int16).reshape(3, 4)
    >>> m = np.zeros((3, 4), np.uint8); m[1, 1] = 1
    >>> r = reduce_frame(px, m, policy="drop")
    >>> restore_pixels(r)[1, 1], restore_pixels(r)[0, 0]
    (np.int16(5), np.int16(0))
    """
    pixels = np.asarray(pixels)
    if pixels.ndim != 2 or pixels.size == 0:
        raise ValueError(f"a frame must be a non-empty 2-D array, got shape {pixels.shape}")
    policy = Policy.parse(policy)
    dtype = pixels.dtype
    native = _native(dtype)
    # One copy at most: byte swap or de-striding; C-contiguous native frames are used in place.
    flat = np.ascontiguousarray(pixels, dtype=native).ravel()
    n = flat.size
    shape = (int(pixels.shape[0]), int(pixels.shape[1]))

    mask_values = mask_lengths = None
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != pixels.shape:
            raise ValueError(f"mask shape {mask.shape} does not match frame shape {pixels.shape}")
        if mask.dtype != np.uint8:
            if mask.size and (mask.min() < 0 or mask.max() > 255):
                raise ValueError("class mask values must fit in uint8")
            mask = mask.astype(np.uint8)
        mask_values, mask_lengths = rle(np.ascontiguousarray(mask).ravel())

    if dtype.kind not in "iuf" and not lossless:
        lossless, lossless_reason = True, f"dtype {dtype} is not reducible"
    if mask is None and not lossless:
        raise ValueError("a frame without a class mask can only be archived lossless")

    common = dict(
        shape=shape,
        dtype=dtype.str,
        policy=policy,
        mask_values=mask_values,
        mask_lengths=mask_lengths,
        low_value_class=int(low_value_class),
        margin_px=int(margin_px),
    )
    if lossless:
        return ReducedFrame(
            exact_runs=np.array([0, n], length_dtype(n)),
            exact_pixels=flat,
            lossless=True,
            lossless_reason=lossless_reason or "lossless",
            **common,
        )

    high = mask != low_value_class
    keep = dilate_square(high, margin_px) if margin_px > 0 else high
    keep_flat = keep.ravel()
    changes = change_points(keep_flat)
    exact_runs = run_lengths(keep_flat, changes)
    exact_pixels = flat[keep_flat]
    low_values = low_lengths = None
    low_attrs: dict[str, Any] = {}
    n_low = n - exact_pixels.size

    if policy.kind == "drop":
        low_attrs["fill"] = _fill_value(policy.fill, native)
    elif n_low == 0:
        pass
    elif policy.kind == "mean":
        low_values, low_lengths = _mean_runs(flat, keep_flat, changes, shape[1], native)
    else:
        low_values, low_lengths, low_attrs = _quantize(flat[~keep_flat], policy.bits, quantize_encoding)
    return ReducedFrame(
        exact_runs=exact_runs,
        exact_pixels=exact_pixels,
        low_values=low_values,
        low_lengths=low_lengths,
        low_attrs=low_attrs,
        **common,
    )


def _mean_runs(
    flat: np.ndarray, keep_flat: np.ndarray, changes: np.ndarray, width: int, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """Mean of each low run, runs split at row ends; values rounded into the frame's dtype."""
    n = flat.size
    row_starts = np.arange(width, n, width)
    # changes and row starts are both >= 1, so 0 is added by hand
    starts = np.concatenate(([0], np.union1d(changes, row_starts)))
    lengths = np.diff(np.append(starts, n))
    low = ~keep_flat[starts]
    if dtype.kind == "f" or dtype.itemsize == 8:
        acc = np.float64  # 64-bit integer sums could overflow int64; float64 is close enough for a mean
    elif dtype.itemsize <= 2 and width <= 2**15:
        acc = np.int32  # every run ends at a row end, so it sums at most 2**15 values < 2**16: no overflow
    else:
        acc = np.int64 if dtype.kind == "i" else np.uint64
    # reduceat over the whole frame reads it once and sums every run; keeping only the low runs
    # afterwards is cheaper than first gathering the low pixels into a copy.
    sums = np.add.reduceat(flat, starts, dtype=acc)[low]
    lengths = lengths[low]
    with np.errstate(invalid="ignore", over="ignore"):
        means = sums / lengths
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        high = float(info.max) if dtype.itemsize < 8 else np.nextafter(float(info.max), 0.0)
        means = np.clip(np.rint(means), float(info.min), high)
    with np.errstate(over="ignore", invalid="ignore"):
        values = means.astype(dtype)
    return values, lengths.astype(length_dtype(n))


def _quantize(low: np.ndarray, bits: int, encoding: str) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Quantize the low stream to ``bits`` bits and pick the smaller of RLE and dense codes."""
    dtype = low.dtype
    code_dtype = np.uint8 if bits <= 8 else np.uint16
    attrs: dict[str, Any] = {"bits": bits}
    if dtype.kind in "iu":
        # Integer frames: shift ``value - min`` right so that it fits in ``bits`` bits. Integer
        # arithmetic on an order-preserving unsigned view is exact for every width, int64 included.
        unsigned = np.dtype(f"u{dtype.itemsize}")
        bias = unsigned.type(1 << (8 * dtype.itemsize - 1)) if dtype.kind == "i" else unsigned.type(0)
        lo, hi = low.min(), low.max()
        u_lo = np.asarray(lo).reshape(1).view(unsigned)[0] ^ bias
        u_hi = np.asarray(hi).reshape(1).view(unsigned)[0] ^ bias
        shift = max(0, (int(u_hi) - int(u_lo)).bit_length() - bits)
        # ``low`` is our own gathered copy: work in place, no frame-sized temporaries.
        u = low.view(unsigned)
        if bias:
            u ^= bias
        u -= u_lo
        if shift:
            u >>= unsigned.type(shift)
        codes = u.astype(code_dtype)
        attrs.update(offset=lo, high=hi, shift=shift)
    else:
        work = np.float64 if dtype.itemsize == 8 else np.float32
        finite = np.isfinite(low)
        values = low if finite.all() else np.where(finite, low, low[finite].min() if finite.any() else 0)
        lo, hi = float(values.min()), float(values.max())
        levels = (1 << bits) - 1
        with np.errstate(over="ignore"):
            span = hi - lo
        if not math.isfinite(span):
            span = float(np.finfo(np.float64).max)
        step = span / levels if span > 0 else 1.0
        with np.errstate(over="ignore", invalid="ignore"):
            scaled = (values.astype(work) - work(lo)) * work(1.0 / step)
        codes = np.clip(np.rint(scaled), 0, levels).astype(code_dtype)
        attrs.update(offset=dtype.type(lo), high=dtype.type(hi), step=step)
    n_runs = int(np.count_nonzero(codes[1:] != codes[:-1])) + 1
    container = container_bits(bits)
    # A run costs its code plus a length (~16 bits after compression), a dense pixel its
    # container: below that break-even, run-length coding a noisy background would grow it.
    use_rle = encoding == "rle" or (encoding == "auto" and n_runs * (bits + 16) < codes.size * container)
    if use_rle:
        values, lengths = rle(codes)
        attrs["encoding"] = "rle"
        return values, lengths, attrs
    attrs.update(encoding="dense", container=container, count=codes.size)
    return pack_codes(codes, container), None, attrs


# ------------------------------------------------------------------------------------ restore


def _dequantize(codes: np.ndarray, a: dict[str, Any], dtype: np.dtype) -> np.ndarray:
    """Values of quantization codes (applied to small tables, not to frames)."""
    codes = np.minimum(codes, (1 << int(a["bits"])) - 1)  # unused codes of a wider container
    if dtype.kind in "iu":
        unsigned = np.dtype(f"u{dtype.itemsize}")
        bias = unsigned.type(1 << (8 * dtype.itemsize - 1)) if dtype.kind == "i" else unsigned.type(0)
        u_lo = np.asarray(a["offset"], dtype).reshape(1).view(unsigned)[0] ^ bias
        u_hi = np.asarray(a["high"], dtype).reshape(1).view(unsigned)[0] ^ bias
        shift = int(a["shift"])
        d_max = unsigned.type(u_hi - u_lo)
        d = codes.astype(unsigned) << unsigned.type(shift)
        if shift:
            # Restore to the middle of each bin, never past the largest value seen; written as
            # min(d, d_max - half) + half so that nothing overflows the unsigned type.
            half = unsigned.type(1 << (shift - 1))
            d = np.minimum(d, unsigned.type(d_max - half)) + half
        return ((d + u_lo) ^ bias).view(dtype)
    work = np.float64 if dtype.itemsize == 8 else np.float32
    lo, hi, step = float(a["offset"]), float(a["high"]), float(a["step"])
    with np.errstate(over="ignore", invalid="ignore"):
        values = work(lo) + codes.astype(work) * work(step)
    return np.clip(values, lo, hi).astype(dtype)


def _low_stream(r: ReducedFrame, dtype: np.dtype) -> np.ndarray:
    if r.policy.kind == "mean":
        return np.repeat(r.low_values, r.low_lengths.astype(np.intp, copy=False))
    a = r.low_attrs
    if a.get("encoding") == "rle":
        return np.repeat(_dequantize(r.low_values, a, dtype), r.low_lengths.astype(np.intp, copy=False))
    container, count = int(a["container"]), int(a["count"])
    if container >= 8:
        table = _dequantize(np.arange(1 << container), a, dtype)
        return np.take(table, r.low_values[:count])
    # Decode whole bytes at once: a 256-row table holds the values of the 8 // container codes
    # of every possible byte, read as one opaque item, so one gather writes them all.
    per = 8 // container
    byte = np.arange(256, dtype=np.uint8)
    codes = np.stack([(byte >> (8 - container * (j + 1))) & ((1 << container) - 1) for j in range(per)], axis=1)
    table = np.ascontiguousarray(_dequantize(codes, a, dtype)).view(np.dtype((np.void, per * dtype.itemsize)))
    return np.take(table.reshape(256), r.low_values).view(dtype)[:count]


def restore_pixels(reduced: ReducedFrame) -> np.ndarray:
    """Rebuild the frame: exact pixels bit-exact, low-value pixels as the policy left them.

    The result has the frame's original shape and dtype (byte order included).

    Examples
    --------
    >>> px = np.arange(6, dtype=np.uint16).reshape(2, 3)
    >>> r = reduce_frame(px, None, lossless=True)
    >>> np.array_equal(restore_pixels(r), px)
    True
    """
    r = reduced
    dtype = np.dtype(r.dtype)
    native = _native(dtype)
    n = r.n_pixels
    if r.exact_everywhere:
        out = np.array(r.exact_pixels, dtype=native, copy=True)
    else:
        keep = runs_to_bool(r.exact_runs, n)
        if r.policy.kind == "drop":
            out = np.full(n, r.low_attrs.get("fill", 0), dtype=native)
        else:
            out = np.empty(n, native)
            out[~keep] = _low_stream(r, native)
        out[keep] = r.exact_pixels
    out = out.reshape(r.shape)
    return out if dtype == native else out.astype(dtype)


def restore_mask(reduced: ReducedFrame) -> np.ndarray | None:
    """Rebuild the class mask (uint8), or ``None`` when the frame was archived without one.

    Examples
    --------
    >>> m = np.eye(3, dtype=np.uint8)
    >>> np.array_equal(restore_mask(reduce_frame(np.zeros((3, 3)), m)), m)
    True
    """
    r = reduced
    if r.mask_values is None or r.mask_lengths is None:
        return None
    return np.repeat(r.mask_values, r.mask_lengths.astype(np.intp, copy=False)).reshape(r.shape)
