"""`Feed`: one real daemon for the whole fault-injection table: a folder source and a ZeroMQ PULL source on 127.0.0.1.

`Feed` creates inputs, sends stream messages from a bound PUSH socket, and reads what the daemon did from its
event log, ledger and quarantine — never from its objects. If a case kills or stalls the daemon, the case's
inputs are removed and a fresh daemon takes over (so one bug fails one case, not the rest of the table);
`Feed.incidents` records it.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

from faultkit import Daemon, free_port, good_image, read_events, rss_bytes, write_config, write_mrc  # noqa: E402

#: Longest a good frame may wait behind a bad input before the case counts as a stall.
STALL_S = 45.0


class Feed:
    """Inputs in, outcomes out, for one daemon process (restarted when a case kills it)."""

    def __init__(self, root: Path) -> None:
        import zmq

        self.root = root
        self.incoming = root / "incoming"
        port = free_port()
        self.push = zmq.Context.instance().socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 0)
        self.push.setsockopt(zmq.SNDTIMEO, 10_000)
        self.push.bind(f"tcp://127.0.0.1:{port}")
        self.daemon = Daemon(write_config(root, stream=f"tcp://127.0.0.1:{port}"))
        self.incidents: list[str] = []
        self.good = 0
        self.stream_good = 0
        self.rss: dict[str, int] = {}

    def start(self) -> None:
        self.daemon.start()
        self.good_folder_frame(self.incoming)
        self.good_stream_frame()
        self.rss["after_start"] = rss_bytes(self.daemon.pid)

    def events(self) -> list[dict]:
        return read_events(self.daemon.events_path)

    def case_dir(self, case_id: str) -> Path:
        directory = self.incoming / case_id
        directory.mkdir(parents=True, exist_ok=True)
        return directory

    def frame_ids(self, kind: str = "frame") -> set[str]:
        return {e["frame_id"] for e in self.events() if e["type"] == kind}

    def _wait_analysed(self, frame_id: str, what: str) -> None:
        deadline = time.monotonic() + STALL_S
        while time.monotonic() < deadline:
            if frame_id in self.frame_ids():
                return
            if not self.daemon.alive():
                raise DaemonDied(f"the daemon died before {what} was analysed:\n{self.daemon.log_tail()}")
            time.sleep(0.1)
        raise Stalled(f"{what} not analysed within {STALL_S:g} s: the pipeline stalled")

    def good_folder_frame(self, directory: Path) -> str:
        """Write a good MRC into ``directory`` and wait for its analysis; its frame id."""
        self.good += 1
        path = write_mrc(directory / f"good-{self.good}.mrc", good_image(self.good))
        frame_id = f"scope:{path.relative_to(self.incoming).as_posix()}#0"
        self._wait_analysed(frame_id, f"the good frame {path.name}")
        return frame_id

    def good_stream_frame(self) -> str:
        from latticewatch.sources.zmq_stream import encode_frame

        self.good += 1
        number, self.stream_good = self.stream_good, self.stream_good + 1  # consecutive: no gaps counted
        self.push.send_multipart(encode_frame(good_image(self.good), series="good", number=number,
                                              pixel_size_nm=0.05))
        frame_id = f"cam:good#{number}"
        self._wait_analysed(frame_id, f"the good stream frame {frame_id}")
        return frame_id

    def recover(self, case_id: str, why: str) -> None:
        """After a case killed or stalled the daemon: drop its inputs and start a fresh one."""
        self.incidents.append(f"{case_id}: {why}")
        if self.daemon.alive():
            self.daemon.kill()
        shutil.rmtree(self.incoming / case_id, ignore_errors=True)
        self.start()

    def close(self) -> None:
        if self.daemon.alive():
            self.daemon.stop()
        self.push.close()


class DaemonDied(AssertionError):
    pass


class Stalled(AssertionError):
    pass
