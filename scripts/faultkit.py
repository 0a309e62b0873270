"""What `fault-inject`, `soak` and ``tests/fault`` share: a real daemon process, its config, its event log, /proc.

Everything here drives ``python -m latticewatch run`` as a separate process, as a user would; nothing
reaches into the daemon's objects. Linux only (/proc).

Examples
--------
>>> import tempfile
>>> root = Path(tempfile.mkdtemp())
>>> config = write_config(root, folder="incoming", stream=None, outputs=False)
>>> "folder" in config.read_text()
True
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(root: Path, *, folder: str | None = "incoming", stream: str | None = None,
                 profile: str = "nanoparticles", settle_s: float = 0.3, outputs: bool = True,
                 archive: bool = True, queue_size: int = 4, stream_queue: int | None = None,
                 extra: str = "") -> Path:
    """``root/lw.toml``: a folder source ``scope`` (``root/folder``) and/or a ZeroMQ PULL source ``cam``.

    ``stream`` is the endpoint the daemon connects to (the sender binds it); ``stream_queue`` its
    ``high_water_mark`` (None: the daemon's default). With ``outputs`` the publisher,
    metrics and dashboard listen on free ports of 127.0.0.1 (read them back with `output_ports`).
    """
    lines = [f'profile = "{profile}"', 'data_dir = "data"', "[runtime]", "threads = 1", f"queue_size = {queue_size}",
             "[archive]", f"enabled = {str(archive).lower()}"]
    if outputs:
        lines += ["[events]", f'address = "tcp://127.0.0.1:{free_port()}"', "status_interval_s = 1.0",
                  "[metrics]", f"port = {free_port()}", "[dashboard]", f"port = {free_port()}"]
    else:
        lines += ["[events]", "enabled = false", "[metrics]", "enabled = false", "[dashboard]", "enabled = false"]
    if folder is not None:
        (root / folder).mkdir(parents=True, exist_ok=True)
        lines += ["[sources.scope]", 'kind = "folder"', f'path = "{folder}"', f"settle_s = {settle_s}"]
    if stream is not None:
        lines += ["[sources.cam]", 'kind = "zmq"', f'address = "{stream}"', 'socket = "pull"']
        if stream_queue is not None:
            lines.append(f"high_water_mark = {stream_queue}")
    config = root / "lw.toml"
    config.write_text("\n".join(lines) + "\n" + extra)
    return config


def output_ports(config: Path) -> dict[str, int]:
    """The ports `write_config` chose: ``events``, ``metrics``, ``dashboard``."""
    import tomllib

    raw = tomllib.loads(config.read_text())
    return {"events": int(raw["events"]["address"].rsplit(":", 1)[1]), "metrics": raw["metrics"]["port"],
            "dashboard": raw["dashboard"]["port"]}


def good_image(seed: int, size: int = 128) -> np.ndarray:
    """A synthetic particle micrograph (uint16) at 0.05 nm/px, the shipped profile's sampling."""
    from latticewatch.testing.synthetic.frames import generate_frame

    image = generate_frame(np.random.default_rng(seed), (size, size), 0.05).image
    lo, hi = float(image.min()), float(image.max())
    return ((image - lo) / (hi - lo + 1e-12) * 60000).astype(np.uint16)


def write_mrc(path: Path, pixels: np.ndarray, pixel_size_nm: float | None = 0.05) -> Path:
    """A single-frame MRC written next to ``path`` and renamed into place (so it is complete when seen)."""
    import mrcfile

    tmp = path.with_name(path.name + ".tmp")
    with mrcfile.new(tmp, overwrite=True) as mrc:
        mrc.set_data(pixels)
        if pixel_size_nm:
            mrc.voxel_size = pixel_size_nm * 10
    os.replace(tmp, path)
    return path


def read_events(path: Path) -> list[dict]:
    """The event log's complete lines (a line being appended right now is left for the next read)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in data.split(b"\n")[:-1] if line.strip()]


@dataclass
class Daemon:
    """One ``latticewatch run`` process on ``config``; its stderr goes to ``root/daemon.log``."""

    config: Path
    proc: subprocess.Popen | None = None
    starts: int = 0
    exits: list[int] = field(default_factory=list)
    log_offset: int = 0

    @property
    def root(self) -> Path:
        return self.config.parent

    @property
    def events_path(self) -> Path:
        return self.root / "data" / "state" / "events.jsonl"

    @property
    def log_path(self) -> Path:
        return self.root / "daemon.log"

    def start(self) -> Daemon:
        self.log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "latticewatch", "-v", "run", "--config",
                                          str(self.config)], cwd=self.root, stdout=subprocess.DEVNULL, stderr=log)
        self.starts += 1
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
        self.exits.append(self.proc.wait(30))

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM; the exit code (SIGKILL after ``timeout`` s gives -9)."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        code = self.proc.wait(30)
        self.exits.append(code)
        return code

    def wait_ready(self, timeout: float = 120) -> None:
        """Until this start's banner line is logged (a SIGTERM before it meets a process still importing)."""
        def logged() -> bool:
            with open(self.log_path, "rb") as log:
                log.seek(self.log_offset)
                return b"latticewatch daemon: profile" in log.read()

        wait_for(lambda: logged() or not self.alive(), timeout, "the daemon to start")

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""


def _read_stat(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2:].split()  # fields after the command name, which may hold spaces


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the process, all threads."""
    fields = _read_stat(pid)
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime (fields 14, 15 of proc(5))


def rss_bytes(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_BYTES


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def idle_cpu_fraction(pid: int, seconds: float = 5.0) -> float:
    """Fraction of one core the process used over ``seconds`` of wall time."""
    before, start = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return (cpu_seconds(pid) - before) / (time.monotonic() - start)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    """Poll ``predicate`` until it is true (returned) or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
