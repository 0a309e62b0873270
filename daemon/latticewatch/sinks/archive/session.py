"""One archive session on disk: its directory, its lock, its segments and its volumes.

::

    <root>/<session>/
        <session>-0001.h5        volumes: closed, consolidated, one per rotation
        <session>-0002.h5
        segments/<key>.h5        frames archived since the last rotation, one file each
        .lock                    held (flock) by the one writer of this session

Why segments and volumes: HDF5 cannot append crash-safely (a crash or a full disk in the middle
of an append can leave the whole file unreadable), and rewriting the session file for every
frame costs O(n²). So each frame is first written as its own small file (atomically, see
`latticewatch.io.atomic`) and only then reported archived. At a rotation the pending segments
are copied into the next volume, written atomically too, and deleted only after the volume's
rename is durable. A crash at any point leaves either the segments, or the volume, or both
(identical data, the reader de-duplicates); never a half-written file under a final name.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
from collections.abc import Collection
from pathlib import Path

from latticewatch.errors import StateError
from latticewatch.io.atomic import atomic_path, fsync_dir, is_temporary
from latticewatch.sinks.archive.layout import attr_str, read_index, write_volume

__all__ = ["SEGMENTS_DIR", "ArchiveError", "SessionDir", "tidy_other_sessions"]

log = logging.getLogger(__name__)

SEGMENTS_DIR = "segments"
_SESSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_VOLUME_RE = re.compile(r"^(?P<session>.+)-(?P<number>\d{4,})\.h5$")


class ArchiveError(StateError):
    """The archive cannot be used as configured (bad session name, session locked, bad file)."""


def _unlink_quiet(path: Path) -> None:
    # Leftovers are harmless (the reader de-duplicates, the next writer tidies): never fail for one.
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:  # pragma: no cover - e.g. a read-only remount since the file was written
        log.warning("archive: could not remove %s: %s", path, exc)


class SessionDir:
    """The directory of one archive session, used by one writer at a time.

    Parameters
    ----------
    root
        The archive root; the session lives in ``root/<name>/``.
    name
        Session name (letters, digits, ``.``, ``_``, ``-``; at most 128).

    Attributes
    ----------
    pending
        Segments not yet in a volume: frame key -> (bytes, time written).
    next_volume
        Number of the next volume (after :meth:`recover`).

    Examples
    --------
    >>> import tempfile
    >>> session = SessionDir(tempfile.mkdtemp(), "s1")
    >>> session.lock(fsync=False); session.recover(); session.segment_path("k").name
    'k.h5'
    >>> session.unlock()
    """

    def __init__(self, root: str | os.PathLike[str], name: str):
        if not _SESSION_RE.match(name):
            raise ArchiveError(f"bad session name {name!r}: use letters, digits, '.', '_' and '-' (max 128)")
        self.root = Path(root)
        self.name = name
        self.path = self.root / name
        self.segments = self.path / SEGMENTS_DIR
        self.pending: dict[str, tuple[int, float]] = {}
        self.next_volume = 1
        self._lock_fd: int | None = None

    def segment_path(self, key: str) -> Path:
        """Where the segment of the frame with this key goes."""
        return self.segments / f"{key}.h5"

    def lock(self, *, fsync: bool) -> None:
        """Create the session's directories and take its lock.

        Raises
        ------
        OSError
            The directories or the lock file cannot be created.
        ArchiveError
            Another writer holds the session.
        """
        created = not self.segments.exists()
        self.segments.mkdir(parents=True, exist_ok=True)
        if created and fsync:
            # New directory entries must be durable too, or a crash could lose them with every
            # segment inside.
            for directory in (self.path, self.root):
                fsync_dir(directory)
        # Read-only descriptor: flock works on it, and it does not keep the filesystem "busy" for
        # an administrator's read-only remount.
        lock_fd = os.open(self.path / ".lock", os.O_RDONLY | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(lock_fd)
            if isinstance(exc, BlockingIOError):
                raise ArchiveError(f"archive session {self.path} is in use by another writer") from None
            raise
        self._lock_fd = lock_fd

    def unlock(self) -> None:
        """Release the lock (a no-op when not held)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def recover(self) -> None:
        """Tidy after a crash and learn the state: drop temporaries and segments already in a volume.

        Sets :attr:`pending` to the segments left to consolidate and :attr:`next_volume` past the
        last volume.
        """
        for directory in (self.path, self.segments):
            for path in directory.iterdir():
                if is_temporary(path):
                    log.info("archive: removing incomplete %s", path)
                    _unlink_quiet(path)
        in_volumes: set[tuple[str, int]] = set()
        numbers = [0]
        for path in sorted(self.path.glob("*.h5")):
            m = _VOLUME_RE.match(path.name)
            if not m or m["session"] != self.name:
                continue
            numbers.append(int(m["number"]))
            for row in read_index(path):
                in_volumes.add((attr_str(row["key"]), int(row["archived_ns"])))
        self.next_volume = max(numbers) + 1
        self.pending = {}
        for path in sorted(self.segments.glob("*.h5")):
            rows = read_index(path)
            if rows.size and all((attr_str(r["key"]), int(r["archived_ns"])) in in_volumes for r in rows):
                # Crash between a volume's rename and the deletion of its segments.
                _unlink_quiet(path)
                continue
            st = path.stat()
            self.pending[path.stem] = (st.st_size, st.st_mtime)

    def pending_paths(self) -> list[Path]:
        """The pending segments that are still on disk (an operator may have moved some away)."""
        paths = [self.segment_path(key) for key in self.pending]
        return [p for p in paths if p.exists()]

    def consolidate(self, segments: list[Path], *, fsync: bool) -> Path:
        """Write ``segments`` into the next volume atomically, then delete them; return the volume.

        Raises ``OSError`` (or h5py's own errors) when the volume cannot be written; then nothing
        changed and the segments stay.
        """
        volume = self.path / f"{self.name}-{self.next_volume:04d}.h5"
        with atomic_path(volume, fsync=fsync) as tmp:
            write_volume(tmp, self.name, segments)
        self.next_volume += 1
        # Only now may the segments go: the volume holding their frames is durable.
        for path in segments:
            _unlink_quiet(path)
            self.pending.pop(path.stem, None)
        if fsync:
            fsync_dir(self.segments)
        return volume


def _remove_temporaries(session: Path) -> None:
    for directory in (session, session / SEGMENTS_DIR):
        if directory.is_dir():
            for path in directory.iterdir():
                if is_temporary(path):
                    log.info("archive: removing incomplete %s (left by a stopped writer)", path)
                    _unlink_quiet(path)


def tidy_other_sessions(root: str | os.PathLike[str], own: str, keys: Collection[str] = ()) -> set[str]:
    """Tidy the sessions a killed writer left under ``root``; return which of ``keys`` they hold.

    Only directories that are sessions (a valid session name and a ``.lock`` file) and that no
    writer holds now (their lock is free) are touched, and in them only this package's own
    temporaries (``.<name>.tmp-…``, `latticewatch.io.atomic`). ``keys`` (`frame_key` values) are
    looked up in their volumes' and segments' indexes: a frame whose file was renamed into place
    just before a kill is there although no ledger heard of it, and must not be archived twice.

    Examples
    --------
    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> old = SessionDir(root, "run-1"); old.lock(fsync=False); old.unlock()
    >>> _ = (old.segments / ".k.h5.tmp-1-ab").write_bytes(b"half")
    >>> tidy_other_sessions(root, "run-2", ["k"]), sorted(p.name for p in old.segments.iterdir())
    (set(), [])
    """
    wanted, found = set(keys), set()
    if not Path(root).is_dir():
        return found  # a first run: nothing to tidy
    for session in sorted(Path(root).iterdir()):
        if session.name == own or not _SESSION_RE.match(session.name) or not (session / ".lock").is_file():
            continue
        fd = os.open(session / ".lock", os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live writer's session: not ours to touch
            _remove_temporaries(session)
            if wanted - found:
                for path in [*sorted(session.glob("*.h5")), *sorted((session / SEGMENTS_DIR).glob("*.h5"))]:
                    found.update(k for k in (attr_str(row["key"]) for row in read_index(path)) if k in wanted)
        finally:
            os.close(fd)
    return found
