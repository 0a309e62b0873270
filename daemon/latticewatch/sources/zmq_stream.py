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

The receiver checks every message before it allocates anything for it: the header is at most
``MAX_HEADER_BYTES`` and nested at most ``MAX_HEADER_DEPTH`` levels *before* it is parsed, must be
valid UTF-8 JSON without NaN/Infinity or lone surrogate escapes, and names a printable series (at most
``MAX_SERIES_CHARS``) and an integer frame number (``true`` is not one); a pixel part larger than a
frame of ``max_pixels`` can be is refused by ZeroMQ itself (``MAXMSGSIZE``: the connection is reset).
Anything malformed becomes one `Rejected` carrying the raw message, and the stream goes on.

Frame numbers of a series must increase. The receiver keeps, per series, the last number it
*accounted for* — admitted as a frame, or reported missing — and on start reads it back from the
ledger (``ledger_path``), so accounting survives restarts and kills exactly:

* a number at or below it is a duplicate (or late) and rejected (id ``<frame id>~duplicate-<digest>``
  or ``~out-of-order-<digest>``), never analysed twice;
* a jump reports the numbers skipped as one `Rejected` with id ``<source>:<series>#<first>-<last>~missing``
  (no payload; its error event says which frames never arrived) *before* the frame after it is yielded,
  so the ledger holds the range before that frame: counted once, even across a kill;
* ``series_end`` reports frames missing at the end the same way.

``frame_id`` is ``<source name>:<series>#<frame>``; a malformed message whose series and number are
known is ``<frame id>~malformed-<digest>``, one without them ``<source name>:malformed:<digest>``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sqlite3
import struct
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zmq

from latticewatch.errors import InputError
from latticewatch.frame import MIN_SIDE_PX, Frame, Rejected
from latticewatch.io.jsonio import parse_timestamp
from latticewatch.io.pixel_size import PixelSizeError, check_pixel_size
from latticewatch.io.readers import DEFAULT_MAX_PIXELS
from latticewatch.sources.base import SkipFn, StopFlag

log = logging.getLogger(__name__)

PROTOCOL = "latticewatch-stream/1"
DTYPES = ("uint8", "uint16", "uint32", "int8", "int16", "int32", "float16", "float32", "float64")
BYTEORDERS = ("<", ">", "|")
POLL_MS = 100
#: Largest header part accepted (checked before parsing).
MAX_HEADER_BYTES = 64 * 1024
#: Deepest nesting of arrays and objects accepted in a header (checked before parsing).
MAX_HEADER_DEPTH = 32
#: Longest series id, in characters.
MAX_SERIES_CHARS = 200
#: Largest frame number (exact in every JSON reader).
MAX_FRAME_NUMBER = 2**53 - 1

_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_OPENERS, _CLOSERS = np.frombuffer(b"[{", np.uint8), np.frombuffer(b"]}", np.uint8)
# ids of what the ledger holds for a stream: a frame "<series>#<n>", a missing range "<series>#<a>-<b>~missing"
_ACCOUNTED = re.compile(r"#(\d+)(?:(?:-(\d+))?~missing)?$")


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


def _nesting(part: bytes) -> int:
    """How deeply arrays and objects nest in JSON text, without parsing it (strings may hold brackets)."""
    codes = np.frombuffer(_JSON_STRING.sub(b'""', part), np.uint8)
    steps = np.isin(codes, _OPENERS).astype(np.int64) - np.isin(codes, _CLOSERS)
    return int(np.cumsum(steps).max(initial=0))


def _no_constants(name: str) -> None:
    raise MessageError(f"header holds {name}, which is not JSON")


def _is_integer(value: Any) -> bool:
    return type(value) is int  # bool is an int to Python; `"frame": true` is not a frame number


def decode_header(part: bytes) -> dict[str, Any]:
    """Parse and check a header part within fixed bounds; raise `MessageError` naming the problem.

    Examples
    --------
    >>> decode_header(encode_series_end("s", 3)[0])["frames"]
    3
    >>> decode_header(b'{"a": ' * 100 + b"1" + b"}" * 100)
    Traceback (most recent call last):
    ...
    latticewatch.sources.zmq_stream.MessageError: header nests 100 levels deep; at most 32 are accepted
    """
    if len(part) > MAX_HEADER_BYTES:
        raise MessageError(f"header is {len(part)} bytes; at most {MAX_HEADER_BYTES} are accepted")
    depth = _nesting(bytes(part))
    if depth > MAX_HEADER_DEPTH:
        raise MessageError(f"header nests {depth} levels deep; at most {MAX_HEADER_DEPTH} are accepted")
    try:
        header = json.loads(bytes(part).decode("utf-8"), parse_constant=_no_constants)
    except UnicodeDecodeError as err:
        raise MessageError(f"header is not UTF-8: {err}") from None
    except (json.JSONDecodeError, RecursionError) as err:
        raise MessageError(f"header is not JSON: {err}") from None
    try:  # a "\udcff" escape parses to a lone surrogate: no id, log line or file can hold it
        json.dumps(header, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise MessageError("header holds a string with a lone surrogate escape (e.g. \\udcff): not Unicode") from None
    if not isinstance(header, dict):
        raise MessageError("header is not a JSON object")
    if header.get("protocol") != PROTOCOL:
        raise MessageError(f"unknown protocol {header.get('protocol')!r}; expected {PROTOCOL!r}")
    kind = header.get("type", "frame")
    if kind not in ("frame", "series_end"):
        raise MessageError(f"unknown message type {kind!r}; expected 'frame' or 'series_end'")
    series = header.get("series")
    if not (isinstance(series, str) and series and len(series) <= MAX_SERIES_CHARS and series.isprintable()):
        raise MessageError(f"'series' must be a non-empty printable string of at most {MAX_SERIES_CHARS} "
                           f"characters, got {str(series)[:80]!r}")
    key = "frame" if kind == "frame" else "frames"
    if not (_is_integer(header.get(key)) and 0 <= header[key] <= MAX_FRAME_NUMBER):
        raise MessageError(f"series {series!r}: '{key}' must be an integer from 0 to {MAX_FRAME_NUMBER}, "
                           f"got {header.get(key)!r}")
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
    if not (isinstance(shape, list) and len(shape) == 2 and all(_is_integer(n) for n in shape)):
        raise MessageError(f"'shape' must be [rows, cols] of integers, got {str(shape)[:80]}")
    rows, cols = shape
    if min(rows, cols) < MIN_SIDE_PX:
        raise MessageError(f"shape {rows}×{cols} is below the minimum of {MIN_SIDE_PX} px per side")
    if rows * cols > max_pixels:
        raise MessageError(f"shape {rows}×{cols} exceeds max_pixels={max_pixels}")
    dtype_name, order = header.get("dtype"), header.get("byteorder", "<")
    if dtype_name not in DTYPES:
        raise MessageError(f"unknown dtype {str(dtype_name)[:40]!r}; allowed: {', '.join(DTYPES)}")
    if order not in BYTEORDERS:
        raise MessageError(f"unknown byteorder {str(order)[:40]!r}; allowed: < > |")
    dtype = np.dtype(dtype_name).newbyteorder(order if order != "|" else "=")
    needed = rows * cols * dtype.itemsize
    if len(data) != needed:
        raise MessageError(f"pixel buffer has {len(data)} bytes; shape {rows}×{cols} {dtype_name} needs {needed}")
    pixel_size = header.get("pixel_size_nm")
    if not (pixel_size is None or type(pixel_size) in (int, float)):  # "0.05" is a JSON string, not a number
        raise MessageError(f"'pixel_size_nm' must be a number or null, got {str(pixel_size)[:40]!r}")
    try:
        pixel_size_nm = None if pixel_size is None else check_pixel_size(pixel_size, where="'pixel_size_nm'")
    except PixelSizeError as err:
        raise MessageError(str(err)) from None
    acquired = header.get("acquired_at")
    try:
        acquired = parse_timestamp(acquired) if acquired is not None else None
    except (TypeError, ValueError):
        raise MessageError(f"'acquired_at' is not ISO 8601: {str(acquired)[:80]!r}") from None
    meta = header.get("meta") or {}
    if not isinstance(meta, dict):
        raise MessageError("'meta' must be a JSON object")
    pixels = np.frombuffer(data, dtype).reshape(rows, cols).astype(dtype.newbyteorder("="), copy=True)
    stream = {"series": header["series"], "frame": header["frame"]}
    return Frame(frame_id, pixels, pixel_size_nm, acquired, {**meta, "stream": stream}, origin)


def pack_parts(parts: Sequence[bytes]) -> bytes:
    """A multipart message as one byte string (8-byte big-endian length before each part), for quarantine."""
    return b"".join(struct.pack(">Q", len(p)) + bytes(p) for p in parts)


def accounted_positions(ledger_path: Path, source: str) -> dict[str, int]:
    """Per series, the last frame number the ledger accounts for (admitted, or recorded missing) for ``source``.

    Read-only; an absent ledger accounts for nothing.

    Examples
    --------
    >>> import tempfile
    >>> from latticewatch.runtime.ledger import Ledger
    >>> path = Path(tempfile.mkdtemp()) / "ledger.sqlite"
    >>> ledger = Ledger(path)
    >>> for fid in ("cam:s#0", "cam:s#1", "cam:t#2-5~missing", "cam:t#6~duplicate-ab12", "cam:u#3~missing",
    ...             "cam:malformed:ff"):
    ...     _ = ledger.see(fid, source="cam", origin="")
    >>> accounted_positions(path, "cam")
    {'s': 1, 't': 5, 'u': 3}
    """
    if not Path(ledger_path).exists():
        return {}
    try:
        db = sqlite3.connect(f"file:{ledger_path}?mode=ro", uri=True, timeout=30)
        try:
            rows = db.execute("SELECT frame_id FROM frames WHERE source = ?", (source,)).fetchall()
        finally:
            db.close()
    except sqlite3.OperationalError as err:  # a ledger not created yet has no table
        log.debug("%s: no stream positions in %s: %s", source, ledger_path, err)
        return {}
    last: dict[str, int] = {}
    prefix = f"{source}:"
    for (frame_id,) in rows:
        match = _ACCOUNTED.search(frame_id)
        if match is None or not frame_id.startswith(prefix):
            continue
        series = frame_id[len(prefix):match.start()]
        number = int(match.group(2) or match.group(1))
        last[series] = max(number, last.get(series, -1))
    return last


def _digest(parts: Sequence[bytes]) -> str:
    return hashlib.sha256(pack_parts(parts)).hexdigest()[:16]


class ZmqStreamSource:
    """Receive frames in the native protocol from a camera (SUB to its PUB, or PULL).

    Parameters
    ----------
    address
        ZeroMQ endpoint, e.g. ``tcp://127.0.0.1:5555``.
    socket
        ``pull`` (the sender waits when the daemon is behind) or ``sub`` (the camera publishes;
        messages beyond ``high_water_mark`` are dropped by ZeroMQ and show as gaps).
    bind
        Bind the address instead of connecting to it.
    max_pixels
        Largest accepted ``rows * cols``.
    high_water_mark
        Messages ZeroMQ queues on the daemon's side (RCVHWM); at a SIGKILL these are lost (and counted).
    ledger_path
        The daemon's ledger: where the last frame number per series is read back on start, so gaps
        are counted exactly across restarts. ``None``: counting starts afresh.
    curve_secret_key, curve_clients
        Both or neither: the daemon's CURVE secret key file and the directory of allowed client
        public keys (`latticewatch.io.curve.curve_server`); only those clients can send.

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
        ledger_path: Path | None = None,
        curve_secret_key: Path | None = None,
        curve_clients: Path | None = None,
    ) -> None:
        if (curve_secret_key is None) != (curve_clients is None):
            raise ValueError("curve_secret_key and curve_clients go together: give both or neither")
        self.address = address
        self.name = name
        self.socket_type = socket
        self.bind = bind
        self.max_pixels = max_pixels
        self.high_water_mark = high_water_mark
        self.ledger_path = ledger_path
        self.curve = (curve_secret_key, curve_clients) if curve_secret_key is not None else None
        self.counters: dict[str, int] = {"frames": 0, "malformed": 0, "gaps": 0, "duplicates": 0, "out_of_order": 0,
                                         "series_ended": 0}
        self._last: dict[str, int] = {}
        self._origin = f"{socket} {address}"

    def _open(self, context: zmq.Context) -> zmq.Socket:
        sock = context.socket(zmq.PULL if self.socket_type == "pull" else zmq.SUB)
        sock.setsockopt(zmq.RCVHWM, self.high_water_mark)
        sock.setsockopt(zmq.LINGER, 0)
        # no part of a valid message is larger: ZeroMQ resets a peer that sends one, before allocating it
        sock.setsockopt(zmq.MAXMSGSIZE, max(MAX_HEADER_BYTES, self.max_pixels * 8))
        if self.curve is not None:
            from latticewatch.io.curve import curve_server

            curve_server(sock, secret_key_file=self.curve[0], clients_dir=self.curve[1], domain=f"stream-{self.name}")
        if self.socket_type == "sub":
            sock.setsockopt(zmq.SUBSCRIBE, b"")
        (sock.bind if self.bind else sock.connect)(self.address)
        return sock

    def frames(self, stop: StopFlag, skip: SkipFn | None = None) -> Iterator[Frame | Rejected]:
        """Yield frames (and rejected or missing ones) as they arrive until ``stop`` is set.

        A frame ``skip`` says is done counts as accounted for and is not yielded (with ``ledger_path``
        such a frame is at or below its series' position anyway).
        """
        if self.ledger_path is not None:
            self._last = accounted_positions(self.ledger_path, self.name)
            if self._last:
                log.info("%s: resuming %d series from the ledger", self.name, len(self._last))
        sock = self._open(zmq.Context.instance())
        try:
            while not stop.is_set():
                if sock.poll(POLL_MS):
                    yield from self._receive(sock.recv_multipart(copy=True), skip)
        finally:
            sock.close(linger=0)

    def _rejected(self, frame_id: str, problem: str, parts: Sequence[bytes], counter: str) -> Rejected:
        self.counters[counter] += 1
        log.error("%s: %s: %s", self.name, frame_id, problem)
        return Rejected(frame_id, self._origin, problem, pack_parts(parts))

    def _receive(self, parts: list[bytes], skip: SkipFn | None) -> Iterator[Frame | Rejected]:
        try:
            header = decode_header(parts[0])
        except MessageError as err:
            yield self._rejected(f"{self.name}:malformed:{_digest(parts)}", str(err), parts, "malformed")
            return
        series = header["series"]
        if header.get("type") == "series_end":
            if len(parts) != 1:
                yield self._rejected(f"{self.name}:malformed:{_digest(parts)}",
                                     f"series {series!r}: series_end has {len(parts)} parts; expected 1", parts,
                                     "malformed")
                return
            self.counters["series_ended"] += 1
            yield from self._missing(series, header["frames"], "its end")
            return
        number = header["frame"]
        frame_id = f"{self.name}:{series}#{number}"
        last = self._last.get(series, -1)
        if number <= last:
            kind, counter = ("duplicate", "duplicates") if number == last else ("out-of-order", "out_of_order")
            problem = (f"series {series!r} frame {number}: {kind}: the last frame accounted for is {last} "
                       "(frame numbers must increase); not analysed, message quarantined")
            yield self._rejected(f"{frame_id}~{kind}-{_digest(parts)}", problem, parts, counter)
            return
        if skip is not None and skip(frame_id):
            self._last[series] = number
            return
        yield from self._missing(series, number, f"frame {number}")
        try:
            if len(parts) != 2:
                raise MessageError(f"frame message has {len(parts)} parts; expected 2 (header, pixels)")
            frame = decode_frame(header, parts[1], frame_id=frame_id, origin=self._origin, max_pixels=self.max_pixels)
        except MessageError as err:
            problem = f"series {series!r} frame {number}: {err}"
            yield self._rejected(f"{frame_id}~malformed-{_digest(parts)}", problem, parts, "malformed")
            return
        yield frame
        self._last[series] = number  # the frame is in the ledger now (the runner admits before asking for more)
        self.counters["frames"] += 1

    def _missing(self, series: str, end: int, before: str) -> Iterator[Rejected]:
        """Report the frame numbers of ``series`` below ``end`` never accounted for (one record per range)."""
        first = self._last.get(series, -1) + 1
        if end <= first:
            return
        last = end - 1
        numbers = f"{first}" if first == last else f"{first}-{last}"
        count = last - first + 1
        problem = (f"series {series!r}: {count} frame(s) never arrived before {before}: {numbers} "
                   "(lost in transit or while the daemon was down)")
        log.warning("%s: %s", self.name, problem)
        yield Rejected(f"{self.name}:{series}#{numbers}~missing", self._origin, problem)
        self._last[series] = last  # the range is in the ledger now: it is never counted again
        self.counters["gaps"] += count
