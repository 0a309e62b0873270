"""What the service tests share: a real sd_notify socket, a real `latticewatch run` process, frames written as files.

The tests play systemd: they bind the notification socket, start the daemon with ``NOTIFY_SOCKET``
(and ``WATCHDOG_USEC``) in its environment and read what it says.
"""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import mrcfile
import numpy as np

from waiting import wait_until


class NotifyListener:
    """A bound ``AF_UNIX`` datagram socket recording each message with its arrival time (``@name``: abstract)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind("\0" + address[1:] if address.startswith("@") else address)
        self._socket.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._socket.recv(65536)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append((time.monotonic(), fields))

    def times(self, key: str) -> list[float]:
        return [t for t, fields in list(self.messages) if key in fields]

    def values(self, key: str) -> list[str]:
        return [fields[key] for _t, fields in list(self.messages) if key in fields]

    def wait_for(self, key: str, timeout: float, *, count: int = 1) -> None:
        wait_until(lambda: len(self.times(key)) >= count, timeout, f"{count}× {key} from the daemon")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._socket.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path: Path, profile_dir: Path, **extra: str) -> Path:
    """A config with a folder source ``scope`` on ``<path's folder>/incoming``, every output on free ports;
    ``extra``: whole TOML tables (``runtime="budget_ms = 500"``) replacing the defaults below."""
    tables = {"runtime": "threads = 1\nqueue_size = 2",
              "events": 'address = "tcp://127.0.0.1:%d"\nstatus_interval_s = 0.02' % free_port(),
              "metrics": f"port = {free_port()}",
              "dashboard": f"port = {free_port()}",
              "sources.scope": 'kind = "folder"\npath = "incoming"\nsettle_s = 0.2\npoll_interval_s = 0.1',
              **extra}
    (path.parent / "incoming").mkdir(exist_ok=True)
    body = f'profile = "{profile_dir}"\ndata_dir = "data"\n' + "".join(f"[{k}]\n{v}\n" for k, v in tables.items())
    path.write_text(body)
    return path


def start_daemon(config: Path, stderr_path: Path, *, notify: str | None = None, watchdog_usec: int | None = None,
                 preexec_fn=None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    if notify:
        env["NOTIFY_SOCKET"] = notify
    if watchdog_usec:
        env["WATCHDOG_USEC"] = str(watchdog_usec)
    return subprocess.Popen([sys.executable, "-m", "latticewatch", "run", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=open(stderr_path, "ab"), env=env,
                            cwd=config.parent, preexec_fn=preexec_fn)


def write_frame(folder: Path, name: str, pixels: np.ndarray) -> Path:
    """One MRC file, appearing whole (written aside, then renamed), at 0.05 nm per pixel."""
    part = folder / f".{name}.part"
    with mrcfile.new(part, overwrite=True) as mrc:
        mrc.set_data(pixels.astype(np.float32))
        mrc.voxel_size = 0.5
    target = folder / name
    os.replace(part, target)
    return target


def logged_events(events_path: Path) -> list[dict]:
    if not events_path.exists():
        return []
    return [json.loads(line) for line in events_path.read_text().splitlines() if line.strip()]


def problems_in(log_text: str) -> list[str]:
    """The lines of a daemon's stderr that a clean run must not have: tracebacks, errors, critical failures."""
    return [line for line in log_text.splitlines()
            if "Traceback" in line or line.startswith(("ERROR", "CRITICAL"))]
