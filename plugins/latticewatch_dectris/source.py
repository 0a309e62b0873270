"""The DECTRIS stream source: PULL from a detector's PUSH socket, yield frames.

One source follows one detector. It keeps the state of the current series (its start message,
the next frame number it expects) so it can count gaps and date frames; everything it knows
about a frame goes into the frame's metadata.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated, Any, Literal

import numpy as np
import zmq
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from latticewatch.errors import ConfigError
from latticewatch.frame import Frame, Rejected
from latticewatch.sources.base import SkipFn, StopFlag
from latticewatch.sources.zmq_stream import pack_parts
from latticewatch_dectris import v1, v2
from latticewatch_dectris.messages import EncodedImage, Message, MessageError, SeriesEnd, SeriesStart

log = logging.getLogger(__name__)

#: Where a detector's stream interface listens, by protocol version (on the detector's DCU).
DETECTOR_PORTS = {"v1": 9999, "v2": 31001}


class DectrisOptions(BaseModel):
    """Options of a ``kind = "dectris"`` source (its table in the config file).

    Examples
    --------
    >>> DectrisOptions(protocol="v2").endpoint
    'tcp://127.0.0.1:31001'
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Prefix of frame ids (``<name>:<series>:<frame>``) and the name in logs and counters.
    name: str = Field("dectris", pattern=r"^[^:\s]+$")
    #: Stream interface version the detector is configured for (SIMPLON ``stream/config/format``:
    #: ``legacy`` is v1, ``cbor`` is v2).
    protocol: Literal["v1", "v2"] = "v1"
    #: The detector's PUSH socket; default 127.0.0.1 at the protocol's port (9999 / 31001).
    endpoint: str
    #: Sample-plane pixel size. The stream only knows the detector's pixel pitch, not the
    #: magnification, so without this frames carry ``pixel_size_nm = None``.
    pixel_size_nm: Annotated[float, Field(gt=0)] | None = None
    #: Stream v2 image channel (``threshold_1`` …); default the first the detector lists.
    channel: str | None = None
    #: Largest image accepted, in pixels; larger claims are rejected before any allocation.
    max_pixels: Annotated[int, Field(gt=0)] = 1 << 26
    #: How often the stop flag is checked while no message arrives.
    poll_interval_s: Annotated[float, Field(gt=0, le=1.0)] = 0.1
    #: Messages ZeroMQ may queue on the daemon's side (RCVHWM). Kept small: the rest wait in the
    #: detector's buffer, so a stopping daemon drops little and memory stays bounded.
    receive_queue: Annotated[int, Field(gt=0)] = 16

    @model_validator(mode="before")
    @classmethod
    def _default_endpoint(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("endpoint") is None:
            # An invalid protocol is reported by its own field; don't add an endpoint error to it.
            port = DETECTOR_PORTS.get(data.get("protocol", "v1"), DETECTOR_PORTS["v1"])
            data = {**data, "endpoint": f"tcp://127.0.0.1:{port}"}
        return data

    @model_validator(mode="after")
    def _channel_is_v2(self) -> DectrisOptions:
        if self.channel is not None and self.protocol != "v2":
            raise ValueError("channel applies to protocol = \"v2\" only (stream v1 has one image per message)")
        return self

    @field_validator("endpoint")
    @classmethod
    def _zmq_endpoint(cls, value: str) -> str:
        if not value.startswith(("tcp://", "ipc://")):
            raise ValueError("must be a ZeroMQ endpoint such as 'tcp://10.0.0.5:9999'")
        return value


@dataclass
class _Series:
    """What the source knows about the series in progress."""

    series: int
    start: SeriesStart | None  # None when images came without a start message
    next_frame: int | None  # None until the first image when the start was missed
    received: int = 0


class DectrisSource:
    """Frames from a DECTRIS detector's stream interface (SIMPLON stream v1 or v2).

    Parameters
    ----------
    options
        See `DectrisOptions`.

    Attributes
    ----------
    counters
        ``frames`` yielded, ``malformed`` messages rejected, ``gaps`` (frame numbers skipped
        within a series), ``out_of_order`` (frame numbers at or below one already seen),
        ``series_started`` and ``series_ended``.
    series_start
        The latest series start message, with the detector's flatfield, pixel mask and count-rate
        table when ``header_detail`` is ``all``; ``None`` before the first one.

    Examples
    --------
    >>> source = DectrisSource(DectrisOptions(endpoint="tcp://127.0.0.1:9999"))
    >>> source.name, source.counters["frames"]
    ('dectris', 0)
    """

    #: A live stream: what the daemon did not take before a restart is gone, so the runner spools.
    replayable = False

    def __init__(self, options: DectrisOptions):
        self.options = options
        self.name = options.name
        self.endpoint = options.endpoint
        self.counters: dict[str, int] = {
            "frames": 0,
            "malformed": 0,
            "gaps": 0,
            "out_of_order": 0,
            "series_started": 0,
            "series_ended": 0,
        }
        self.series_start: SeriesStart | None = None
        self._series: _Series | None = None
        self._said_pixel_size = False

    def frames(self, stop: StopFlag, skip: SkipFn | None = None) -> Iterator[Frame | Rejected]:
        """Receive until ``stop.is_set()``; yield a `Frame` per image, a `Rejected` per bad message.

        Parameters
        ----------
        stop
            Checked at least every ``poll_interval_s``.
        skip
            ``skip(frame_id) -> True`` for frames already done: they are counted for gap
            detection but not decompressed or yielded.
        """
        socket = zmq.Context.instance().socket(zmq.PULL)
        socket.setsockopt(zmq.RCVHWM, self.options.receive_queue)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(self.endpoint)
        log.info("%s: pulling DECTRIS stream %s from %s", self.name, self.options.protocol, self.endpoint)
        timeout_ms = max(1, round(self.options.poll_interval_s * 1000))
        try:
            while not stop.is_set():
                if not socket.poll(timeout_ms, zmq.POLLIN):
                    continue
                parts = [part.buffer for part in socket.recv_multipart(copy=False)]
                item = self._handle(parts, skip)
                if item is not None:
                    yield item
        finally:
            socket.close(linger=0)

    def _handle(self, parts: Sequence[memoryview], skip: SkipFn | None) -> Frame | Rejected | None:
        tracked = False
        try:
            message = self._parse(parts)
            if isinstance(message, SeriesStart):
                self._start(message)
                return None
            if isinstance(message, SeriesEnd):
                self._end(message)
                return None
            missing = self._track(message.series, message.frame)
            tracked = True
            frame_id = f"{self.name}:{message.series}:{message.frame}"
            if skip is not None and skip(frame_id):
                log.debug("%s: %s is already done; not decoded", self.name, frame_id)
                return None
            return self._frame(frame_id, message, message.decode(), missing)
        except MessageError as err:
            if not tracked and err.series is not None and err.frame is not None:
                # The image arrived, only malformed: it is not missing.
                self._track(err.series, err.frame)
            return self._reject(err, parts)

    def _parse(self, parts: Sequence[memoryview]) -> Message:
        if self.options.protocol == "v1":
            if len(parts) == 1 and bytes(parts[0][:3]) == v2.MAGIC:
                raise MessageError('a stream v2 (CBOR) message: this detector needs protocol = "v2"')
            return v1.parse(parts, self.options.max_pixels)
        if len(parts) != 1:
            raise MessageError(f"a {len(parts)}-part message: stream v2 sends one part; "
                               'a stream v1 detector needs protocol = "v1"')
        return v2.parse(parts[0], self.options.max_pixels, self.options.channel)

    def _start(self, start: SeriesStart) -> None:
        if self._series is not None:
            log.warning("%s: series %s had no end message before series %s started", self.name, self._series.series,
                        start.series)
        self.series_start = start
        self._series = _Series(start.series, start, next_frame=0)
        self.counters["series_started"] += 1
        log.info(
            "%s: series %s started (header_detail %s, %s images expected)",
            self.name,
            start.series,
            start.header_detail,
            "?" if start.expected_images is None else start.expected_images,
        )

    def _track(self, series: int, frame: int) -> int:
        """Note an arrived frame number; return how many were skipped just before it."""
        state = self._series
        if state is None or state.series != series:
            log.warning(
                "%s: images of series %s arrive without its start message (joined mid-series, or the start was "
                "lost): detector settings unknown, gaps counted from here",
                self.name,
                series,
            )
            state = self._series = _Series(series, None, next_frame=None)
        missing = 0
        if state.next_frame is not None and frame > state.next_frame:
            missing = frame - state.next_frame
            self.counters["gaps"] += missing
            log.warning("%s: series %s: %d frame(s) missing before frame %d", self.name, series, missing, frame)
        elif state.next_frame is not None and frame < state.next_frame:
            self.counters["out_of_order"] += 1
            log.warning("%s: series %s: frame %d arrived after frame %d (repeated or out of order)", self.name, series,
                        frame, state.next_frame - 1)
        state.next_frame = frame + 1 if state.next_frame is None else max(state.next_frame, frame + 1)
        state.received += 1
        return missing

    def _end(self, end: SeriesEnd) -> None:
        state = self._series
        self.counters["series_ended"] += 1
        if state is None or state.series != end.series:
            log.warning("%s: end of series %s, which is not the series in progress", self.name, end.series)
            return
        expected = state.start.expected_images if state.start else None
        if expected is not None and state.received < expected:
            # Not counted as gaps: a disarmed or aborted series also ends early.
            log.warning("%s: series %s ended after %d of %d images", self.name, end.series, state.received, expected)
        else:
            log.info("%s: series %s ended after %d images", self.name, end.series, state.received)
        self._series = None

    def _frame(self, frame_id: str, image: EncodedImage, pixels: np.ndarray, missing: int) -> Frame:
        start = self._series.start if self._series else None
        meta: dict[str, Any] = dict(image.meta)
        meta["header_detail"] = start.header_detail if start else "unknown"
        if start is not None:
            if start.detector:
                meta["detector"] = dict(start.detector)
            if start.pixel_mask is not None:
                meta["masked_pixels"] = int(np.count_nonzero(start.pixel_mask))
            if start.appendix is not None:
                meta["header_appendix"] = start.appendix
        if missing:
            meta["missing_before"] = missing
        date = image.series_date or (start.collection_date if start else None)
        acquired_at = date + timedelta(seconds=image.start_time_s) if date and image.start_time_s is not None else None
        if self.options.pixel_size_nm is None and not self._said_pixel_size:
            self._said_pixel_size = True
            log.warning(
                "%s: pixel_size_nm is not set; the stream gives only the detector pixel pitch, not the sample-plane "
                "size, so frames carry no pixel size",
                self.name,
            )
        self.counters["frames"] += 1
        return Frame(frame_id, pixels, self.options.pixel_size_nm, acquired_at, meta, origin=self.endpoint)

    def _reject(self, err: MessageError, parts: Sequence[memoryview]) -> Rejected:
        # A v2 message is kept as it came; a multipart one in the native stream source's layout.
        payload = bytes(parts[0]) if self.options.protocol == "v2" and len(parts) == 1 else pack_parts(parts)
        if err.series is not None and err.frame is not None:
            frame_id = f"{self.name}:{err.series}:{err.frame}"
        else:
            # Content-derived, so the same bad message gets the same id after a restart.
            frame_id = f"{self.name}:malformed:{hashlib.sha256(payload).hexdigest()[:16]}"
        self.counters["malformed"] += 1
        log.warning("%s: rejected %s: %s", self.name, frame_id, err.problem)
        return Rejected(frame_id, self.endpoint, err.problem, payload)


def make_source(options: dict[str, Any]) -> DectrisSource:
    """Build a DECTRIS source from its config table (the ``latticewatch.sources`` entry point).

    Parameters
    ----------
    options
        Keys of `DectrisOptions`.

    Raises
    ------
    ConfigError
        Naming each bad key and what it allows.

    Examples
    --------
    >>> make_source({"protocol": "v1", "pixel_size_nm": 0.02}).endpoint
    'tcp://127.0.0.1:9999'
    """
    try:
        return DectrisSource(DectrisOptions.model_validate(options))
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'options'}: {e['msg']}" for e in err.errors())
        raise ConfigError(f"dectris source: {problems}") from err
