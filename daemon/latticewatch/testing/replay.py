"""Emulators: replay frames the way SerialEM writes them, one file per frame, or over ZeroMQ.

``latticewatch replay SRC --to-folder DIR --rate HZ [--serialem-stack NAME]`` or
``--to-zmq tcp://127.0.0.1:PORT``; SRC is a folder of micrographs or ``synthetic:N``.
``latticewatch demo`` replays labelled frames (`demo_frames`): by default the abTEM frames shipped
in `SHIPPED_FRAMES`, each with its true mask and classes.

SerialEM's way (`SerialEMStack`), per section:

1. append the section's pixels to the open MRC stack;
2. update the header: ``nz`` (and ``mz``, the cell's z length);
3. rewrite ``<stack>.mdoc`` with the new ``[ZValue = N]`` section, after renaming the previous
   version to ``<stack>.mdoc~`` (as IMOD's autodoc writer does).

The mdoc is created with its global keys when the stack is opened, before the first section.
Each step is a separate method so tests can stop between them and look at the mid-write state.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from latticewatch.errors import ConfigError, InputError
from latticewatch.frame import Frame
from latticewatch.io.mdoc import format_section
from latticewatch.io.readers import SUPPORTED_SUFFIXES, read_frames
from latticewatch.sources.base import StopFlag
from latticewatch.testing.demo_score import Truth

if TYPE_CHECKING:  # the generator is imported when synthetic frames are asked for
    from latticewatch.testing.synthetic.truth import SyntheticImage

log = logging.getLogger(__name__)

#: The demo's default frames: labelled abTEM frames in the layout of ``latticewatch simulate`` (README.md there).
SHIPPED_FRAMES = Path(__file__).with_name("demo_frames")

# MRC2014 header offsets (bytes) of the fields SerialEM updates when it appends a section
_NZ, _MZ, _ZLEN = 8, 36, 48


def synthetic_frames(count: int, *, shape: tuple[int, int] = (512, 512), pixel_size_nm: float = 0.05,
                     seed: int = 0) -> Iterator[tuple[Frame, SyntheticImage]]:
    """``count`` frames of the analytic generator, each with its ground truth (``synthetic:N`` of `source_frames`).

    The same ``seed`` gives the same frames, so whoever replayed them can score an analysis against the truth.

    Examples
    --------
    >>> [(f.frame_id, int(t.mask.max())) for f, t in synthetic_frames(2, shape=(64, 64))]
    [('synthetic:0', 1), ('synthetic:1', 1)]
    """
    from latticewatch.testing.synthetic.frames import generate_frame

    rng = np.random.default_rng(seed)
    for i in range(count):
        truth = generate_frame(rng, shape, pixel_size_nm)
        yield Frame(f"synthetic:{i}", truth.image, pixel_size_nm, origin=f"synthetic:{count}"), truth


def _micrographs(folder: Path) -> list[Path]:
    """The micrograph files directly in ``folder``, sorted by name."""
    files = (p for p in folder.iterdir() if p.suffix.lower() in SUPPORTED_SUFFIXES and not p.name.startswith("."))
    return sorted(files)


def labelled_frames(folder: Path) -> tuple[int, Iterator[tuple[Frame, Truth]]]:
    """The frames of a folder in the layout ``latticewatch simulate`` writes, each with its truth, and their number.

    ``folder/images/<name>.*`` (one frame per file, with its pixel size), ``folder/labels/<name>.png`` (the
    particle mask, non-zero = particle) and ``folder/particles/<name>.json`` (``particles``: one object with a
    ``class`` per particle). Files are read as the iterator goes.

    Raises
    ------
    InputError
        When an image lacks its mask or particle file (before any frame is read), or a file holds more than one
        frame.

    Examples
    --------
    >>> count, frames = labelled_frames(SHIPPED_FRAMES)
    >>> frame, truth = next(frames)
    >>> count, frame.pixels.shape == truth.mask.shape, truth.labels
    (12, True, ('misoriented', 'misoriented'))
    """
    images = _micrographs(folder / "images") if (folder / "images").is_dir() else []
    if not images:
        raise InputError(f"{folder}: no micrographs in {folder / 'images'}; --frames DIR takes a folder written by "
                         "latticewatch simulate (images/, labels/, particles/)")
    missing = [str(p) for image in images for p in (folder / "labels" / f"{image.stem}.png",
                                                    folder / "particles" / f"{image.stem}.json") if not p.is_file()]
    if missing:
        raise InputError(f"{folder}: the truth of {len(missing)} file(s) is missing, e.g. {missing[0]}")
    return len(images), (_labelled(folder, image) for image in images)


def _labelled(folder: Path, image: Path) -> tuple[Frame, Truth]:
    import json

    from PIL import Image

    frames = list(read_frames(image))
    if len(frames) != 1:
        raise InputError(f"{image}: {len(frames)} frames; a labelled image holds one")
    mask = np.asarray(Image.open(folder / "labels" / f"{image.stem}.png"))
    particles = json.loads((folder / "particles" / f"{image.stem}.json").read_text())["particles"]
    return frames[0], Truth(mask, tuple(p["class"] for p in particles))


def demo_frames(spec: str, *, shape: tuple[int, int] = (512, 512), pixel_size_nm: float = 0.05,
                seed: int = 0) -> tuple[int, Iterator[tuple[Frame, Truth]]]:
    """The frames ``latticewatch demo --frames SPEC`` replays, each with its truth, and their number.

    ``shipped``: the labelled abTEM frames in `SHIPPED_FRAMES`; ``synthetic:N``: N frames of the analytic
    generator (``shape``, ``pixel_size_nm``, ``seed``); anything else: a folder (`labelled_frames`).

    Examples
    --------
    >>> count, frames = demo_frames("synthetic:2", shape=(64, 64))
    >>> count, [truth.mask.shape for _, truth in frames]
    (2, [(64, 64), (64, 64)])
    """
    if spec == "shipped":
        return labelled_frames(SHIPPED_FRAMES)
    kind, _, count = spec.partition(":")
    if kind == "synthetic":
        pairs = synthetic_frames(int(count), shape=shape, pixel_size_nm=pixel_size_nm, seed=seed)
        return int(count), ((f, Truth(t.mask, tuple(p.label for p in t.particles))) for f, t in pairs)
    return labelled_frames(Path(spec))


def source_frames(src: str, *, shape: tuple[int, int] = (512, 512), pixel_size_nm: float = 0.05,
                  seed: int = 0) -> Iterator[Frame]:
    """Frames to replay: ``synthetic:N`` (the analytic generator) or every frame of a folder's files.

    Examples
    --------
    >>> [f.pixels.shape for f in source_frames("synthetic:2", shape=(64, 64))]
    [(64, 64), (64, 64)]
    """
    if src.startswith("synthetic:"):
        count = int(src.partition(":")[2])
        yield from (frame for frame, _ in synthetic_frames(count, shape=shape, pixel_size_nm=pixel_size_nm, seed=seed))
        return
    folder = Path(src)
    if not folder.is_dir():
        raise ConfigError(f"{src}: not a folder and not synthetic:N")
    for path in _micrographs(folder):
        yield from read_frames(path)


def _mdoc_time(when: datetime) -> str:
    return when.strftime("%d-%b-%y  %H:%M:%S")


@dataclass
class SerialEMStack:
    """An MRC stack that grows section by section, with its ``.mdoc``, written as SerialEM does.

    Examples
    --------
    >>> import tempfile
    >>> stack = SerialEMStack(Path(tempfile.mkdtemp()) / "grid1.mrc", pixel_size_nm=0.05)
    >>> stack.append(np.zeros((32, 32), np.uint16)); stack.append(np.ones((32, 32), np.uint16))
    >>> import mrcfile; mrcfile.open(stack.path).data.shape
    (2, 32, 32)
    """

    path: Path
    pixel_size_nm: float | None = None
    sections: int = 0
    _mdoc_text: str = ""

    @property
    def mdoc_path(self) -> Path:
        return self.path.with_name(self.path.name + ".mdoc")

    def append(self, pixels: np.ndarray, keys: dict | None = None) -> None:
        """Add one section completely: pixels, header, mdoc."""
        self.write_pixels(pixels)
        self.update_header()
        self.write_mdoc(keys)

    def write_pixels(self, pixels: np.ndarray, *, fraction: float = 1.0) -> None:
        """Step 1: append the section's pixels (``fraction`` < 1 stops part-way, for tests)."""
        import mrcfile

        if self.sections == 0 and not self.path.exists():
            self._start_mdoc(pixels)
            with mrcfile.new(self.path) as mrc:  # header + first section
                mrc.set_data(pixels[None])
                mrc.set_image_stack()
                if self.pixel_size_nm:
                    mrc.voxel_size = self.pixel_size_nm * 10  # nm → Å
                mrc.header.nz = 0  # the section is not announced until step 2
            if fraction < 1:
                raise ValueError("the first section is written whole (mrcfile creates the file)")
            return
        data = np.ascontiguousarray(pixels, pixels.dtype.newbyteorder("<")).tobytes()
        with open(self.path, "ab") as fh:
            fh.write(data[: int(len(data) * fraction)])

    def finish_pixels(self, pixels: np.ndarray, *, fraction: float) -> None:
        """Write the rest of a section started with ``write_pixels(fraction=...)``."""
        data = np.ascontiguousarray(pixels, pixels.dtype.newbyteorder("<")).tobytes()
        with open(self.path, "ab") as fh:
            fh.write(data[int(len(data) * fraction):])

    def update_header(self) -> None:
        """Step 2: announce the new section in the header (nz, mz, cell z)."""
        self.sections += 1
        with open(self.path, "r+b") as fh:
            fh.seek(_NZ)
            fh.write(struct.pack("<i", self.sections))
            fh.seek(_MZ)
            fh.write(struct.pack("<i", self.sections))
            fh.seek(_ZLEN)
            fh.write(struct.pack("<f", self.sections * (self.pixel_size_nm or 0.1) * 10))

    def _start_mdoc(self, pixels: np.ndarray) -> None:
        spacing = f"{self.pixel_size_nm * 10:g}" if self.pixel_size_nm else "0"
        self._mdoc_text = (
            f"PixelSpacing = {spacing}\nVoltage = 300\nImageFile = {self.path.name}\n"
            f"ImageSize = {pixels.shape[1]} {pixels.shape[0]}\nDataMode = 6\n\n"
            f"[T = SerialEM: Digitized on latticewatch replay   {_mdoc_time(datetime.now())}    ]\n"
        )
        self.mdoc_path.write_text(self._mdoc_text)

    def write_mdoc(self, keys: dict | None = None) -> None:
        """Step 3: rewrite the mdoc with the new section (old version renamed to ``.mdoc~``)."""
        z = self.sections - 1
        now = datetime.now()
        section = {
            "TiltAngle": 0.0, "StagePosition": f"{z * 1.5:.3f} {-z * 0.75:.3f}", "StageZ": 0.0,
            "Magnification": 490000, "ExposureDose": 25.0,
            "PixelSpacing": f"{self.pixel_size_nm * 10:g}" if self.pixel_size_nm else 0,
            "Defocus": -0.05, "ExposureTime": 1.0, "Binning": 1,
            "DateTime": _mdoc_time(now), "TimeStamp": f"{time.time():.2f}", "NavigatorLabel": f"{z + 1}",
            **(keys or {}),
        }
        self._mdoc_text += format_section(z, section)
        if self.mdoc_path.exists():
            os.replace(self.mdoc_path, self.mdoc_path.with_name(self.mdoc_path.name + "~"))
        self.mdoc_path.write_text(self._mdoc_text)


def write_single(directory: Path, index: int, frame: Frame, fmt: str = "mrc") -> Path:
    """One file per frame, written in place (like a camera; the folder source waits for it to settle)."""
    path = directory / f"frame_{index:05d}.{fmt}"
    if fmt == "mrc":
        import mrcfile

        with mrcfile.new(path) as mrc:
            mrc.set_data(frame.pixels)
            if frame.pixel_size_nm:
                mrc.voxel_size = frame.pixel_size_nm * 10
    elif fmt == "tif":
        import tifffile

        resolution = (1e7 / frame.pixel_size_nm, 1e7 / frame.pixel_size_nm) if frame.pixel_size_nm else None
        tifffile.imwrite(path, frame.pixels, photometric="minisblack", compression="zlib",
                         resolution=resolution, resolutionunit="CENTIMETER" if resolution else None)
    else:
        raise ConfigError(f"unknown format {fmt!r}; allowed: mrc, tif")
    return path


class ZmqPublisher:
    """Send frames in the native protocol from a bound PUSH (default) or PUB socket, like a camera.

    A camera does not wait for the daemon forever: a frame no receiver takes within ``send_timeout_s``
    is dropped (counted in ``dropped``, logged) and keeps its frame number, so the daemon counts it
    as missing. ``send_queue`` (SNDHWM) bounds the frames queued towards the daemon; those still
    queued, with the daemon's ``high_water_mark``, are what a SIGKILL of the daemon can lose.

    Parameters
    ----------
    send_timeout_s
        Longest wait for a receiver per frame; ``None`` waits forever.
    curve_secret_key, curve_server_key
        Both or neither: this sender's CURVE secret key file and the daemon's public key file
        (`latticewatch.io.curve.curve_client`).

    Examples
    --------
    >>> with ZmqPublisher("tcp://127.0.0.1:5555", series="s1") as pub:  # doctest: +SKIP
    ...     pub.send(frame)
    """

    def __init__(self, address: str, *, series: str, socket: str = "push", connect: bool = False,
                 send_timeout_s: float | None = 10.0, send_queue: int = 4, curve_secret_key: Path | None = None,
                 curve_server_key: Path | None = None) -> None:
        import zmq

        self.series = series
        self.count = 0
        self.dropped = 0
        self.send_timeout_s = send_timeout_s
        self._zmq = zmq
        self.sock = zmq.Context.instance().socket(zmq.PUSH if socket == "push" else zmq.PUB)
        self.sock.setsockopt(zmq.SNDHWM, send_queue)
        self.sock.setsockopt(zmq.IMMEDIATE, 1)  # queue only towards a receiver that completed its handshake
        # deliver what is queued (series_end too) on close, but never hang on a receiver that is gone
        self.sock.setsockopt(zmq.LINGER, 10_000 if send_timeout_s is None else int(send_timeout_s * 1000))
        if curve_secret_key is not None or curve_server_key is not None:
            from latticewatch.io.curve import curve_client

            curve_client(self.sock, secret_key_file=curve_secret_key, server_key_file=curve_server_key)
        (self.sock.connect if connect else self.sock.bind)(address)
        if socket == "pub":
            time.sleep(0.5)  # PUB drops everything sent before subscribers have connected

    def _writable(self, stop: StopFlag | None) -> bool | None:
        """True once a receiver can take a message; False when the timeout passed; None when stopped."""
        deadline = None if self.send_timeout_s is None else time.monotonic() + self.send_timeout_s
        while not self.sock.poll(100, self._zmq.POLLOUT):
            if stop is not None and stop.is_set():
                return None
            if deadline is not None and time.monotonic() > deadline:
                return False
        return True

    def send(self, frame: Frame, stop: StopFlag | None = None) -> bool:
        """Send one frame; False when it was dropped (no receiver within the timeout) or ``stop`` was set."""
        from latticewatch.sources.zmq_stream import encode_frame

        parts = encode_frame(frame.pixels, series=self.series, number=self.count, pixel_size_nm=frame.pixel_size_nm,
                             acquired_at=frame.acquired_at or datetime.now(timezone.utc))
        writable = self._writable(stop)
        if writable is None:
            return False
        self.count += 1
        if not writable:
            self.dropped += 1
            log.warning("series %s frame %d dropped: no receiver took it within %g s", self.series, self.count - 1,
                        self.send_timeout_s)
            return False
        self.sock.send_multipart(parts)
        return True

    def send_raw(self, parts: list[bytes]) -> None:
        """Send an arbitrary message (tests use it for malformed input)."""
        self.sock.send_multipart(parts)

    def close(self) -> None:
        from latticewatch.sources.zmq_stream import encode_series_end

        if self._writable(None):  # a series_end nobody takes within the timeout is dropped too
            self.sock.send_multipart(encode_series_end(self.series, self.count))
        self.sock.close()

    def __enter__(self) -> ZmqPublisher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def replay(
    frames: Iterator[Frame],
    *,
    rate_hz: float,
    to_folder: Path | None = None,
    serialem_stack: str | None = None,
    fmt: str = "mrc",
    to_zmq: str | None = None,
    zmq_socket: str = "push",
    series: str | None = None,
    stop: StopFlag | None = None,
    send_timeout_s: float | None = 10.0,
) -> int:
    """Write or send frames at ``rate_hz`` (0: as fast as possible); returns how many went out.

    Over ZeroMQ a frame no receiver takes within ``send_timeout_s`` is dropped (`ZmqPublisher`).

    Examples
    --------
    >>> import tempfile
    >>> out = Path(tempfile.mkdtemp())
    >>> replay(source_frames("synthetic:2", shape=(64, 64)), rate_hz=0, to_folder=out, serialem_stack="s.mrc")
    2
    >>> sorted(p.name for p in out.iterdir())
    ['s.mrc', 's.mrc.mdoc', 's.mrc.mdoc~']
    """
    if (to_folder is None) == (to_zmq is None):
        raise ConfigError("give exactly one of to_folder and to_zmq")
    stack = SerialEMStack(to_folder / serialem_stack) if to_folder is not None and serialem_stack else None
    publisher = None
    if to_zmq:
        publisher = ZmqPublisher(to_zmq, series=series or f"replay-{datetime.now():%Y%m%dT%H%M%S}", socket=zmq_socket,
                                 send_timeout_s=send_timeout_s)
    if to_folder is not None:
        to_folder.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    sent = 0
    try:
        for frame in frames:
            if stop is not None and stop.is_set():
                break
            if rate_hz > 0:
                delay = start + sent / rate_hz - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            if stack is not None:
                stack.pixel_size_nm = stack.pixel_size_nm or frame.pixel_size_nm
                # frames of different samplings share the stack: each section's mdoc entry holds its own, as SerialEM's
                spacing = {"PixelSpacing": f"{frame.pixel_size_nm * 10:g}"} if frame.pixel_size_nm else None
                stack.append(frame.pixels, spacing)
            elif publisher is not None:
                if not publisher.send(frame, stop):
                    if stop is not None and stop.is_set():
                        break
                    continue  # dropped: counted by the publisher, and by the receiver as missing
            else:
                write_single(to_folder, sent, frame, fmt)
            sent += 1
            log.info("replayed frame %d", sent)
    finally:
        if publisher is not None:
            publisher.close()
    return sent
