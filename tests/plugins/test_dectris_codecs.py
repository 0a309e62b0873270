"""The DECTRIS codecs (`latticewatch_dectris.codecs`) against byte layouts typed out here and a numpy reference.

The simulator and the source share the codec module, so a round trip alone would not catch a codec
that is wrong both ways: the layouts below are written out byte by byte, and the bitshuffle + LZ4
codec is also checked against a plain numpy implementation of the published format.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dectris_stream import DTYPES, ref_bitshuffle_block, ref_bslz4_decode, ref_bslz4_encode
from latticewatch_dectris import codecs

# Eight uint16 values whose bit rows are easy to write down: bit 0 is set in elements 0 and 2
# (0b101 = 0x05), bit 1 in elements 1 and 2 (0b110 = 0x06), bit 15 in element 3 (0b1000 = 0x08).
KNOWN_VALUES = [1, 2, 3, 0x8000, 0, 0, 0, 0]
KNOWN_SHUFFLED = bytes([0x05, 0x06] + [0] * 13 + [0x08])
# One LZ4 block of 16 literals: token 0xF0 (15 literals, no match) + 1 extra length byte.
KNOWN_LZ4 = bytes([0xF0, 0x01]) + KNOWN_SHUFFLED
KNOWN_BSLZ4 = (
    bytes.fromhex("0000000000000010")  # 16 bytes decompressed
    + bytes.fromhex("00002000")  # 8192-byte blocks (the filter's default)
    + bytes.fromhex("00000012")  # first block: 18 compressed bytes
    + KNOWN_LZ4
)


def test_bitshuffle_known_layout():
    values = np.array(KNOWN_VALUES, "<u2")
    assert ref_bitshuffle_block(values) == KNOWN_SHUFFLED
    assert codecs.decode("bslz4", KNOWN_BSLZ4, np.dtype("<u2"), 8).tolist() == KNOWN_VALUES
    assert ref_bslz4_decode(codecs.encode("bslz4", values), np.dtype("<u2"), 8).tolist() == KNOWN_VALUES


def test_bitshuffle_leftover_elements_follow_raw():
    # 10 elements in 8-element (16-byte) blocks: one compressed block, then 2 elements as they are.
    values = np.arange(1, 11, dtype="<u2")
    payload = codecs.encode("bslz4", values, block_bytes=16)
    total, block_bytes = struct.unpack_from(">QI", payload)
    (first,) = struct.unpack_from(">I", payload, 12)
    assert (total, block_bytes) == (20, 16)
    assert payload[16 + first :] == values[8:].tobytes()
    assert len(payload) == 16 + first + 4
    assert codecs.decode("bslz4", payload, np.dtype("<u2"), 10).tolist() == values.tolist()


def test_lz4_hdf5_known_layout_with_a_stored_block():
    # Block 1: 16 bytes stored raw (compressed size == block size); block 2: 4 bytes as LZ4 literals.
    raw = bytes(range(20))
    payload = (
        struct.pack(">QI", 20, 16)
        + struct.pack(">I", 16)
        + raw[:16]
        + struct.pack(">I", 5)
        + bytes([0x40])  # token: 4 literals, no match
        + raw[16:]
    )
    assert codecs.decode("lz4-hdf5", payload, np.dtype("u1"), 20).tobytes() == raw
    encoded = codecs.encode("lz4-hdf5", np.frombuffer(raw, "u1"), 16)
    assert codecs.decode("lz4-hdf5", encoded, np.dtype("u1"), 20).tobytes() == raw


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from([8, 16, 32]),
    n=st.integers(0, 3000),
    block_groups=st.integers(1, 40),
    seed=st.integers(0, 2**32 - 1),
)
def test_bslz4_matches_numpy_reference(bits, n, block_groups, seed):
    dtype = np.dtype(DTYPES[bits]).newbyteorder("<")
    values = np.random.default_rng(seed).integers(0, 2 ** min(bits, 20), size=n).astype(dtype)
    block = 8 * block_groups
    # ours (bitshuffle package) → reference decoder, and reference encoder → ours
    assert np.array_equal(ref_bslz4_decode(codecs.encode("bslz4", values, block * dtype.itemsize), dtype, n), values)
    assert np.array_equal(codecs.decode("bslz4", ref_bslz4_encode(values, block), dtype, n), values)


@pytest.mark.parametrize("codec", ["lz4", "bslz4", "lz4-hdf5"])
def test_damaged_payloads_raise_decode_error(codec, rng):
    values = rng.integers(0, 50, size=5000).astype("<u2")
    payload = codecs.encode(codec, values, 1024 if codec != "lz4" else None)
    damaged = [payload[:-1], payload + b"\0", payload[: len(payload) // 2], b"", payload[:11]]
    for _ in range(200):
        mutable = bytearray(payload)
        mutable[rng.integers(len(mutable))] ^= 1 << int(rng.integers(8))
        damaged.append(bytes(mutable))
    for bad in damaged:
        try:
            out = codecs.decode(codec, bad, values.dtype, values.size)
        except codecs.DecodeError:
            continue
        assert out.shape == values.shape  # a flipped literal bit may still decode: to the right size
