"""One way to write a file so that readers never see half of it: a hidden temporary name in the
same directory, optionally fsynced, then an atomic rename."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomic(path: Path, content: bytes | Callable[[BinaryIO], object], *, fsync: bool = True) -> None:
    """Write ``content`` (bytes, or a function writing to a binary handle) to ``path`` atomically.

    The temporary name is a dotfile with the process id, so the folder source ignores it and two
    processes never share one; it is removed if writing fails.

    Examples
    --------
    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "verdict.json"
    >>> write_atomic(target, b"{}")
    >>> target.read_bytes()
    b'{}'
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            if isinstance(content, (bytes, bytearray, memoryview)):
                fh.write(content)
            else:
                content(fh)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
