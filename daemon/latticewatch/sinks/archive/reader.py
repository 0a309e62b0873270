"""Reading an archive back: one file, a session directory or a whole archive root.

Volumes and leftover segments hold the same layout, so the reader lists the frames of every
archive file it finds and keeps one copy of each: the newest, and the volume's when a crash
during a rotation left the same copy in both.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from latticewatch.sinks.archive.codec import load_filter_plugins
from latticewatch.sinks.archive.layout import ArchivedFrame, attr_str, read_frame_group, read_index
from latticewatch.sinks.archive.session import SEGMENTS_DIR

__all__ = ["ArchiveReader", "IndexEntry", "archive_files"]


@dataclass(frozen=True)
class IndexEntry:
    """One row of an archive index, with the file that holds it."""

    key: str
    frame_id: str
    path: Path
    archived_ns: int
    acquired_at: str
    shape: tuple[int, int]
    dtype: str
    policy: str
    lossless: bool
    raw_bytes: int
    exact_fraction: float
    coverage: float
    n_regions: int


def archive_files(path: Path) -> list[Path]:
    """The archive files at ``path``: the file itself, or every ``.h5`` below a directory.

    Hidden files (a writer's temporaries) are not archive files.

    Examples
    --------
    >>> import tempfile
    >>> archive_files(Path(tempfile.mkdtemp()))
    []
    """
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no archive at {path}")
    return sorted(p for p in path.rglob("*.h5") if not p.name.startswith("."))


def _entry(row: np.void, file: Path) -> IndexEntry:
    return IndexEntry(
        key=attr_str(row["key"]),
        frame_id=attr_str(row["frame_id"]),
        path=file,
        archived_ns=int(row["archived_ns"]),
        acquired_at=attr_str(row["acquired_at"]),
        shape=(int(row["rows"]), int(row["cols"])),
        dtype=attr_str(row["dtype"]),
        policy=attr_str(row["policy"]),
        lossless=bool(row["lossless"]),
        raw_bytes=int(row["raw_bytes"]),
        exact_fraction=float(row["exact_fraction"]),
        coverage=float(row["coverage"]),
        n_regions=int(row["n_regions"]),
    )


class ArchiveReader:
    """Read an archive: one file, a session directory, or a root with several sessions.

    A frame held both by a volume and by a leftover segment (a crash during rotation) is listed
    once; when a frame was archived again later, the newest copy wins.

    Examples
    --------
    >>> import tempfile
    >>> import numpy as np
    >>> from latticewatch.frame import Frame
    >>> from latticewatch.sinks.archive.writer import ArchiveWriter
    >>> fr = Frame("a.mrc", np.arange(16, dtype=np.int16).reshape(4, 4))
    >>> with tempfile.TemporaryDirectory() as d:
    ...     with ArchiveWriter(d, "s1", reduce=False) as w:
    ...         _ = w.write(fr, None)
    ...     r = ArchiveReader(d)
    ...     [e.frame_id for e in r.entries()], int(r.read("a.mrc").pixels().sum())
    (['a.mrc'], 120)
    """

    def __init__(self, path: str | os.PathLike[str]):
        load_filter_plugins()
        self.path = Path(path)
        self.files: list[Path] = []
        best: dict[str, IndexEntry] = {}
        for file in archive_files(self.path):
            rows = read_index(file)
            if rows.size:
                self.files.append(file)
            is_segment = file.parent.name == SEGMENTS_DIR
            for row in rows:
                entry = _entry(row, file)
                old = best.get(entry.key)
                if old is None or entry.archived_ns > old.archived_ns or (
                    entry.archived_ns == old.archived_ns and not is_segment
                ):
                    best[entry.key] = entry
        self._entries = sorted(best.values(), key=lambda e: (e.archived_ns, e.frame_id))

    def entries(self) -> list[IndexEntry]:
        """The archived frames, oldest first."""
        return list(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def find(self, frame: str) -> IndexEntry:
        """Look a frame up by id, by key, or by a file name that matches exactly one id."""
        for entry in self._entries:
            if frame in (entry.frame_id, entry.key):
                return entry
        matches = [e for e in self._entries if e.frame_id.rsplit("/", 1)[-1] == frame]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise KeyError(f"{frame!r} matches {len(matches)} frames; give the full id or the key")
        raise KeyError(f"no frame {frame!r} in {self.path}")

    def read(self, frame: str | IndexEntry) -> ArchivedFrame:
        """Load one frame (by id, key or :class:`IndexEntry`)."""
        entry = frame if isinstance(frame, IndexEntry) else self.find(frame)
        with h5py.File(entry.path, "r") as f:
            return read_frame_group(f["frames"][entry.key], entry.path)

    def __iter__(self) -> Iterator[ArchivedFrame]:
        for entry in self._entries:
            yield self.read(entry)
