"""DECTRIS SIMPLON stream interface v1: multipart JSON + binary messages on a PUSH socket.

Message layouts (one ZeroMQ multipart message each; JSON parts are UTF-8 objects):

Series start, ``header_detail`` ``none``
    1. ``{"htype": "dheader-1.0", "series": <int>, "header_detail": "none"}``
``basic``
    1. as above with ``"basic"``
    2. the detector configuration (``x_pixel_size``, ``nimages``, ``data_collection_date`` …)
``all``
    1–2. as for ``basic``
    3. ``{"htype": "dflatfield-1.0", "shape": [x, y], "type": "float32"}``, 4. its raw data
    5. ``{"htype": "dpixelmask-1.0", "shape": [x, y], "type": "uint32"}``, 6. its raw data
    7. ``{"htype": "dcountrate_table-1.0", "shape": [x, y], "type": "float32"}``, 8. its raw data

    Any further ``{htype, shape, type}`` + data pair is skipped by its header.
A last extra part is the user's ``header_appendix``.

Image
    1. ``{"htype": "dimage-1.0", "series": <int>, "frame": <int>, "hash": "<md5>"}``
    2. ``{"htype": "dimage_d-1.0", "shape": [x, y], "type": "uint16", "encoding": "bs16-lz4<", "size": <bytes>}``
    3. the pixel data
    4. ``{"htype": "dconfig-1.0", "start_time": <ns>, "stop_time": <ns>, "real_time": <ns>}``
    5. (optional) the user's ``image_appendix``

Series end
    1. ``{"htype": "dseries_end-1.0", "series": <int>}``

Shapes are ``[x, y]`` (fast axis first), so arrays are ``(y, x)`` in numpy. Encodings: ``<`` (raw
little-endian), ``lz4<`` (one LZ4 block), ``bs8-lz4<``/``bs16-lz4<``/``bs32-lz4<`` (bitshuffle +
LZ4, HDF5 framing); see `latticewatch_dectris.codecs`.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from latticewatch.io.jsonio import parse_timestamp
from latticewatch_dectris.messages import EncodedImage, Message, MessageError, SeriesEnd, SeriesStart, check_pixels

log = logging.getLogger(__name__)

#: Pixel types a v1 image may declare.
IMAGE_TYPES = {"uint8": np.dtype("<u1"), "uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}

#: Types of the ``all`` header's arrays (flatfield and count-rate table are float32, mask uint32).
ARRAY_TYPES = {**IMAGE_TYPES, "float32": np.dtype("<f4"), "float64": np.dtype("<f8")}

#: Detector configuration keys copied into every frame's metadata.
DETECTOR_KEYS = (
    "description",
    "detector_number",
    "software_version",
    "x_pixel_size",
    "y_pixel_size",
    "x_pixels_in_detector",
    "y_pixels_in_detector",
    "bit_depth_image",
    "count_time",
    "frame_time",
    "nimages",
    "ntrigger",
    "trigger_mode",
    "incident_energy",
    "sensor_material",
    "sensor_thickness",
    "countrate_correction_applied",
    "flatfield_correction_applied",
    "pixel_mask_applied",
    "data_collection_date",
)

_ENCODING = re.compile(r"^(?:(?P<lz4>lz4)|bs(?P<bits>8|16|32)-lz4)?<$")

_Count = Annotated[StrictInt, Field(ge=0)]
_Extent = Annotated[StrictInt, Field(gt=0)]


class _Part(BaseModel):
    # Detectors add fields across firmware versions; the ones read here are checked strictly.
    model_config = ConfigDict(extra="allow", frozen=True)


class DHeader(_Part):
    htype: Literal["dheader-1.0"]
    series: StrictInt
    header_detail: Literal["none", "basic", "all"]


class DArrayHeader(_Part):
    htype: StrictStr
    shape: tuple[_Extent, ...] = Field(min_length=1)
    type: StrictStr


class DImage(_Part):
    htype: Literal["dimage-1.0"]
    series: StrictInt
    frame: _Count
    hash: StrictStr = ""


class DImageD(_Part):
    htype: Literal["dimage_d-1.0"]
    shape: tuple[_Extent, _Extent]
    type: StrictStr
    encoding: StrictStr
    size: _Count | None = None


class DConfig(_Part):
    htype: Literal["dconfig-1.0"]
    start_time: _Count
    stop_time: _Count
    real_time: _Count


class DSeriesEnd(_Part):
    htype: Literal["dseries_end-1.0"]
    series: StrictInt


_HEADER_ARRAYS = {
    "dflatfield-1.0": "flatfield",
    "dpixelmask-1.0": "pixel_mask",
    "dcountrate_table-1.0": "countrate_table",
}


def parse(parts: Sequence[bytes | memoryview], max_pixels: int) -> Message:
    """Interpret one v1 multipart message.

    Parameters
    ----------
    parts
        The message's frames as received.
    max_pixels
        Largest image accepted (rows × cols).

    Returns
    -------
    Message
        `SeriesStart` for ``dheader-1.0``, `EncodedImage` for ``dimage-1.0``, `SeriesEnd` for
        ``dseries_end-1.0``.

    Raises
    ------
    MessageError
        Bad JSON, an unknown ``htype``, type or encoding, a wrong number of parts, or array sizes
        that do not match their headers.

    Examples
    --------
    >>> parse([b'{"htype": "dseries_end-1.0", "series": 3}'], max_pixels=1 << 26)
    SeriesEnd(series=3)
    """
    if not parts:
        raise MessageError("empty message")
    first = _json_object(parts[0], "part 1")
    htype = first.get("htype")
    if htype == "dheader-1.0":
        return _parse_header(parts)
    if htype == "dimage-1.0":
        return _parse_image(parts, max_pixels)
    if htype == "dseries_end-1.0":
        if len(parts) != 1:
            raise MessageError(f"dseries_end-1.0 message has {len(parts)} parts; expected 1")
        return SeriesEnd(_model(DSeriesEnd, parts[0], "dseries_end-1.0").series)
    raise MessageError(f"unknown htype {htype!r} in part 1; expected dheader-1.0, dimage-1.0 or dseries_end-1.0")


def _parse_header(parts: Sequence[bytes | memoryview]) -> SeriesStart:
    header = _model(DHeader, parts[0], "dheader-1.0")
    rest = list(parts[1:])
    config: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}
    if header.header_detail in ("basic", "all"):
        if not rest:
            raise MessageError(f"header_detail {header.header_detail!r} without the detector configuration part",
                               header.series)
        config = _json_object(rest.pop(0), "detector configuration (part 2)", header.series)
    if header.header_detail == "all":
        while len(rest) >= 2 and _is_array_header(rest[0]):
            array_header = _model(DArrayHeader, rest[0], "array header", header.series)
            data = rest[1]
            rest = rest[2:]
            name = _HEADER_ARRAYS.get(array_header.htype)
            if name is None:
                log.debug("series %s: skipping header array %s", header.series, array_header.htype)
                continue
            arrays[name] = _header_array(array_header, data, header.series)
        missing = [htype for htype, name in _HEADER_ARRAYS.items() if name not in arrays]
        if missing:
            raise MessageError(f"header_detail 'all' without {', '.join(missing)}", header.series)
    if len(rest) > 1:
        raise MessageError(
            f"dheader-1.0 ({header.header_detail}) has {len(rest)} unexpected trailing parts; "
            "at most one header appendix may follow",
            header.series,
        )
    return SeriesStart(
        series=header.series,
        header_detail=header.header_detail,
        detector={k: config[k] for k in DETECTOR_KEYS if k in config},
        expected_images=_expected_images(config),
        collection_date=_collection_date(config, header.series),
        flatfield=arrays.get("flatfield"),
        pixel_mask=arrays.get("pixel_mask"),
        countrate_table=arrays.get("countrate_table"),
        appendix=_text(rest[0]) if rest else None,
    )


def _parse_image(parts: Sequence[bytes | memoryview], max_pixels: int) -> EncodedImage:
    image = _model(DImage, parts[0], "dimage-1.0")
    series, frame = image.series, image.frame
    if len(parts) not in (4, 5):
        raise MessageError(f"image message has {len(parts)} parts; expected 4 (5 with an image appendix)", series,
                           frame)
    descriptor = _model(DImageD, parts[1], "dimage_d-1.0 (part 2)", series, frame)
    timing = _model(DConfig, parts[3], "dconfig-1.0 (part 4)", series, frame)
    dtype = IMAGE_TYPES.get(descriptor.type)
    if dtype is None:
        raise MessageError(f"unknown image type {descriptor.type!r}; expected one of {', '.join(IMAGE_TYPES)}",
                           series, frame)
    codec = _codec(descriptor.encoding, dtype, series, frame)
    x, y = descriptor.shape
    check_pixels(y, x, max_pixels, series, frame)
    blob = parts[2]
    if descriptor.size is not None and descriptor.size != len(blob):
        raise MessageError(f"dimage_d-1.0 says size {descriptor.size} but the data part has {len(blob)} bytes",
                           series, frame)
    meta: dict[str, Any] = {
        "protocol": "dectris-stream-v1",
        "series": series,
        "frame": frame,
        "hash": image.hash,
        "encoding": descriptor.encoding,
        "type": descriptor.type,
        "start_time_s": timing.start_time / 1e9,
        "stop_time_s": timing.stop_time / 1e9,
        "real_time_s": timing.real_time / 1e9,
    }
    if len(parts) == 5:
        meta["appendix"] = _text(parts[4])
    return EncodedImage(series, frame, (y, x), dtype, codec, blob, start_time_s=timing.start_time / 1e9, meta=meta)


def _codec(encoding: str, dtype: np.dtype, series: int, frame: int) -> str:
    match = _ENCODING.match(encoding)
    if match is None:
        raise MessageError(f"unknown encoding {encoding!r}; expected '<', 'lz4<' or 'bs<8|16|32>-lz4<'", series, frame)
    if match["lz4"]:
        return "lz4"
    if match["bits"]:
        if int(match["bits"]) != 8 * dtype.itemsize:
            raise MessageError(f"encoding {encoding!r} does not fit {dtype.itemsize * 8}-bit pixels", series, frame)
        return "bslz4"
    return "raw"


def _header_array(header: DArrayHeader, data: bytes | memoryview, series: int) -> np.ndarray:
    dtype = ARRAY_TYPES.get(header.type)
    if dtype is None:
        raise MessageError(f"{header.htype}: unknown type {header.type!r}", series)
    need = math.prod(header.shape) * dtype.itemsize
    if len(data) != need:
        raise MessageError(f"{header.htype}: {len(data)} bytes of data for shape {list(header.shape)} {header.type} "
                           f"({need} bytes)", series)
    # Shapes are fast axis first; numpy wants the slow axis first.
    return np.frombuffer(data, dtype=dtype).reshape(header.shape[::-1]).astype(dtype.newbyteorder("="))


def _is_array_header(part: bytes | memoryview) -> bool:
    """A ``{htype, shape, type}`` JSON part (and not the header appendix, which is free-form)."""
    try:
        obj = json.loads(bytes(part))
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(obj, dict) and {"htype", "shape", "type"} <= obj.keys()


def _expected_images(config: dict[str, Any]) -> int | None:
    nimages, ntrigger = config.get("nimages"), config.get("ntrigger", 1)
    if isinstance(nimages, int) and isinstance(ntrigger, int) and not isinstance(nimages, bool):
        return nimages * ntrigger
    return None


def _collection_date(config: dict[str, Any], series: int) -> datetime | None:
    value = config.get("data_collection_date")
    if not isinstance(value, str):
        return None
    try:
        return parse_timestamp(value)
    except ValueError:
        log.warning("series %s: unreadable data_collection_date %r; frames get no acquisition time", series, value)
        return None


def _json_object(part: bytes | memoryview, what: str, series: int | None = None,
                 frame: int | None = None) -> dict[str, Any]:
    try:
        obj = json.loads(bytes(part))
    except (ValueError, UnicodeDecodeError) as err:
        raise MessageError(f"{what} is not valid JSON: {err}", series, frame) from err
    if not isinstance(obj, dict):
        raise MessageError(f"{what} is JSON but not an object", series, frame)
    return obj


def _model(model: type[_Part], part: bytes | memoryview, what: str, series: int | None = None,
           frame: int | None = None):
    try:
        return model.model_validate_json(bytes(part))
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'message'}: {e['msg']}" for e in err.errors())
        raise MessageError(f"{what}: {problems}", series, frame) from err


def _text(part: bytes | memoryview) -> str:
    # Appendices are free-form user data; keep them readable even when not UTF-8.
    return bytes(part).decode("utf-8", errors="replace")
