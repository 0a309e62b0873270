"""The native ZeroMQ frame stream: the protocol, and a source that receives it (SUB or PULL).

Protocol ``latticewatch-stream/1``
----------------------------------
Each frame is one two-part ZeroMQ message:

1. a UTF-8 JSON header::

       {"protocol": "latticewatch-stream/1", "type": "frame",
        "series": "2024-06-01_grid3",   # unique per acquisition series
        "frame": 17,                    # 0-based, consecutive within the series
        "shape": [4096, 4096],          # rows, cols
        "dtype": "uint16",              # uint8 uint16 uint32 int8 int16 int32 float16 float32 float64
        "byteorder": "<",               # "<" little, ">" big ("|" for 1-byte types)
        "pixel_size_nm": 0.025,         # or null when unknown
        "acquired_at": "2024-06-01T10:38:23.5+00:00",  # ISO 8601, or null
        "meta": {}}                     # optional, any JSON object

2. the pixels, C order, exactly ``rows * cols * itemsize`` bytes.

A series may end with the one-part message ``{"protocol": ..., "type": "series_end",
"series": ..., "frames": N}``, which lets the receiver report frames missing at the end.

The receiver counts gaps in frame numbers per series (``gaps``: frames never received) and
answers a malformed message (bad JSON, unknown protocol/dtype, missing keys, a pixel buffer
whose size does not match the shape, a shape above ``max_pixels``) with a `Rejected` carrying
the raw message, then goes on. ``frame_id`` is ``<source name>:<series>#<frame>``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any, Literal

import numpy as np
import zmq

from latticewatch.errors import InputError
from latticewatch.frame import MIN_SIDE_PX, Frame, Rejected
from latticewatch.io.jsonio import parse_timestamp
from latticewatch.io.readers import DEFAULT_MAX_PIXELS
from latticewatch.sources.base import SkipFn, StopFlag

log = logging.getLogger(__name__)

PROTOCOL = "latticewatch-stream/1"
DTYPES = ("uint8", "uint16", "uint32", "int8", "int16", "int32", "float16", "float32", "float64")
BYTEORDERS = ("<", ">", "|")
POLL_MS = 100


class MessageError(InputError):
    """A stream message that does not follow the protocol; the message says how."""


def encode_frame(
    pixels: np.ndarray,
    *,
    series: str,
    number: int,
    pixel_size_nm: float | None = None,
    acquired_at: datetime | None = None,
    meta: dict[str, Any] | None = None,
) -> list[bytes]:
    """The two message parts for one frame.

    Examples
    --------
    >>> header, data = encode_frame(np.zeros((16, 16), np.uint16), series="s", number=0)
    >>> json.loads(header)["shape"], len(data)
    ([16, 16], 512)
    """
    pixels = np.ascontiguousarray(pixels, dtype=pixels.dtype.newbyteorder("<"))
    header = {
        "protocol": PROTOCOL,
        "type": "frame",
        "series": series,
        "frame": int(number),
        "shape": list(pixels.shape),
        "dtype": pixels.dtype.name,
        "byteorder": "|" if pixels.dtype.itemsize == 1 else "<",
        "pixel_size_nm": pixel_size_nm,
        "acquired_at": acquired_at.isoformat() if acquired_at else None,
        "meta": meta or {},
    }
    return [json.dumps(header).encode(), pixels.tobytes()]


def encode_series_end(series: str, frames: int) -> list[bytes]:
    """The one-part message that closes a series of ``frames`` frames."""
    return [json.dumps({"protocol": PROTOCOL, "type": "series_end", "series": series, "frames": int(frames)}).encode()]


def decode_header(part: bytes) -> dict[str, Any]:
    """Parse and check a header part; raise `MessageError` naming the problem."""
    try:
        header = json.loads(part)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MessageError(f"header is not JSON: {err}") from None
    if not isinstance(header, dict):
        raise MessageError("header is not a JSON object")
    if header.get("protocol") != PROTOCOL:
        raise MessageError(f"unknown protocol {header.get('protocol')!r}; expected {PROTOCOL!r}")
    kind = header.get("type", "frame")
    if kind not in ("frame", "series_end"):
        raise MessageError(f"unknown message type {kind!r}; expected 'frame' or 'series_end'")
    if not isinstance(header.get("series"), str) or not header["series"]:
        raise MessageError("'series' must be a non-empty string")
    key = "frame" if kind == "frame" else "frames"
    if not isinstance(header.get(key), int) or header[key] < 0:
        raise MessageError(f"'{key}' must be a non-negative integer")
    return header


def decode_frame(header: dict[str, Any], data: bytes, *, frame_id: str, origin: str, max_pixels: int) -> Frame:
    """Check a frame message against its header and build the `Frame`.

    Examples
    --------
    >>> h, d = encode_frame(np.arange(256, dtype=np.uint16).reshape(16, 16), series="s", number=3)
    >>> int(decode_frame(decode_header(h), d, frame_id="x", origin="o", max_pixels=10**6).pixels[1, 0])
    16
    """
    shape = header.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(n, int) for n in shape)):
        raise MessageError(f"'shape' must be [rows, cols] of integers, got {shape!r}")
    rows, cols = shape
    if min(rows, cols) < MIN_SIDE_PX:
        raise MessageError(f"shape {rows}×{cols} is below the minimum of {MIN_SIDE_PX} px per side")
    if rows * cols > max_pixels:
        raise MessageError(f"shape {rows}×{cols} exceeds max_pixels={max_pixels}")
    dtype_name, order = header.get("dtype"), header.get("byteorder", "<")
    if dtype_name not in DTYPES:
        raise MessageError(f"unknown dtype {dtype_name!r}; allowed: {', '.join(DTYPES)}")
    if order not in BYTEORDERS:
        raise MessageError(f"unknown byteorder {order!r}; allowed: < > |")
    dtype = np.dtype(dtype_name).newbyteorder(order if order != "|" else "=")
    needed = rows * cols * dtype.itemsize
    if len(data) != needed:
        raise MessageError(f"pixel buffer has {len(data)} bytes; shape {rows}×{cols} {dtype_name} needs {needed}")
    pixel_size = header.get("pixel_size_nm")
    if pixel_size is not None and not (isinstance(pixel_size, (int, float)) and pixel_size > 0):
        raise MessageError(f"'pixel_size_nm' must be a positive number or null, got {pixel_size!r}")
    acquired = header.get("acquired_at")
    try:
        acquired = parse_timestamp(acquired) if acquired is not None else None
    except (TypeError, ValueError):
        raise MessageError(f"'acquired_at' is not ISO 8601: {acquired!r}") from None
    meta = header.get("meta") or {}
    if not isinstance(meta, dict):
        raise MessageError("'meta' must be a JSON object")
    pixels = np.frombuffer(data, dtype).reshape(rows, cols).astype(dtype.newbyteorder("="), copy=True)
    stream = {"series": header["series"], "frame": header["frame"]}
    pixel_size_nm = float(pixel_size) if pixel_size else None
    return Frame(frame_id, pixels, pixel_size_nm, acquired, {**meta, "stream": stream}, origin)


def pack_parts(parts: Sequence[bytes]) -> bytes:
    """A multipart message as one byte string (8-byte big-endian length before each part), for quarantine."""
    return b"".join(struct.pack(">Q", len(p)) + bytes(p) for p in parts)


class ZmqStreamSource:
    """Receive frames in the native protocol from a camera (SUB to its PUB, or PULL).

    Parameters
    ----------
    address
        ZeroMQ endpoint, e.g. ``tcp://127.0.0.1:5555``.
    socket
        ``pull`` (lossless: the sender waits when the daemon is behind) or ``sub`` (the camera
        publishes; messages beyond ``high_water_mark`` are dropped by ZeroMQ and show as gaps).
    bind
        Bind the address instead of connecting to it.
    max_pixels
        Largest accepted ``rows * cols``.

    Examples
    --------
    >>> source = ZmqStreamSource("tcp://127.0.0.1:5555", name="cam")  # doctest: +SKIP
    >>> for item in source.frames(stop): ...  # doctest: +SKIP
    """

    replayable = False

    def __init__(
        self,
        address: str,
        *,
        name: str = "stream",
        socket: Literal["pull", "sub"] = "pull",
        bind: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        high_water_mark: int = 1000,
    ) -> None:
        self.address = address
        self.name = name
        self.socket_type = socket
        self.bind = bind
        self.max_pixels = max_pixels
        self.high_water_mark = high_water_mark
        self.counters: dict[str, int] = {"frames": 0, "malformed": 0, "gaps": 0, "out_of_order": 0, "series_ended": 0}
        self._last: dict[str, int] = {}

    def _open(self, context: zmq.Context) -> zmq.Socket:
        sock = context.socket(zmq.PULL if self.socket_type == "pull" else zmq.SUB)
        sock.setsockopt(zmq.RCVHWM, self.high_water_mark)
        sock.setsockopt(zmq.LINGER, 0)
        if self.socket_type == "sub":
            sock.setsockopt(zmq.SUBSCRIBE, b"")
        (sock.bind if self.bind else sock.connect)(self.address)
        return sock

    def frames(self, stop: StopFlag, skip: SkipFn | None = None) -> Iterator[Frame | Rejected]:
        """Yield frames as they arrive until ``stop`` is set."""
        context = zmq.Context.instance()
        sock = self._open(context)
        origin = f"{self.socket_type} {self.address}"
        try:
            while not stop.is_set():
                if not sock.poll(POLL_MS):
                    continue
                parts = sock.recv_multipart(copy=True)
                try:
                    item = self._decode(parts, origin)
                except MessageError as err:
                    self.counters["malformed"] += 1
                    digest = hashlib.sha256(pack_parts(parts)).hexdigest()[:16]
                    log.error("%s: malformed message %s: %s", self.name, digest, err)
                    yield Rejected(f"{self.name}:malformed:{digest}", origin, str(err), pack_parts(parts))
                    continue
                if item is not None and not (skip is not None and skip(item.frame_id)):
                    yield item
        finally:
            sock.close(linger=0)

    def _decode(self, parts: list[bytes], origin: str) -> Frame | None:
        header = decode_header(parts[0])
        series = header["series"]
        if header.get("type") == "series_end":
            if len(parts) != 1:
                raise MessageError(f"series_end has {len(parts)} parts; expected 1")
            self._count_gap(series, header["frames"], end=True)
            self.counters["series_ended"] += 1
            return None
        if len(parts) != 2:
            raise MessageError(f"frame message has {len(parts)} parts; expected 2 (header, pixels)")
        number = header["frame"]
        frame_id = f"{self.name}:{series}#{number}"
        frame = decode_frame(header, parts[1], frame_id=frame_id, origin=origin, max_pixels=self.max_pixels)
        self._count_gap(series, number)
        self.counters["frames"] += 1
        return frame

    def _count_gap(self, series: str, number: int, end: bool = False) -> None:
        """Count frames skipped before ``number`` (or before the end, for ``end``)."""
        expected = self._last.get(series, -1) + 1
        if number > expected:
            missing = number - expected
            self.counters["gaps"] += missing
            before = "its end" if end else f"frame {number}"
            log.warning("%s: series %s: %d frame(s) missing before %s", self.name, series, missing, before)
        elif number < expected and not end:
            self.counters["out_of_order"] += 1
            log.warning("%s: series %s: frame %d arrived after frame %d", self.name, series, number, expected - 1)
            return
        if not end:
            self._last[series] = number
