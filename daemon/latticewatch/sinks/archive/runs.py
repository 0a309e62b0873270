"""Run-length coding of raveled frames, and the square dilation that makes the archive's margin.

Runs are taken over the frame raveled in C order (row after row), so a run may wrap from the
end of one row to the start of the next. Run lengths are uint32, or uint64 for frames of more
than 2**32 - 1 pixels.
"""

from __future__ import annotations

import numpy as np

__all__ = ["change_points", "dilate_square", "length_dtype", "rle", "run_lengths", "runs_to_bool"]

#: Above this many pixels run lengths need 64 bits.
_U32_LIMIT = 2**32 - 1


# ------------------------------------------------------------------------------------ dilation


def _shift_toward_low(x: np.ndarray, s: int) -> np.ndarray:
    """``y[c] = x[c + s]`` along the columns of a little-endian bit-packed uint64 array."""
    q, b = divmod(s, 64)
    y = np.zeros_like(x)
    n = x.shape[1] - q
    if n <= 0:
        return y
    if b == 0:
        y[:, :n] = x[:, q:]
    else:
        y[:, :n] = x[:, q:] >> np.uint64(b)
        y[:, : n - 1] |= x[:, q + 1 :] << np.uint64(64 - b)
    return y


def _shift_toward_high(x: np.ndarray, s: int) -> np.ndarray:
    """``y[c] = x[c - s]`` along the columns of a little-endian bit-packed uint64 array."""
    q, b = divmod(s, 64)
    y = np.zeros_like(x)
    n = x.shape[1] - q
    if n <= 0:
        return y
    if b == 0:
        y[:, q:] = x[:, :n]
    else:
        y[:, q:] = x[:, :n] << np.uint64(b)
        y[:, q + 1 :] |= x[:, : n - 1] >> np.uint64(64 - b)
    return y


def _rows_toward_low(x: np.ndarray, s: int) -> np.ndarray:
    y = np.zeros_like(x)
    if s < x.shape[0]:
        y[: x.shape[0] - s] = x[s:]
    return y


def _rows_toward_high(x: np.ndarray, s: int) -> np.ndarray:
    y = np.zeros_like(x)
    if s < x.shape[0]:
        y[s:] = x[: x.shape[0] - s]
    return y


def _window_or(x: np.ndarray, radius: int, shift) -> np.ndarray:
    """OR of ``x`` over a one-sided window of ``radius + 1`` in O(log radius) passes."""
    out = x.copy()
    covered = 1
    while covered < radius + 1:
        step = min(covered, radius + 1 - covered)
        out |= shift(out, step)
        covered += step
    return out


def dilate_square(a: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by a (2·radius+1)² square, zero outside the frame.

    The square (not a disc) is deliberate: it contains the disc of the same radius, so every
    pixel within ``radius`` of a set pixel is set — the margin is never short — and it is
    separable, which lets us work on bit-packed rows (64 columns per machine word) and reach
    ~10 ms at 4096² instead of the ~300 ms of ``scipy.ndimage.maximum_filter``.

    Examples
    --------
    >>> a = np.zeros((5, 5), bool); a[2, 2] = True
    >>> int(dilate_square(a, 1).sum())
    9
    """
    a = np.asarray(a, dtype=bool)
    if radius <= 0 or a.size == 0:
        return a.copy()
    rows, cols = a.shape
    words = -(-cols // 64)
    packed = np.zeros((rows, words * 8), np.uint8)
    packed[:, : -(-cols // 8)] = np.packbits(a, axis=1, bitorder="little")
    x = packed.view("<u8")
    # Forward and backward one-sided windows instead of one centred one: zeros enter at both
    # edges, so the frame border needs no padding.
    x = _window_or(x, radius, _shift_toward_low) | _window_or(x, radius, _shift_toward_high)
    x = _window_or(x, radius, _rows_toward_low) | _window_or(x, radius, _rows_toward_high)
    return np.unpackbits(x.view(np.uint8), axis=1, count=cols, bitorder="little").view(bool)


# ---------------------------------------------------------------------------------------- runs


def length_dtype(n: int) -> np.dtype:
    """The dtype of run lengths over ``n`` elements: uint32, or uint64 past its range."""
    return np.dtype(np.uint32) if n <= _U32_LIMIT else np.dtype(np.uint64)


def change_points(flat: np.ndarray) -> np.ndarray:
    """Indices where a new run starts (excluding 0)."""
    # ``!=`` on neighbours is ~8x faster than np.diff on uint8 and cannot wrap around.
    return np.flatnonzero(flat[1:] != flat[:-1]) + 1


def run_lengths(flat: np.ndarray, changes: np.ndarray | None = None) -> np.ndarray:
    """Alternating run lengths of a 1-D boolean array, starting with a (possibly empty) False run.

    Examples
    --------
    >>> run_lengths(np.array([True, True, False, True]))
    array([0, 2, 1, 1], dtype=uint32)
    """
    flat = np.asarray(flat, dtype=bool).ravel()
    n = flat.size
    if changes is None:
        changes = change_points(flat)
    bounds = np.concatenate(([0], changes, [n]))
    lengths = np.diff(bounds).astype(length_dtype(n))
    if n and flat[0]:
        lengths = np.concatenate((np.zeros(1, lengths.dtype), lengths))
    return lengths


def runs_to_bool(lengths: np.ndarray, n: int | None = None) -> np.ndarray:
    """Inverse of :func:`run_lengths`.

    Examples
    --------
    >>> runs_to_bool(np.array([0, 2, 1, 1]))
    array([ True,  True, False,  True])
    """
    lengths = np.asarray(lengths)
    values = np.zeros(lengths.size, bool)
    values[1::2] = True
    out = np.repeat(values, lengths.astype(np.intp, copy=False))
    if n is not None and out.size != n:
        raise ValueError(f"runs cover {out.size} pixels, expected {n}")
    return out


def rle(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Classic run-length code of a 1-D array: (value of each run, length of each run).

    Examples
    --------
    >>> values, lengths = rle(np.array([7, 7, 3]))
    >>> values.tolist(), lengths.tolist()
    ([7, 3], [2, 1])
    """
    n = flat.size
    if n == 0:
        return flat[:0].copy(), np.zeros(0, length_dtype(0))
    starts = np.concatenate(([0], change_points(flat)))
    lengths = np.diff(np.append(starts, n)).astype(length_dtype(n))
    return flat[starts], lengths
