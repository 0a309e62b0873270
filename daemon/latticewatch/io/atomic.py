"""The one way latticewatch writes a file: readers see the old file or the whole new one, never half.

The content goes to a hidden temporary name in the same directory (``.<name>.tmp-<pid>-<random>``:
folder watchers skip dotfiles, and `is_temporary` lets recovery code delete stale ones), is
fsynced, renamed over the target, and the directory is fsynced so the rename survives a power cut.
``fsync=False`` skips both fsyncs where losing the file in a crash only costs a recomputation
(simulated training data, say).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

TEMPORARY_MARK = ".tmp-"


def temporary_name(final: Path) -> Path:
    """A fresh hidden name beside ``final`` that no other process or call will use."""
    return final.with_name(f".{final.name}{TEMPORARY_MARK}{os.getpid()}-{secrets.token_hex(4)}")


def is_temporary(path: Path) -> bool:
    """Whether ``path`` is a temporary name of this module (left behind by a killed writer)."""
    return path.name.startswith(".") and TEMPORARY_MARK in path.name


def fsync_dir(directory: Path) -> None:
    """Make renames and creations in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(final: Path, *, fsync: bool = True) -> Iterator[Path]:
    """A temporary path to write to (for libraries that only take a path); renamed to ``final`` on success.

    On any error the temporary file is removed and the error re-raised; ``final`` is untouched.

    Examples
    --------
    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "a.txt"
    >>> with atomic_path(target) as tmp:
    ...     _ = tmp.write_text("whole")
    >>> target.read_text()
    'whole'
    """
    tmp = temporary_name(final)
    try:
        yield tmp
        if fsync:
            _fsync_file(tmp)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):  # e.g. a read-only remount since the file was created
            tmp.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(final.parent)


def write_atomic(path: Path, content: bytes | memoryview | Callable[[BinaryIO], object], *, fsync: bool = True) -> None:
    """Write ``content`` (bytes, or a function writing to a binary handle) to ``path`` atomically.

    Examples
    --------
    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "verdict.json"
    >>> write_atomic(target, b"{}")
    >>> target.read_bytes()
    b'{}'
    """
    with atomic_path(path, fsync=fsync) as tmp, open(tmp, "xb") as fh:
        if isinstance(content, (bytes, bytearray, memoryview)):
            fh.write(content)
        else:
            content(fh)
