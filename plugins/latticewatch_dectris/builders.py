"""The messages a DECTRIS detector sends, built from numpy frames: stream v1 multipart, stream v2 CBOR.

`latticewatch_dectris.simulator` pushes them; the tests take a correct message apart and break it.
Each builder follows the published layout of its message (SIMPLON API documentation), field for field.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import cbor2
import numpy as np

from latticewatch_dectris import codecs, v2

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


def detector_config(shape: tuple[int, int], dtype: np.dtype, nimages: int, frame_time_s: float,
                    collection_date: datetime) -> dict[str, Any]:
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
        _json({"htype": "dimage_d-1.0", "shape": _xy(data), "type": data.dtype.name, "encoding": encoding,
               "size": len(blob)}),
        blob,
        _json({"htype": "dconfig-1.0", "start_time": start_time_ns, "stop_time": stop_time_ns,
               "real_time": stop_time_ns - start_time_ns}),
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
    >>> armed = datetime(2024, 1, 1, tzinfo=timezone.utc)
    >>> msg = v2_image_message(1, "u", 0, np.zeros((2, 2), np.uint16), "bslz4", armed, 0, 10)
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
