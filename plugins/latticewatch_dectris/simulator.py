"""A DECTRIS detector's stream interface, simulated: PUSH series of numpy frames in the published layouts.

Used by the tests and for demos without a detector::

    python -m latticewatch_dectris.simulator --protocol v1 --frames 20 --rate 2

binds ``tcp://127.0.0.1:9999`` (``31001`` for v2) and pushes synthetic HRTEM frames; point a
``kind = "dectris"`` source at it. The message builders (`v1_header_parts`, `v1_image_parts`,
`v2_start_message` …) are public so tests can take a correct message apart and break it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, Self

import cbor2
import numpy as np
import zmq

from latticewatch_dectris import codecs, v2
from latticewatch_dectris.source import DETECTOR_PORTS

log = logging.getLogger("latticewatch.dectris.simulator")

#: Encodings a simulated detector can send, by protocol (v2 names are the tag-56500 algorithms).
ENCODINGS = {
    "v1": ("<", "lz4<", "bs8-lz4<", "bs16-lz4<", "bs32-lz4<"),
    "v2": ("none", "lz4", "bslz4"),
}

#: v1 encoding / v2 compression → codec of `latticewatch_dectris.codecs`.
_CODECS = {"<": "raw", "lz4<": "lz4", "none": "raw", "lz4": "lz4-hdf5", "bslz4": "bslz4"}

#: RFC 8746 typed-array tags of the little-endian types a simulated detector sends.
_TYPED_ARRAY_TAGS = {"u1": 64, "<u2": 69, "<u4": 70, "<f4": 85}

#: Sensor pixel pitch of an EIGER/ARINA-class hybrid pixel detector, in metres.
PIXEL_PITCH_M = 75e-6


def default_encoding(protocol: str, dtype: np.dtype) -> str:
    """What a detector sends by default: bitshuffle + LZ4 at the pixel width.

    Examples
    --------
    >>> import numpy as np
    >>> default_encoding("v1", np.dtype("uint16")), default_encoding("v2", np.dtype("uint16"))
    ('bs16-lz4<', 'bslz4')
    """
    return f"bs{8 * dtype.itemsize}-lz4<" if protocol == "v1" else "bslz4"


def detector_config(shape: tuple[int, int], dtype: np.dtype, nimages: int, frame_time_s: float, collection_date: datetime) -> dict[str, Any]:
    """The detector configuration a v1 ``basic``/``all`` header carries (a realistic subset).

    Examples
    --------
    >>> from datetime import datetime, timezone
    >>> import numpy as np
    >>> cfg = detector_config((4, 6), np.dtype("uint16"), 10, 0.01, datetime(2024, 1, 1, tzinfo=timezone.utc))
    >>> cfg["x_pixels_in_detector"], cfg["y_pixels_in_detector"], cfg["bit_depth_image"]
    (6, 4, 16)
    """
    rows, cols = shape
    return {
        "auto_summation": True,
        "beam_center_x": cols / 2,
        "beam_center_y": rows / 2,
        "bit_depth_image": 8 * dtype.itemsize,
        "bit_depth_readout": 12,
        "count_time": frame_time_s * 0.99,
        "countrate_correction_applied": True,
        "data_collection_date": collection_date.isoformat(timespec="milliseconds"),
        "description": "Dectris EIGER2 (simulated)",
        "detector_number": "SIM-0001",
        "flatfield_correction_applied": True,
        "frame_time": frame_time_s,
        "incident_energy": 200000.0,
        "nimages": nimages,
        "ntrigger": 1,
        "pixel_mask_applied": True,
        "sensor_material": "Si",
        "sensor_thickness": 0.00045,
        "software_version": "simulator",
        "trigger_mode": "ints",
        "x_pixel_size": PIXEL_PITCH_M,
        "y_pixel_size": PIXEL_PITCH_M,
        "x_pixels_in_detector": cols,
        "y_pixels_in_detector": rows,
    }


def _json(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode()


def _xy(array: np.ndarray) -> list[int]:
    """DECTRIS v1 shapes list the fast axis first."""
    return list(array.shape[::-1])


def v1_header_parts(
    series: int,
    header_detail: str,
    config: dict[str, Any] | None = None,
    flatfield: np.ndarray | None = None,
    pixel_mask: np.ndarray | None = None,
    countrate_table: np.ndarray | None = None,
    appendix: str | None = None,
) -> list[bytes]:
    """Parts of a v1 series start message (``dheader-1.0``).

    Parameters
    ----------
    series
        Series id.
    header_detail
        ``none``, ``basic`` (adds ``config``) or ``all`` (adds ``config`` and the three arrays,
        each after its ``{htype, shape, type}`` header).
    config
        Detector configuration for ``basic``/``all``.
    flatfield, pixel_mask, countrate_table
        float32, uint32 and float32 arrays for ``all``.
    appendix
        The user's ``header_appendix``, sent as a last part.

    Examples
    --------
    >>> v1_header_parts(7, "none")
    [b'{"htype": "dheader-1.0", "series": 7, "header_detail": "none"}']
    """
    parts = [_json({"htype": "dheader-1.0", "series": series, "header_detail": header_detail})]
    if header_detail in ("basic", "all"):
        parts.append(_json(config or {}))
    if header_detail == "all":
        for htype, array, type_name in (
            ("dflatfield-1.0", flatfield, "float32"),
            ("dpixelmask-1.0", pixel_mask, "uint32"),
            ("dcountrate_table-1.0", countrate_table, "float32"),
        ):
            if array is None:
                raise ValueError(f"header_detail 'all' needs {htype}'s array")
            data = np.ascontiguousarray(array, dtype=np.dtype(type_name).newbyteorder("<"))
            parts += [_json({"htype": htype, "shape": _xy(data), "type": type_name}), data.tobytes()]
    if appendix is not None:
        parts.append(appendix.encode())
    return parts


def v1_image_parts(
    series: int,
    frame: int,
    pixels: np.ndarray,
    encoding: str,
    start_time_ns: int,
    stop_time_ns: int,
    appendix: str | None = None,
    block_bytes: int | None = None,
) -> list[bytes]:
    """Parts of a v1 image message: ``dimage-1.0``, ``dimage_d-1.0``, data, ``dconfig-1.0`` [, appendix].

    Parameters
    ----------
    series, frame
        Series id and frame number (from 0).
    pixels
        2-D uint8/uint16/uint32 image.
    encoding
        ``<``, ``lz4<`` or ``bs<8|16|32>-lz4<``.
    start_time_ns, stop_time_ns
        Exposure start and stop relative to the series start.
    appendix
        The user's ``image_appendix``, sent as a fifth part.
    block_bytes
        Block size for bitshuffle + LZ4 (default 8 KiB, as the detector).

    Examples
    --------
    >>> import numpy as np
    >>> parts = v1_image_parts(1, 0, np.zeros((2, 3), np.uint16), "<", 0, 10)
    >>> len(parts), len(parts[2])
    (4, 12)
    """
    data = np.ascontiguousarray(pixels, dtype=pixels.dtype.newbyteorder("<"))
    codec = "bslz4" if encoding.startswith("bs") else _CODECS[encoding]
    blob = codecs.encode(codec, data, block_bytes)
    return [
        _json({"htype": "dimage-1.0", "series": series, "frame": frame, "hash": ""}),
        _json({"htype": "dimage_d-1.0", "shape": _xy(data), "type": data.dtype.name, "encoding": encoding, "size": len(blob)}),
        blob,
        _json({"htype": "dconfig-1.0", "start_time": start_time_ns, "stop_time": stop_time_ns, "real_time": stop_time_ns - start_time_ns}),
    ] + ([appendix.encode()] if appendix is not None else [])


def v1_end_parts(series: int) -> list[bytes]:
    """The v1 series end message (``dseries_end-1.0``).

    Examples
    --------
    >>> v1_end_parts(2)
    [b'{"htype": "dseries_end-1.0", "series": 2}']
    """
    return [_json({"htype": "dseries_end-1.0", "series": series})]


def _typed_array(data: np.ndarray, compression: str, block_bytes: int | None = None) -> cbor2.CBORTag:
    data = np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("<"))
    tag = _TYPED_ARRAY_TAGS[data.dtype.str.replace("|", "")]
    codec = _CODECS[compression]
    payload: Any = codecs.encode(codec, data, block_bytes)
    if codec != "raw":
        modifier = data.dtype.itemsize if codec == "bslz4" else 0
        payload = cbor2.CBORTag(v2.TAG_COMPRESSION, [compression, modifier, payload])
    return cbor2.CBORTag(tag, payload)


def _multidim(data: np.ndarray, compression: str, block_bytes: int | None = None) -> cbor2.CBORTag:
    return cbor2.CBORTag(v2.TAG_MULTIDIM, [list(data.shape), _typed_array(data, compression, block_bytes)])


def _rational_ns(ns: int) -> list[int]:
    # The detector's time base is nanoseconds; v2 sends times as [ticks, ticks per second].
    return [ns, 1_000_000_000]


def v2_start_message(
    series: int,
    series_unique_id: str,
    shape: tuple[int, int],
    nimages: int,
    frame_time_s: float,
    arm_date: datetime,
    channel: str = "threshold_1",
    flatfield: np.ndarray | None = None,
    pixel_mask: np.ndarray | None = None,
    countrate_table: np.ndarray | None = None,
    user_data: Any = None,
) -> bytes:
    """A v2 ``start`` message; with the arrays given it is the ``header_detail = all`` form.

    Examples
    --------
    >>> from datetime import datetime, timezone
    >>> msg = v2_start_message(1, "u", (4, 4), 1, 0.01, datetime(2024, 1, 1, tzinfo=timezone.utc))
    >>> msg[:3] == b"\\xd9\\xd9\\xf7"
    True
    """
    rows, cols = shape
    message: dict[str, Any] = {
        "type": "start",
        "series_id": series,
        "series_unique_id": series_unique_id,
        "arm_date": arm_date,
        "beam_center_x": cols / 2,
        "beam_center_y": rows / 2,
        "channels": [channel],
        "count_time": frame_time_s * 0.99,
        "countrate_correction_enabled": countrate_table is not None,
        "detector_description": "Dectris EIGER2 (simulated)",
        "detector_serial_number": "SIM-0001",
        "detector_translation": [0.0, 0.0, 0.1],
        "flatfield_enabled": flatfield is not None,
        "frame_time": frame_time_s,
        "goniometer": {},
        "image_size_x": cols,
        "image_size_y": rows,
        "incident_energy": 200000.0,
        "incident_wavelength": 0.0251,
        "number_of_images": nimages,
        "pixel_mask_enabled": pixel_mask is not None,
        "pixel_size_x": PIXEL_PITCH_M,
        "pixel_size_y": PIXEL_PITCH_M,
        "saturation_value": 65534,
        "sensor_material": "Si",
        "sensor_thickness": 0.00045,
        "threshold_energy": {channel: 100000.0},
        "user_data": user_data,
        "virtual_pixel_interpolation_enabled": False,
    }
    if flatfield is not None:
        message["flatfield"] = {channel: _multidim(flatfield.astype("<f4"), "none")}
    if pixel_mask is not None:
        message["pixel_mask"] = {channel: _multidim(pixel_mask.astype("<u4"), "none")}
    if countrate_table is not None:
        message["countrate_correction_lookup_table"] = _typed_array(countrate_table.astype("<f4").ravel(), "none")
    return cbor2.dumps(cbor2.CBORTag(55799, message))


def v2_image_message(
    series: int,
    series_unique_id: str,
    frame: int,
    pixels: np.ndarray,
    compression: str,
    series_date: datetime,
    start_time_ns: int,
    stop_time_ns: int,
    channel: str = "threshold_1",
    user_data: Any = None,
    block_bytes: int | None = None,
) -> bytes:
    """A v2 ``image`` message with one channel.

    Examples
    --------
    >>> from datetime import datetime, timezone
    >>> import numpy as np
    >>> msg = v2_image_message(1, "u", 0, np.zeros((2, 2), np.uint16), "bslz4", datetime(2024, 1, 1, tzinfo=timezone.utc), 0, 10)
    >>> msg[:3] == b"\\xd9\\xd9\\xf7"
    True
    """
    message = {
        "type": "image",
        "series_id": series,
        "series_unique_id": series_unique_id,
        "image_id": frame,
        "real_time": _rational_ns(stop_time_ns - start_time_ns),
        "series_date": series_date,
        "start_time": _rational_ns(start_time_ns),
        "stop_time": _rational_ns(stop_time_ns),
        "user_data": user_data,
        "data": {channel: _multidim(pixels, compression, block_bytes)},
    }
    return cbor2.dumps(cbor2.CBORTag(55799, message))


def v2_end_message(series: int, series_unique_id: str) -> bytes:
    """A v2 ``end`` message.

    Examples
    --------
    >>> v2_end_message(1, "u")[:3] == b"\\xd9\\xd9\\xf7"
    True
    """
    return cbor2.dumps(cbor2.CBORTag(55799, {"type": "end", "series_id": series, "series_unique_id": series_unique_id}))


def corrections(shape: tuple[int, int], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Plausible flatfield, pixel mask (module gaps + a few hot pixels) and count-rate table.

    Examples
    --------
    >>> import numpy as np
    >>> c = corrections((8, 8), np.random.default_rng(0))
    >>> sorted(c), c["pixel_mask"].dtype.name
    (['countrate_table', 'flatfield', 'pixel_mask'], 'uint32')
    """
    rows, cols = shape
    mask = np.zeros(shape, np.uint32)
    mask[:, cols // 2] = 1  # a gap between modules
    mask[rng.integers(0, rows, 3), rng.integers(0, cols, 3)] = 8  # noisy pixels
    return {
        "flatfield": rng.normal(1.0, 0.02, shape).astype(np.float32),
        "pixel_mask": mask,
        "countrate_table": np.stack([np.arange(1024), np.arange(1024) * 1.01]).astype(np.float32),
    }


class DectrisSimulator:
    """A detector's stream interface: a PUSH socket bound on 127.0.0.1.

    Parameters
    ----------
    protocol
        ``"v1"`` or ``"v2"``.
    endpoint
        Where to bind; the default takes a random free port (see ``self.endpoint``).
    send_timeout_s
        A send waits at most this long for a receiver (``None``: forever, as a detector does).
    frame_time_s
        Time between frames, for the timestamps in the messages.

    Examples
    --------
    >>> import numpy as np
    >>> with DectrisSimulator() as sim:
    ...     sim.endpoint.startswith("tcp://127.0.0.1:")
    True
    """

    def __init__(
        self,
        protocol: str = "v1",
        endpoint: str = "tcp://127.0.0.1:*",
        send_timeout_s: float | None = 10.0,
        frame_time_s: float = 0.01,
    ):
        if protocol not in ENCODINGS:
            raise ValueError(f"protocol must be 'v1' or 'v2', not {protocol!r}")
        self.protocol = protocol
        self.frame_time_s = frame_time_s
        self._socket = zmq.Context.instance().socket(zmq.PUSH)
        if send_timeout_s is not None:
            # A test whose receiver failed must see an error, not hang.
            self._socket.setsockopt(zmq.SNDTIMEO, round(send_timeout_s * 1000))
        self._socket.bind(endpoint)
        self.endpoint: str = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._series: dict[int, tuple[str, datetime]] = {}
        log.info("simulated DECTRIS stream %s on %s", protocol, self.endpoint)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the socket, giving queued messages a moment to leave."""
        self._socket.close(linger=2000)

    def send(self, message: bytes | Sequence[bytes]) -> None:
        """Push one raw message (bytes for v2, a list of parts for v1), well-formed or not."""
        if isinstance(message, bytes):
            self._socket.send(message)
        else:
            self._socket.send_multipart(list(message))

    def start_series(
        self,
        series: int,
        shape: tuple[int, int],
        dtype: np.dtype | str = "uint16",
        nimages: int = 1,
        header_detail: str = "basic",
        appendix: str | None = None,
        rng: np.random.Generator | None = None,
    ) -> dict[str, np.ndarray]:
        """Arm: push the series start message.

        Returns
        -------
        dict
            The corrections sent (flatfield, pixel mask, count-rate table) for ``all``; else empty.
        """
        if header_detail not in ("none", "basic", "all"):
            raise ValueError(f"header_detail must be none, basic or all, not {header_detail!r}")
        arm_date = datetime.now(UTC)
        self._series[series] = (uuid.uuid4().hex, arm_date)
        sent = corrections(shape, rng or np.random.default_rng(series)) if header_detail == "all" else {}
        if self.protocol == "v1":
            config = detector_config(shape, np.dtype(dtype), nimages, self.frame_time_s, arm_date)
            self.send(v1_header_parts(series, header_detail, config, appendix=appendix, **sent))
        else:
            unique_id = self._series[series][0]
            self.send(v2_start_message(series, unique_id, shape, nimages, self.frame_time_s, arm_date, user_data=appendix, **sent))
        return sent

    def send_image(
        self,
        series: int,
        frame: int,
        pixels: np.ndarray,
        encoding: str | None = None,
        appendix: str | None = None,
        block_bytes: int | None = None,
    ) -> None:
        """Push one image of a started series, encoded as asked (default: bitshuffle + LZ4)."""
        encoding = encoding or default_encoding(self.protocol, pixels.dtype)
        if encoding not in ENCODINGS[self.protocol]:
            raise ValueError(f"stream {self.protocol} encodings are {', '.join(ENCODINGS[self.protocol])}, not {encoding!r}")
        unique_id, arm_date = self._series.get(series, ("", datetime.now(UTC)))
        start_ns = round(frame * self.frame_time_s * 1e9)
        stop_ns = start_ns + round(self.frame_time_s * 0.99 * 1e9)
        if self.protocol == "v1":
            self.send(v1_image_parts(series, frame, pixels, encoding, start_ns, stop_ns, appendix, block_bytes))
        else:
            self.send(v2_image_message(series, unique_id, frame, pixels, encoding, arm_date, start_ns, stop_ns, user_data=appendix, block_bytes=block_bytes))

    def end_series(self, series: int) -> None:
        """Disarm: push the series end message."""
        unique_id, _ = self._series.pop(series, ("", None))
        self.send(v1_end_parts(series) if self.protocol == "v1" else v2_end_message(series, unique_id))

    def send_series(
        self,
        frames: Sequence[np.ndarray],
        series: int = 1,
        header_detail: str = "basic",
        encoding: str | None = None,
        drop: Iterable[int] = (),
        rate_hz: float | None = None,
    ) -> dict[str, np.ndarray]:
        """A whole series: start, every frame (except the numbers in ``drop``), end.

        Parameters
        ----------
        frames
            2-D arrays of one shape and dtype; frame *i* gets number *i*.
        series, header_detail, encoding
            As for `start_series` and `send_image`.
        drop
            Frame numbers not to send, to simulate frames lost on the way.
        rate_hz
            Pace the frames; ``None`` sends as fast as the receiver takes them.

        Returns
        -------
        dict
            The corrections sent with an ``all`` header.
        """
        dropped = set(drop)
        sent = self.start_series(series, frames[0].shape, frames[0].dtype, len(frames), header_detail)
        for number, pixels in enumerate(frames):
            if number not in dropped:
                self.send_image(series, number, pixels, encoding)
            if rate_hz:
                time.sleep(1.0 / rate_hz)
        self.end_series(series)
        return sent


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m latticewatch_dectris.simulator``: push synthetic HRTEM frames as a detector would."""
    parser = argparse.ArgumentParser(prog="python -m latticewatch_dectris.simulator", description=__doc__.splitlines()[0])
    parser.add_argument("--protocol", choices=sorted(ENCODINGS), default="v1")
    parser.add_argument("--bind", help="endpoint to bind (default tcp://127.0.0.1:9999, or :31001 for v2)")
    parser.add_argument("--header-detail", choices=("none", "basic", "all"), default="basic")
    parser.add_argument("--encoding", help="v1: <, lz4<, bs16-lz4< …; v2: none, lz4, bslz4 (default bitshuffle + LZ4)")
    parser.add_argument("--frames", type=int, default=10, help="frames in the series")
    parser.add_argument("--rate", type=float, default=1.0, help="frames per second (0: as fast as taken)")
    parser.add_argument("--shape", type=int, nargs=2, default=(512, 512), metavar=("ROWS", "COLS"))
    parser.add_argument("--pixel-size-nm", type=float, default=0.05, help="sampling of the synthetic frames")
    parser.add_argument("--series", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from latticewatch.testing.synthetic.frames import generate_frame

    rng = np.random.default_rng(args.seed)
    frames = [generate_frame(rng, tuple(args.shape), args.pixel_size_nm).image for _ in range(args.frames)]
    endpoint = args.bind or f"tcp://127.0.0.1:{DETECTOR_PORTS[args.protocol]}"
    try:
        simulator = DectrisSimulator(args.protocol, endpoint, send_timeout_s=None)
    except zmq.ZMQError as err:
        print(f"error: cannot bind {endpoint}: {err}", file=sys.stderr)
        return 2
    with simulator:
        print(
            f"pushing {args.frames} frames (stream {args.protocol}) on {simulator.endpoint}; "
            f"set pixel_size_nm = {args.pixel_size_nm} on the dectris source",
            flush=True,
        )
        simulator.send_series(frames, args.series, args.header_detail, args.encoding, rate_hz=args.rate or None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
