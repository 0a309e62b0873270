"""A DECTRIS detector's stream interface, simulated: PUSH series of numpy frames in the published layouts.

Used by the tests and for demos without a detector::

    python -m latticewatch_dectris.simulator --protocol v1 --frames 20 --rate 2

binds ``tcp://127.0.0.1:9999`` (``31001`` for v2) and pushes synthetic HRTEM frames; point a
``kind = "dectris"`` source at it. The messages themselves are built by `latticewatch_dectris.builders`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Self

import numpy as np
import zmq

from latticewatch_dectris import builders
from latticewatch_dectris.source import DETECTOR_PORTS

log = logging.getLogger(__name__)

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
        if protocol not in builders.ENCODINGS:
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
        sent = builders.corrections(shape, rng or np.random.default_rng(series)) if header_detail == "all" else {}
        if self.protocol == "v1":
            config = builders.detector_config(shape, np.dtype(dtype), nimages, self.frame_time_s, arm_date)
            self.send(builders.v1_header_parts(series, header_detail, config, appendix=appendix, **sent))
        else:
            unique_id = self._series[series][0]
            self.send(builders.v2_start_message(series, unique_id, shape, nimages, self.frame_time_s, arm_date,
                                                user_data=appendix, **sent))
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
        encoding = encoding or builders.default_encoding(self.protocol, pixels.dtype)
        if encoding not in builders.ENCODINGS[self.protocol]:
            allowed = ", ".join(builders.ENCODINGS[self.protocol])
            raise ValueError(f"stream {self.protocol} encodings are {allowed}, not {encoding!r}")
        unique_id, arm_date = self._series.get(series, ("", datetime.now(UTC)))
        start_ns = round(frame * self.frame_time_s * 1e9)
        stop_ns = start_ns + round(self.frame_time_s * 0.99 * 1e9)
        if self.protocol == "v1":
            self.send(builders.v1_image_parts(series, frame, pixels, encoding, start_ns, stop_ns, appendix,
                                              block_bytes))
        else:
            self.send(builders.v2_image_message(series, unique_id, frame, pixels, encoding, arm_date, start_ns, stop_ns,
                                                user_data=appendix, block_bytes=block_bytes))

    def end_series(self, series: int) -> None:
        """Disarm: push the series end message."""
        unique_id, _ = self._series.pop(series, ("", None))
        if self.protocol == "v1":
            self.send(builders.v1_end_parts(series))
        else:
            self.send(builders.v2_end_message(series, unique_id))

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
    parser = argparse.ArgumentParser(prog="python -m latticewatch_dectris.simulator",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--protocol", choices=sorted(builders.ENCODINGS), default="v1")
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
