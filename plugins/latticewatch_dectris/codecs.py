"""Pixel payload codecs of the DECTRIS streams: raw, LZ4 and bitshuffle + LZ4.

Three byte layouts occur on the wire:

``lz4`` (stream v1 ``lz4<``)
    One bare LZ4 block (the LZ4 *block* format, no frame, no size prefix); the decompressed size
    follows from the image shape and type.

``bslz4`` (stream v1 ``bs8-lz4<``/``bs16-lz4<``/``bs32-lz4<``, stream v2 ``bslz4``)
    The framing of the bitshuffle HDF5 filter: a 12-byte header (uint64 big-endian total
    decompressed size in bytes, uint32 big-endian block size in bytes), then for every block a
    uint32 big-endian compressed size followed by that many bytes of LZ4 block data. Each block
    holds ``block_size / itemsize`` elements, bit-transposed (bit *b* of every element in a row,
    elements LSB-first within each byte, rows from the least significant bit up) before LZ4. The
    last partial block is cut to a multiple of 8 elements and the remaining ``n % 8`` elements
    follow uncompressed and untransposed, without a size prefix.

``lz4-hdf5`` (stream v2 ``lz4``)
    The framing of the LZ4 HDF5 filter (id 32004): the same 12-byte header, then blocks each with
    a uint32 big-endian compressed size; a block whose compressed size equals its decompressed
    size is stored uncompressed.

Decoders walk the block sizes and check them against the buffer *before* anything is
decompressed, so a truncated or padded payload is a `DecodeError` and never an out-of-bounds
read inside a C extension (the bitshuffle kernel trusts the sizes it finds in the payload).
Decompression and the bit transposition are then left to the ``bitshuffle`` and ``lz4``
packages' C code.
"""

from __future__ import annotations

import struct

import bitshuffle
import lz4.block
import numpy as np

from latticewatch.errors import InputError

#: Header of the HDF5-style framings: total decompressed bytes, block size in bytes.
_HEADER = struct.Struct(">QI")
_BLOCK_SIZE = struct.Struct(">I")

#: Bitshuffle works on groups of 8 elements; partial blocks are cut to this multiple.
_BITSHUFFLE_MULTIPLE = 8

#: Block size the bitshuffle HDF5 filter (and so a DECTRIS detector) uses by default.
DEFAULT_BSLZ4_BLOCK_BYTES = 8192

#: Block size of the LZ4 HDF5 filter's default (1 GiB: one block per image in practice).
DEFAULT_LZ4_HDF5_BLOCK_BYTES = 1 << 30


class DecodeError(InputError):
    """A pixel payload does not match its declared layout (truncated, padded, corrupt)."""


def decode(codec: str, payload: bytes | memoryview, dtype: np.dtype, count: int) -> np.ndarray:
    """Decode a payload into a 1-D array of ``count`` elements of ``dtype``.

    Parameters
    ----------
    codec
        ``"raw"``, ``"lz4"``, ``"bslz4"`` or ``"lz4-hdf5"`` (see the module notes).
    payload
        The bytes as received.
    dtype
        Element type including byte order, e.g. ``np.dtype("<u2")``.
    count
        Number of elements the payload must hold.

    Returns
    -------
    numpy.ndarray
        1-D, ``dtype``, length ``count``; writable and independent of ``payload``.

    Raises
    ------
    DecodeError
        When the payload does not decode to exactly ``count * dtype.itemsize`` bytes.

    Examples
    --------
    >>> import numpy as np
    >>> a = np.arange(10, dtype="<u2")
    >>> decode("bslz4", encode("bslz4", a), a.dtype, 10).tolist() == a.tolist()
    True
    """
    nbytes = count * dtype.itemsize
    if codec == "bslz4":
        return _decode_bslz4(payload, dtype, nbytes)
    if codec == "raw":
        raw: bytes | bytearray | memoryview = payload
    elif codec == "lz4":
        raw = _lz4_block(payload, nbytes)
    elif codec == "lz4-hdf5":
        raw = _decode_lz4_hdf5(payload, nbytes)
    else:
        raise DecodeError(f"unknown codec {codec!r}")
    if len(raw) != nbytes:
        raise DecodeError(f"payload holds {len(raw)} bytes; shape and type need {nbytes}")
    pixels = np.frombuffer(raw, dtype=dtype)
    # Raw pixels are a view of the received message: copy, so the array is writable and does not
    # keep the whole message alive. The decompressed codecs already produced a fresh bytearray.
    return pixels.copy() if codec == "raw" else pixels


def encode(codec: str, pixels: np.ndarray, block_bytes: int | None = None) -> bytes:
    """Encode an array's elements (in C order) the way a detector does.

    Parameters
    ----------
    codec
        ``"raw"``, ``"lz4"``, ``"bslz4"`` or ``"lz4-hdf5"``.
    pixels
        Array of any shape; its dtype's byte order is kept as is.
    block_bytes
        Block size of the framed codecs; default 8 KiB for ``bslz4`` and 1 GiB for ``lz4-hdf5``
        (the filters' defaults). For ``bslz4`` it must be a multiple of ``8 * itemsize``.

    Returns
    -------
    bytes

    Examples
    --------
    >>> import numpy as np
    >>> len(encode("raw", np.zeros((2, 3), "<u4")))
    24
    """
    data = np.ascontiguousarray(pixels)
    if codec == "raw":
        return data.tobytes()
    if codec == "lz4":
        return lz4.block.compress(data.tobytes(), store_size=False)
    if codec == "bslz4":
        return _encode_bslz4(data, DEFAULT_BSLZ4_BLOCK_BYTES if block_bytes is None else block_bytes)
    if codec == "lz4-hdf5":
        return _encode_lz4_hdf5(data.tobytes(), DEFAULT_LZ4_HDF5_BLOCK_BYTES if block_bytes is None else block_bytes)
    raise ValueError(f"unknown codec {codec!r}")


def _lz4_block(payload: bytes | memoryview, nbytes: int) -> bytearray:
    try:
        raw = lz4.block.decompress(payload, uncompressed_size=nbytes, return_bytearray=True)
    except lz4.block.LZ4BlockError as err:
        raise DecodeError(f"corrupt LZ4 block: {err}") from err
    if len(raw) != nbytes:
        raise DecodeError(f"LZ4 block decompresses to {len(raw)} bytes; expected {nbytes}")
    return raw


def _read_header(buf: memoryview, nbytes: int) -> int:
    if len(buf) < _HEADER.size:
        raise DecodeError(f"payload of {len(buf)} bytes is shorter than the 12-byte header")
    total, block_bytes = _HEADER.unpack_from(buf)
    if total != nbytes:
        raise DecodeError(f"header says {total} decompressed bytes; shape and type need {nbytes}")
    if block_bytes == 0:
        raise DecodeError("header block size is 0")
    return block_bytes


def _read_block(buf: memoryview, pos: int) -> tuple[memoryview, int]:
    """The compressed bytes of the block at ``pos`` and the position after it, bounds-checked."""
    if pos + _BLOCK_SIZE.size > len(buf):
        raise DecodeError(f"payload ends inside a block header at byte {pos}")
    (size,) = _BLOCK_SIZE.unpack_from(buf, pos)
    start = pos + _BLOCK_SIZE.size
    if start + size > len(buf):
        raise DecodeError(f"block at byte {pos} claims {size} bytes; only {len(buf) - start} remain")
    return buf[start : start + size], start + size


def _bslz4_block_elements(count: int, block: int) -> list[int]:
    """Element counts of the compressed blocks, in the bitshuffle filter's order."""
    last = count % block
    last -= last % _BITSHUFFLE_MULTIPLE
    return [block] * (count // block) + ([last] if last else [])


def _decode_bslz4(payload: bytes | memoryview, dtype: np.dtype, nbytes: int) -> np.ndarray:
    buf = memoryview(payload).cast("B")
    block_bytes = _read_header(buf, nbytes)
    itemsize = dtype.itemsize
    if block_bytes % (_BITSHUFFLE_MULTIPLE * itemsize):
        raise DecodeError(f"block size {block_bytes} bytes is not a multiple of 8 elements of {itemsize} bytes")
    count, block = nbytes // itemsize, block_bytes // itemsize
    pos = _HEADER.size
    for _ in _bslz4_block_elements(count, block):
        pos = _read_block(buf, pos)[1]
    tail = (count % _BITSHUFFLE_MULTIPLE) * itemsize
    if pos + tail != len(buf):
        raise DecodeError(f"payload has {len(buf) - pos} bytes after its blocks; the layout leaves {tail}")
    # Every block now provably lies inside the buffer, and bitshuffle decompresses each with
    # LZ4_decompress_safe bounded by that block's size, so the C kernel cannot read past the end.
    body = np.frombuffer(buf, np.uint8, offset=_HEADER.size)
    try:
        return bitshuffle.decompress_lz4(body, (count,), dtype, block)
    except (RuntimeError, ValueError) as err:
        raise DecodeError(f"corrupt bitshuffle/LZ4 block: {err}") from err


def _encode_bslz4(data: np.ndarray, block_bytes: int) -> bytes:
    itemsize = data.dtype.itemsize
    if block_bytes <= 0 or block_bytes % (_BITSHUFFLE_MULTIPLE * itemsize):
        raise ValueError(f"block_bytes must be a positive multiple of {_BITSHUFFLE_MULTIPLE * itemsize}")
    body = bitshuffle.compress_lz4(data.reshape(-1), block_bytes // itemsize)
    return _HEADER.pack(data.nbytes, block_bytes) + body.tobytes()


def _decode_lz4_hdf5(payload: bytes | memoryview, nbytes: int) -> bytearray:
    buf = memoryview(payload).cast("B")
    block_bytes = _read_header(buf, nbytes)
    pieces, pos, remaining = [], _HEADER.size, nbytes
    while remaining:
        size = min(block_bytes, remaining)
        compressed, pos = _read_block(buf, pos)
        # The filter stores a block raw when LZ4 would not shrink it.
        pieces.append(compressed if len(compressed) == size else _lz4_block(compressed, size))
        remaining -= size
    if pos != len(buf):
        raise DecodeError(f"payload has {len(buf) - pos} bytes after its last block")
    return bytearray().join(pieces)


def _encode_lz4_hdf5(raw: bytes, block_bytes: int) -> bytes:
    if block_bytes <= 0:
        raise ValueError("block_bytes must be positive")
    out = [_HEADER.pack(len(raw), block_bytes)]
    for start in range(0, len(raw), block_bytes):
        block = raw[start : start + block_bytes]
        packed = lz4.block.compress(block, store_size=False)
        if len(packed) >= len(block):
            packed = block
        out += [_BLOCK_SIZE.pack(len(packed)), packed]
    return b"".join(out)
