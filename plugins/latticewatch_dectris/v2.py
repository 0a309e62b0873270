"""DECTRIS stream v2: one self-described CBOR map per ZeroMQ message.

Every message starts with the self-describe tag 55799 (bytes ``d9 d9 f7``) and is a map whose
``type`` is ``start``, ``image`` or ``end``. Images are in ``data``, a map from channel name
(``threshold_1`` …) to a row-major multi-dimensional array (RFC 8746: tag 40 around
``[[rows, cols], typed array]``); the typed array's tag (64–87) gives the element type and byte
order, and its byte string may be wrapped in the DECTRIS compression tag 56500
``["bslz4", elem_size, bytes]`` (bitshuffle + LZ4, HDF5 framing) or ``["lz4", 0, bytes]`` (LZ4
HDF5 framing). Times are rationals ``[numerator, denominator]`` in seconds relative to
``series_date``/``arm_date``. With ``header_detail`` ``all`` the start message also carries
``flatfield`` and ``pixel_mask`` (maps channel → array) and ``countrate_correction_lookup_table``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any, Literal

import cbor2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from latticewatch_dectris import codecs
from latticewatch_dectris.messages import EncodedImage, Message, MessageError, SeriesEnd, SeriesStart, check_pixels

log = logging.getLogger(__name__)

#: RFC 8949 self-described CBOR: every stream v2 message begins with these bytes.
MAGIC = b"\xd9\xd9\xf7"

#: RFC 8746 row-major multi-dimensional array.
TAG_MULTIDIM = 40
#: DECTRIS compressed byte string ``[algorithm, modifier, bytes]``.
TAG_COMPRESSION = 56500

#: Compression algorithm names of tag 56500 → codec names of `latticewatch_dectris.codecs`.
COMPRESSION_CODECS = {"bslz4": "bslz4", "lz4": "lz4-hdf5"}

#: Start message fields copied into every frame's metadata.
DETECTOR_KEYS = (
    "detector_description",
    "detector_serial_number",
    "pixel_size_x",
    "pixel_size_y",
    "image_size_x",
    "image_size_y",
    "count_time",
    "frame_time",
    "number_of_images",
    "incident_energy",
    "sensor_material",
    "sensor_thickness",
    "saturation_value",
    "threshold_energy",
    "countrate_correction_enabled",
    "flatfield_enabled",
    "pixel_mask_enabled",
    "virtual_pixel_interpolation_enabled",
    "arm_date",
)

_Count = Annotated[StrictInt, Field(ge=0)]
_Rational = tuple[_Count, Annotated[StrictInt, Field(gt=0)]]


class _Message(BaseModel):
    # Later firmware adds fields; the ones read here are checked.
    model_config = ConfigDict(extra="allow", frozen=True, arbitrary_types_allowed=True)


class V2Start(_Message):
    type: Literal["start"]
    series_id: StrictInt
    series_unique_id: StrictStr = ""
    arm_date: datetime | None = None
    channels: list[StrictStr] = []
    number_of_images: _Count | None = None
    flatfield: dict[StrictStr, Any] = {}
    pixel_mask: dict[StrictStr, Any] = {}
    countrate_correction_lookup_table: Any = None
    user_data: Any = None


class V2Image(_Message):
    type: Literal["image"]
    series_id: StrictInt
    series_unique_id: StrictStr = ""
    image_id: _Count
    series_date: datetime | None = None
    start_time: _Rational | None = None
    stop_time: _Rational | None = None
    real_time: _Rational | None = None
    data: dict[StrictStr, Any] = Field(min_length=1)
    user_data: Any = None


class V2End(_Message):
    type: Literal["end"]
    series_id: StrictInt
    series_unique_id: StrictStr = ""


def parse(message: bytes | memoryview, max_pixels: int, channel: str | None = None) -> Message:
    """Interpret one v2 message.

    Parameters
    ----------
    message
        The single-part ZeroMQ message as received.
    max_pixels
        Largest image accepted (rows × cols).
    channel
        Image channel to take (``threshold_1`` …); ``None`` takes the first, which is the first
        of the start message's ``channels``.

    Returns
    -------
    Message
        `SeriesStart`, `EncodedImage` or `SeriesEnd` for a ``start``, ``image`` or ``end`` message.

    Raises
    ------
    MessageError
        Not self-described CBOR, undecodable CBOR, an unknown ``type``, missing or mistyped
        fields, unsupported array tags or compression.

    Examples
    --------
    >>> import cbor2
    >>> parse(cbor2.dumps(cbor2.CBORTag(55799, {"type": "end", "series_id": 4})), 1 << 26)
    SeriesEnd(series=4)
    """
    if bytes(message[:3]) != MAGIC:
        raise MessageError("not a stream v2 message: it does not start with the self-described CBOR tag d9d9f7")
    try:
        obj = cbor2.loads(message)
    except Exception as err:  # a C decoder fed untrusted bytes: whatever it raises is the message's fault
        raise MessageError(f"undecodable CBOR: {type(err).__name__}: {err}") from err
    if not isinstance(obj, Mapping):
        raise MessageError(f"CBOR message is a {type(obj).__name__}, not a map")
    kind = obj.get("type")
    if kind == "start":
        return _parse_start(_model(V2Start, obj), obj, max_pixels, channel)
    if kind == "image":
        return _parse_image(_model(V2Image, obj), max_pixels, channel)
    if kind == "end":
        return SeriesEnd(_model(V2End, obj).series_id)
    raise MessageError(f"unknown message type {kind!r}; expected start, image or end")


def _parse_start(start: V2Start, obj: Mapping[str, Any], max_pixels: int, channel: str | None) -> SeriesStart:
    series = start.series_id
    chosen = channel or (start.channels[0] if start.channels else None)
    arrays: dict[str, np.ndarray] = {}
    for name, per_channel in (("flatfield", start.flatfield), ("pixel_mask", start.pixel_mask)):
        if chosen in per_channel:
            shape, dtype, codec, payload = _multidim(per_channel[chosen], f"{name}[{chosen}]", max_pixels, series)
            arrays[name] = _decode_array(codec, payload, dtype, shape[0] * shape[1], name, series).reshape(shape)
    table = start.countrate_correction_lookup_table
    if table is not None:
        what = "countrate_correction_lookup_table"
        dtype, codec, payload = _typed_array(table, what, series, None)
        count = _element_count(codec, payload, dtype, series)
        arrays["countrate_table"] = _decode_array(codec, payload, dtype, count, what, series)
    return SeriesStart(
        series=series,
        header_detail="all" if arrays else "basic",
        detector={key: _jsonable(obj[key]) for key in DETECTOR_KEYS if key in obj},
        expected_images=start.number_of_images,
        collection_date=start.arm_date,
        flatfield=arrays.get("flatfield"),
        pixel_mask=arrays.get("pixel_mask"),
        countrate_table=arrays.get("countrate_table"),
        appendix=_jsonable(start.user_data),
    )


def _parse_image(image: V2Image, max_pixels: int, channel: str | None) -> EncodedImage:
    series, frame = image.series_id, image.image_id
    name = channel or next(iter(image.data))
    if name not in image.data:
        raise MessageError(f"image has no channel {name!r}; it has {', '.join(image.data)}", series, frame)
    shape, dtype, codec, payload = _multidim(image.data[name], f"data[{name}]", max_pixels, series, frame)
    meta: dict[str, Any] = {
        "protocol": "dectris-stream-v2",
        "series": series,
        "frame": frame,
        "series_unique_id": image.series_unique_id,
        "channel": name,
        "type": dtype.name,
        "compression": {"raw": "none", "bslz4": "bslz4", "lz4-hdf5": "lz4"}[codec],
    }
    for key in ("start_time", "stop_time", "real_time"):
        value = getattr(image, key)
        if value is not None:
            meta[f"{key}_s"] = value[0] / value[1]
    if image.user_data is not None:
        meta["appendix"] = _jsonable(image.user_data)
    return EncodedImage(
        series,
        frame,
        shape,
        dtype,
        codec,
        payload,
        start_time_s=meta.get("start_time_s"),
        series_date=image.series_date,
        meta=meta,
    )


def _multidim(
    value: Any, what: str, max_pixels: int, series: int, frame: int | None = None
) -> tuple[tuple[int, int], np.dtype, str, bytes]:
    """Shape, element type, codec and payload of a tag-40 array (an image, flatfield or mask)."""
    if not isinstance(value, cbor2.CBORTag) or value.tag != TAG_MULTIDIM:
        found = f"tag {value.tag}" if isinstance(value, cbor2.CBORTag) else type(value).__name__
        raise MessageError(f"{what}: expected a row-major multi-dimensional array (tag 40), found {found}", series,
                           frame)
    if not isinstance(value.value, (list, tuple)) or len(value.value) != 2:
        raise MessageError(f"{what}: tag 40 must hold [dimensions, typed array]", series, frame)
    dims, typed = value.value
    if (
        not isinstance(dims, (list, tuple))
        or len(dims) != 2
        or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims)
    ):
        raise MessageError(f"{what}: dimensions {dims!r} are not two positive integers", series, frame)
    rows, cols = dims
    check_pixels(rows, cols, max_pixels, series, frame)
    dtype, codec, payload = _typed_array(typed, what, series, frame)
    return (rows, cols), dtype, codec, payload


def _typed_array(value: Any, what: str, series: int, frame: int | None) -> tuple[np.dtype, str, bytes]:
    if not isinstance(value, cbor2.CBORTag):
        raise MessageError(f"{what}: expected a typed array (tags 64–87), found {type(value).__name__}", series, frame)
    dtype = _typed_array_dtype(value.tag, what, series, frame)
    payload = value.value
    if isinstance(payload, bytes):
        return dtype, "raw", payload
    if isinstance(payload, cbor2.CBORTag) and payload.tag == TAG_COMPRESSION:
        parts = payload.value
        if not isinstance(parts, (list, tuple)) or len(parts) != 3 or not isinstance(parts[2], bytes):
            raise MessageError(f"{what}: tag 56500 must hold [algorithm, modifier, bytes]", series, frame)
        algorithm, modifier, data = parts
        codec = COMPRESSION_CODECS.get(algorithm)
        if codec is None:
            raise MessageError(f"{what}: unknown compression {algorithm!r}; expected bslz4 or lz4", series, frame)
        if codec == "bslz4" and modifier != dtype.itemsize:
            raise MessageError(f"{what}: bslz4 element size {modifier!r} does not match {dtype.itemsize}-byte elements",
                               series, frame)
        return dtype, codec, data
    raise MessageError(f"{what}: typed array holds neither a byte string nor a tag-56500 compressed string", series,
                       frame)


def _typed_array_dtype(tag: int, what: str, series: int, frame: int | None) -> np.dtype:
    """Element type of an RFC 8746 typed-array tag: bits ``010 f s e ll``."""
    if not 64 <= tag <= 87:
        raise MessageError(f"{what}: tag {tag} is not a typed array (64–87)", series, frame)
    is_float, signed, little, ll = (tag >> 4) & 1, (tag >> 3) & 1, (tag >> 2) & 1, tag & 3
    order = "<" if little else ">"
    if not is_float:
        if signed and little and ll == 0:
            raise MessageError(f"{what}: typed-array tag 76 is reserved", series, frame)
        return np.dtype(f"{order}{'i' if signed else 'u'}{1 << ll}")
    if ll == 3:
        raise MessageError(f"{what}: 128-bit floats (tag {tag}) are not supported", series, frame)
    return np.dtype(f"{order}f{2 << ll}")


def _element_count(codec: str, payload: bytes, dtype: np.dtype, series: int) -> int:
    """Length of a 1-D typed array: from its size for raw bytes, from the framing header otherwise."""
    if codec == "raw":
        return len(payload) // dtype.itemsize
    if len(payload) < 8:
        raise MessageError("compressed typed array is shorter than its size header", series)
    return int.from_bytes(payload[:8], "big") // dtype.itemsize


def _decode_array(codec: str, payload: bytes, dtype: np.dtype, count: int, what: str, series: int) -> np.ndarray:
    try:
        return codecs.decode(codec, payload, dtype, count).astype(dtype.newbyteorder("="))
    except codecs.DecodeError as err:
        raise MessageError(f"{what}: {err}", series) from err


def _model(model: type[_Message], obj: Mapping[str, Any]):
    try:
        return model.model_validate(dict(obj))
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'message'}: {e['msg']}" for e in err.errors())
        series = obj.get("series_id") if isinstance(obj.get("series_id"), int) else None
        frame = obj.get("image_id") if isinstance(obj.get("image_id"), int) else None
        raise MessageError(f"{obj.get('type')} message: {problems}", series, frame) from err


def _jsonable(value: Any) -> Any:
    """CBOR-decoded values (frozen maps, tuples, dates, bytes) as plain JSON types for metadata."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    if isinstance(value, cbor2.CBORTag):
        return {"cbor_tag": value.tag, "value": _jsonable(value.value)}
    if value is None or isinstance(value, (str, int, float)):
        return value
    # CBOR's other built-in types (UUIDs, decimals, simple values …) as their text form
    return str(value)
