"""What the DECTRIS plugin tests share: a consumer thread on a source, random frames, and a plain numpy
implementation of the bitshuffle + LZ4 (HDF5 framing) format, written from the format description and
independent of the bitshuffle package, to check the plugin's codecs against."""

from __future__ import annotations

import struct
import threading
import time

import lz4.block
import numpy as np

from latticewatch.frame import Frame, Rejected

SHAPE = (67, 131)  # 8777 px: several 8 KiB bitshuffle blocks, a partial block and a leftover element
DTYPES = {8: np.uint8, 16: np.uint16, 32: np.uint32}


class Consumer:
    """Runs ``source.frames`` in a thread, as the runner does, collecting what it yields."""

    def __init__(self, source, skip=None):
        self.source = source
        self.items: list[Frame | Rejected] = []
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(skip,), daemon=True)
        self.thread.start()

    def _run(self, skip):
        try:
            for item in self.source.frames(self.stop, skip):
                self.items.append(item)
        except BaseException as err:  # noqa: BLE001  # re-raised in close(), in the test's thread
            self.error = err

    def wait_for(self, condition, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert self.thread.is_alive(), f"source stopped early: {self.error!r}"
            got = [getattr(i, "frame_id", i) for i in self.items]
            assert time.monotonic() < deadline, f"timed out; got {got}, counters {self.source.counters}"
            time.sleep(0.005)

    def wait_items(self, n: int) -> list[Frame | Rejected]:
        self.wait_for(lambda: len(self.items) >= n)
        return self.items

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        assert not self.thread.is_alive(), "source did not honour the stop flag"
        if self.error is not None:
            raise self.error


def frames_of(rng, n, dtype=np.uint16, shape=SHAPE):
    """``n`` random frames of ``dtype``, values up to 70000 (or the dtype's maximum when smaller)."""
    top = min(np.iinfo(dtype).max, 70000)
    return [rng.integers(0, top, size=shape, endpoint=True).astype(dtype) for _ in range(n)]


def split_parts(payload: bytes) -> list[bytes]:
    """Undo the quarantine layout of a multipart message: 8-byte big-endian length, then the part."""
    parts, pos = [], 0
    while pos < len(payload):
        (size,) = struct.unpack_from(">Q", payload, pos)
        parts.append(payload[pos + 8 : pos + 8 + size])
        pos += 8 + size
    return parts


def good_frames(items):
    """The frames among what a source yielded (its rejections left out)."""
    return [item for item in items if isinstance(item, Frame)]


# Reference implementation of the bitshuffle + LZ4 (HDF5 framing) format in plain numpy,
# written from the format description, independent of the bitshuffle package.


def ref_bitshuffle_block(elements: np.ndarray) -> bytes:
    """Row b holds bit b of every element, element i at bit i % 8 of byte i // 8."""
    nbits = elements.dtype.itemsize * 8
    le = elements.astype(elements.dtype.newbyteorder("<"))
    bits = np.unpackbits(le.view(np.uint8).reshape(-1, elements.dtype.itemsize), axis=1, bitorder="little")
    return np.packbits(np.ascontiguousarray(bits.T).reshape(nbits, -1), axis=1, bitorder="little").tobytes()


def ref_bitunshuffle_block(data: bytes, dtype: np.dtype, count: int) -> np.ndarray:
    nbits = dtype.itemsize * 8
    rows = np.frombuffer(data, np.uint8).reshape(nbits, count // 8)
    bits = np.unpackbits(rows, axis=1, bitorder="little")  # (nbits, count)
    return np.packbits(np.ascontiguousarray(bits.T), axis=1, bitorder="little").view(dtype.newbyteorder("<")).ravel()


def ref_bslz4_encode(arr: np.ndarray, block: int) -> bytes:
    flat = arr.ravel()
    n, size = flat.size, arr.dtype.itemsize
    out = [struct.pack(">QI", flat.nbytes, block * size)]
    start = 0
    last = (n % block) - (n % block) % 8
    for count in [block] * (n // block) + ([last] if last else []):
        packed = lz4.block.compress(ref_bitshuffle_block(flat[start : start + count]), store_size=False)
        out += [struct.pack(">I", len(packed)), packed]
        start += count
    out.append(flat[start:].astype(arr.dtype.newbyteorder("<")).tobytes())
    return b"".join(out)


def ref_bslz4_decode(payload: bytes, dtype: np.dtype, n: int) -> np.ndarray:
    total, block_bytes = struct.unpack_from(">QI", payload)
    assert total == n * dtype.itemsize
    block, pos, out = block_bytes // dtype.itemsize, 12, []
    last = (n % block) - (n % block) % 8
    for count in [block] * (n // block) + ([last] if last else []):
        (size,) = struct.unpack_from(">I", payload, pos)
        raw = lz4.block.decompress(payload[pos + 4 : pos + 4 + size], uncompressed_size=count * dtype.itemsize)
        out.append(ref_bitunshuffle_block(raw, dtype, count))
        pos += 4 + size
    out.append(np.frombuffer(payload[pos:], dtype.newbyteorder("<")))
    assert sum(len(a) for a in out) == n
    return np.concatenate(out)
