"""What every frame source is: the `Source` protocol, and discovery of source plugins.

A source turns the outside world (a watched folder, a ZeroMQ stream, a camera's own protocol)
into `Frame` objects. It does no analysis and keeps no ledger: the runner does both.

Contract
--------
* ``frames(stop, skip)`` is a generator. It yields `Frame` for every complete image and
  `Rejected` for input that arrived but cannot become a frame (malformed message, unreadable
  file); it never raises for bad *input*. It returns soon after ``stop.is_set()`` becomes true
  (within about a poll interval, 0.1–0.5 s) and releases its sockets/observers in a ``finally``.
* ``frame_id`` is stable across restarts: the same input always gets the same id (a file's path
  relative to the watched folder plus ``#section``; a stream's series id plus frame number). The
  ledger, the event ids and exactly-once resumption rest on this. Ids and origins are valid
  Unicode: text from outside (file names, headers) goes through `printable` first (the runner
  applies it again to whatever a plugin yields).
* ``skip(frame_id)`` (optional, may be ``None``) says the frame is already done. Sources that can
  name a frame before reading its pixels ask it first and do not read those pixels; the runner
  checks the ledger again anyway, so a source that cannot ask early (a live stream) may ignore it.
* ``replayable`` says whether the source yields again, after a restart, every frame the ledger
  does not mark as done (a folder: the files are still there). A live stream is not replayable,
  so the runner spools each of its frames to disk on arrival to survive a crash.
* ``counters`` holds monotonically increasing counts the source wants reported (stream gaps,
  malformed messages, files waiting to settle …); the runner copies them into its stats.

Plugins
-------
A plugin adds a source kind through the ``latticewatch.sources`` entry point group; the entry
point resolves to a factory ``(options: dict) -> Source`` where ``options`` is the source's table
from the config file minus its ``kind`` key, plus ``name`` (the table's name, which the source
must use as its `name`). The factory raises `ValueError` naming the key for bad options. A plugin
that fails to import is reported by `discover_sources` and does not break the other kinds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Protocol, runtime_checkable

from latticewatch.frame import Frame, Rejected

log = logging.getLogger(__name__)

#: Entry point group through which plugins add source kinds.
ENTRY_POINT_GROUP = "latticewatch.sources"

#: ``skip(frame_id) -> True`` when the frame is already done and must not be read again.
SkipFn = Callable[[str], bool]


class StopFlag(Protocol):
    """Anything with ``is_set()``: a `threading.Event`, a `multiprocessing.Event` …"""

    def is_set(self) -> bool: ...


@runtime_checkable
class Source(Protocol):
    """A generator of frames from one place.

    Examples
    --------
    >>> import threading, numpy as np
    >>> from latticewatch.sources.memory import MemorySource
    >>> source = MemorySource([np.zeros((32, 32), np.uint16)], name="mem")
    >>> [f.frame_id for f in source.frames(threading.Event())]
    ['mem:0']
    >>> isinstance(source, Source)
    True
    """

    #: Short name used in logs, counters and as the prefix of frame ids where there is no path.
    name: str
    #: True when a restarted source yields again every frame not yet done (files on disk).
    replayable: bool
    #: Counts worth reporting (``gaps``, ``malformed`` …); only ever increase.
    counters: dict[str, int]

    def frames(self, stop: StopFlag, skip: SkipFn | None = None) -> Iterator[Frame | Rejected]:
        """Yield frames (and rejected inputs) until ``stop.is_set()``, or until the input ends."""
        ...


def printable(text: str) -> str:
    """``text`` as valid Unicode: lone surrogates written as backslash escapes.

    A file name that is not valid UTF-8 reaches Python with its undecodable bytes as lone
    surrogates (``os.fsdecode``); a stream header can carry them too (JSON ``"\\udcff"``). Such a
    string cannot be encoded as UTF-8, so it can be neither a ledger key, nor JSON in the event log,
    nor an HDF5 attribute. Frame ids and origins go through this: an undecodable byte ``0xff``
    becomes the four characters ``\\xff``, any other lone surrogate ``\\udXXX``. Valid text
    comes back unchanged, so ids stay as they were for every name that was already valid.

    Examples
    --------
    >>> printable("scope:grid1/a.mrc#3")
    'scope:grid1/a.mrc#3'
    >>> import os
    >>> printable(os.fsdecode(b"scope:caf\\xe9.tif")), printable("sur\\udcffx\\ud800")
    ('scope:caf\\\\xe9.tif', 'sur\\\\xffx\\\\ud800')
    """
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    out = []
    for c in text:
        code = ord(c)
        if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte smuggled by the surrogateescape handler
            out.append(f"\\x{code - 0xDC00:02x}")
        elif 0xD800 <= code <= 0xDFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(c)
    return "".join(out)


#: A plugin's factory: the source's config table (without ``kind``) → a `Source`.
SourceFactory = Callable[[dict[str, Any]], Source]


@dataclass(frozen=True)
class SourcePlugin:
    """One entry of the ``latticewatch.sources`` group: its factory, or why it is unusable."""

    name: str
    factory: SourceFactory | None
    error: str | None


def discover_sources() -> dict[str, SourcePlugin]:
    """All source kinds installed as plugins, each with its factory or the reason it is broken.

    Examples
    --------
    >>> plugins = discover_sources()
    >>> all(p.factory is not None or p.error for p in plugins.values())
    True
    """
    found: dict[str, SourcePlugin] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            factory = ep.load()
            if not callable(factory):
                raise TypeError(f"entry point {ep.value} is not callable")
            found[ep.name] = SourcePlugin(ep.name, factory, None)
        except Exception as err:  # a broken plugin must not break discovery
            log.warning("source plugin %s is unusable: %s", ep.name, err)
            found[ep.name] = SourcePlugin(ep.name, None, f"{type(err).__name__}: {err}")
    return found
