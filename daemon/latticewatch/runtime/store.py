"""The daemon's state directory: ledger, event log, spool and quarantine.

::

    <state>/ledger.sqlite      frame progress (see `latticewatch.runtime.ledger`)
    <state>/events.jsonl       the durable event log (see `latticewatch.runtime.eventlog`)
    <state>/spool/             frames of non-replayable sources (streams) waiting to be analysed:
                               <key>.npy (pixels) + <key>.json (id, pixel size, time, meta, origin)
    <state>/quarantine/        what could not be analysed and exists nowhere else:
                               <key>.bin (raw stream message) or <key>.npy (pixels) + <key>.json (reason)

Files are written under a temporary name and renamed, the ``.json`` last, so a spool or
quarantine entry is either complete or absent. Bad *files* are never copied: they stay where
they are and the ledger records why.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from latticewatch.frame import Frame, file_safe
from latticewatch.io.atomic import write_atomic
from latticewatch.io.jsonio import parse_timestamp

log = logging.getLogger(__name__)


def entry_key(frame_id: str) -> str:
    """A file-name-safe, collision-free name for a frame id.

    Examples
    --------
    >>> entry_key("cam:series/1#7")
    'cam_series_1_7-eefd18a190b9'
    """
    readable = file_safe(frame_id)[-80:]
    return f"{readable}-{hashlib.sha256(frame_id.encode()).hexdigest()[:12]}"


class StateDir:
    """Paths and storage under the daemon's state directory.

    Examples
    --------
    >>> import tempfile
    >>> state = StateDir(tempfile.mkdtemp())
    >>> key = state.spool(Frame("cam:s#0", np.zeros((16, 16), np.uint16), 0.05, origin="pull tcp://127.0.0.1:1"))
    >>> state.load_spooled(key).frame_id
    'cam:s#0'
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.spool_dir = self.root / "spool"
        self.quarantine_dir = self.root / "quarantine"
        for d in (self.root, self.spool_dir, self.quarantine_dir):
            d.mkdir(parents=True, exist_ok=True)

    @property
    def ledger_path(self) -> Path:
        return self.root / "ledger.sqlite"

    @property
    def events_path(self) -> Path:
        return self.root / "events.jsonl"

    def spool(self, frame: Frame) -> str:
        """Keep a frame's pixels and metadata on disk until it is analysed; returns its key."""
        key = entry_key(frame.frame_id)
        write_atomic(self.spool_dir / f"{key}.npy", lambda fh: np.save(fh, frame.pixels, allow_pickle=False),
                     fsync=False)
        record = {
            "frame_id": frame.frame_id,
            "pixel_size_nm": frame.pixel_size_nm,
            "acquired_at": frame.acquired_at.isoformat() if frame.acquired_at else None,
            "meta": frame.meta,
            "origin": frame.origin,
        }
        write_atomic(self.spool_dir / f"{key}.json", json.dumps(record, default=str).encode(), fsync=False)
        return key

    def load_spooled(self, key: str) -> Frame:
        record = json.loads((self.spool_dir / f"{key}.json").read_text())
        pixels = np.load(self.spool_dir / f"{key}.npy", allow_pickle=False)
        acquired = parse_timestamp(record["acquired_at"]) if record["acquired_at"] else None
        return Frame(record["frame_id"], pixels, record["pixel_size_nm"], acquired, record["meta"], record["origin"])

    def load_kept(self, frame_id: str) -> Frame | None:
        """A frame's pixels as kept here: spooled (with its metadata) or quarantined; None if neither.

        Quarantine keeps pixels only, so such a frame comes back without pixel size or metadata.
        """
        key = entry_key(frame_id)
        if (self.spool_dir / f"{key}.json").exists():
            return self.load_spooled(key)
        pixels_path = self.quarantine_dir / f"{key}.npy"
        if not pixels_path.exists():
            return None
        reason = json.loads((self.quarantine_dir / f"{key}.json").read_text())
        return Frame(frame_id, np.load(pixels_path, allow_pickle=False), None, origin=reason["origin"])

    def unspool(self, key: str) -> None:
        """Forget a spooled frame once it is no longer needed (published, and archived when archiving)."""
        for suffix in (".json", ".npy"):
            (self.spool_dir / f"{key}{suffix}").unlink(missing_ok=True)

    def quarantine(self, frame_id: str, origin: str, problem: str, *, payload: bytes | None = None,
                   spool_key: str | None = None) -> Path:
        """Keep what cannot be analysed (a raw message, or a spooled frame's pixels) with the reason."""
        key = entry_key(frame_id)
        kept = None
        if payload is not None:
            kept = f"{key}.bin"
            write_atomic(self.quarantine_dir / kept, payload, fsync=False)
        elif spool_key is not None and (self.spool_dir / f"{spool_key}.npy").exists():
            kept = f"{key}.npy"
            os.replace(self.spool_dir / f"{spool_key}.npy", self.quarantine_dir / kept)
            self.unspool(spool_key)
        reason = {"frame_id": frame_id, "origin": origin, "problem": problem, "kept": kept,
                  "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        path = self.quarantine_dir / f"{key}.json"
        write_atomic(path, json.dumps(reason, indent=2).encode(), fsync=False)
        return path
