"""The durable event log ``<state dir>/events.jsonl``, kept consistent with the ledger, and the sinks it feeds.

The log is append-only JSON lines. A frame's events are rendered once (when it is analysed),
stored in the ledger, then appended to the log and fsynced; the ledger then records the log's
new length. After a crash the log is cut back to the last recorded length and unpublished
frames are appended again, so no event appears twice.

Once an append is durable, the log hands its typed events to every sink (ZeroMQ publisher,
metrics, dashboard), in log order. A sink that raises is logged and counted; it never stops the
log or the pipeline.

Rotation (``[events.log]``, `latticewatch.config.EventLogConfig`): past a size or an age the live
file is renamed ``events.jsonl.<n>`` (``n`` = 000001, 000002 …: higher is newer), the ledger's
recorded length goes back to 0 and a new live file starts. Only committed bytes are ever rotated
(the rename follows the ledger's commit under the log's lock), so the cut-back on restart only
ever concerns the live file. A SIGKILL between the rename and the ledger's reset leaves no live
file and a stale length: the next start sees that and resets it, losing and repeating nothing.
A background thread then gzips rotated files (written under a temporary name, renamed, then the
plain file removed: while both exist the ``.gz`` is whole) and applies retention, recording the
newest number it removed in ``events.jsonl.removed`` first, so numbers are never reused and
readers can say that older events are gone. `read_log` reads all the files in order.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

from latticewatch.config import EventLogConfig
from latticewatch.io.atomic import fsync_dir, is_temporary, write_atomic
from latticewatch.io.jsonio import parse_timestamp
from latticewatch.runtime.ledger import Ledger
from latticewatch.sinks.events import DEFECT_LABEL, Event, Sink, parse, render

log = logging.getLogger(__name__)

#: Retention's record of what it removed, beside the log: ``<log name>`` + this suffix.
REMOVED_SUFFIX = ".removed"


class EventLog:
    """The append-only ``events.jsonl``, kept consistent with the ledger, feeding the sinks, rotated.

    Parameters
    ----------
    path
        The log file (created when missing).
    ledger
        Where frames' rendered events are stored and the log's committed length is recorded.
    sinks
        Consumers of the events once durable; called under the log's lock, so they see events
        in log order. They must not block.
    on_sink_error
        Called (with the sink) after a sink raised, for the run's counters.
    rotation
        When to rotate, what to keep, whether to compress; None: one file that grows forever.

    Examples
    --------
    >>> import tempfile
    >>> from latticewatch.sinks.events import error_event
    >>> root = Path(tempfile.mkdtemp())
    >>> ledger = Ledger(root / "ledger.sqlite")
    >>> events = EventLog(root / "events.jsonl", ledger, rotation=EventLogConfig(max_bytes=1, compress="none"))
    >>> for i in range(2):
    ...     _ = ledger.see(f"m:{i}", source="m", origin="")
    ...     bad = [error_event(f"m:{i}", "", "bad")]
    ...     ledger.quarantined(f"m:{i}", "bad", render(bad))
    ...     events.publish(f"m:{i}", bad)
    >>> [p.name for p in rotated_files(root / "events.jsonl")], ledger.events_end()
    (['events.jsonl.000001', 'events.jsonl.000002'], 0)
    """

    def __init__(self, path: str | Path, ledger: Ledger, *, sinks: Sequence[Sink] = (),
                 on_sink_error: Callable[[Sink], None] | None = None, rotation: EventLogConfig | None = None) -> None:
        self.path = Path(path)
        self.ledger = ledger
        self.sinks = tuple(sinks)
        self.on_sink_error = on_sink_error
        self.rotation = rotation
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists() and ledger.events_end() > 0:
            # killed between a rotation's rename and the ledger's reset (or the file was removed by hand):
            # everything the ledger counted is in the rotated files, the new live file starts empty
            log.info("event log %s is missing; the ledger's recorded length (%d) belongs to the file before it",
                     self.path, ledger.events_end())
            ledger.events_appended(0)
        self._create_live()
        # Appends and the ledger's record of the log's length must happen in the same order, or
        # a later, shorter length could be committed after a longer one and cut events on restart.
        self._lock = threading.Lock()
        self._started = _first_event_time(self.path)
        self._tidy_lock = threading.Lock()
        self._tidy_wanted = threading.Event()
        self._tidier: threading.Thread | None = None

    def recover(self) -> int:
        """Cut the log back to its committed length and publish what was stored but not logged.

        Also finishes what a killed run left of a rotation's compression and retention (in the
        background). Returns the number of frames published here.
        """
        end = self.ledger.events_end()
        size = self.path.stat().st_size
        if size > end:
            log.warning("event log has %d bytes written after the last committed frame (a crash); cutting them",
                        size - end)
            with open(self.path, "r+b") as fh:
                fh.truncate(end)
                os.fsync(fh.fileno())
        elif size < end:
            # the log was truncated or replaced by hand: never cut the ledger's history, just note it
            log.warning("event log is %d bytes shorter than the ledger recorded", end - size)
        pending = self.ledger.unpublished()
        for frame_id, text in pending:
            try:
                events = parse(text)
            except ValueError as err:  # stored by another version: the log still gets it as it was stored
                log.error("%s: stored events are not events of this version (%s); logged, not sent to the sinks",
                          frame_id, err)
                events = []
            with self._lock:
                self._write(text, lambda end, fid=frame_id: self.ledger.published(fid, end))
                self._tell(events)
        if self.rotation is not None:
            self._tidy_soon()
        return len(pending)

    def publish(self, frame_id: str, events: Sequence[Event]) -> None:
        """Append one frame's events (as stored in the ledger), fsync, record the new length, tell the sinks."""
        with self._lock:
            self._write(render(events), lambda end: self.ledger.published(frame_id, end))
            self._tell(events)

    def notify(self, events: Sequence[Event]) -> None:
        """Append events that are not a frame's analysis (archive trouble, warnings); no frame changes state.

        A crash before the ledger records the new length cuts them on restart: they are notices
        about the running process, not results.
        """
        with self._lock:
            self._write(render(events), self.ledger.events_appended)
            self._tell(events)

    def tidy(self) -> None:
        """Compress rotated files and apply retention now (a background thread does it after each rotation)."""
        if self.rotation is None:
            return
        with self._tidy_lock:
            for stale in self.path.parent.glob(f".{self.path.name}.*"):
                if is_temporary(stale):  # a compression killed half-way; its plain file is still there
                    stale.unlink(missing_ok=True)
            for number, file in _rotated(self.path).items():
                plain = _numbered(self.path, number)
                if file.suffix == ".gz":
                    plain.unlink(missing_ok=True)  # the .gz is whole once it has its name
                elif self.rotation.compress == "gzip":
                    _gzip(plain)
            self._retain()

    def _tell(self, events: Sequence[Event]) -> None:
        if not events:
            return
        for sink in self.sinks:
            try:
                sink.consume(events)
            except Exception:  # a live consumer never stops the durable log
                log.exception("sink %s failed on %s", getattr(sink, "name", sink), events[0].event_id)
                if self.on_sink_error is not None:
                    self.on_sink_error(sink)

    def _write(self, text: str, commit: Callable[[int], None]) -> None:
        """Append, fsync, let ``commit`` record the new length in the ledger, then rotate if due (under the lock)."""
        with open(self.path, "ab") as fh:
            if fh.tell() == 0:
                self._started = time.time()
            fh.write(text.encode())
            fh.flush()
            os.fsync(fh.fileno())
            end = fh.tell()
        commit(end)
        r = self.rotation
        if r is not None and end > 0 and (end >= r.max_bytes or (
                r.max_age_s > 0 and self._started is not None and time.time() - self._started >= r.max_age_s)):
            self._rotate()

    def _rotate(self) -> None:
        number = max([*_rotated(self.path), _removed_through(self.path)]) + 1
        target = _numbered(self.path, number)
        os.rename(self.path, target)
        fsync_dir(self.path.parent)  # the rename is durable before the ledger forgets the old length
        self.ledger.events_appended(0)
        self._create_live()
        self._started = None
        log.info("event log rotated: %s", target.name)
        self._tidy_soon()

    def _create_live(self) -> None:
        if not self.path.exists():
            self.path.touch()
            fsync_dir(self.path.parent)  # or a power cut could lose the file the ledger counts bytes of

    def _tidy_soon(self) -> None:
        self._tidy_wanted.set()
        if self._tidier is None:
            self._tidier = threading.Thread(target=self._tidy_forever, name="eventlog-tidy", daemon=True)
            self._tidier.start()

    def _tidy_forever(self) -> None:
        while True:
            self._tidy_wanted.wait()
            self._tidy_wanted.clear()
            try:
                self.tidy()
            except OSError:  # a full or read-only disk: the files stay as they are until the next rotation
                log.exception("event log: compressing or removing rotated files failed")

    def _retain(self) -> None:
        assert self.rotation is not None
        files = sorted(_rotated(self.path).items())
        doomed = files[:-self.rotation.keep] if self.rotation.keep else []
        if self.rotation.keep_days:
            oldest = time.time() - self.rotation.keep_days * 86400
            doomed += [(n, f) for n, f in files[len(doomed):] if f.stat().st_mtime < oldest]
        if not doomed:
            return
        number, newest = doomed[-1]
        record = {"removed_through": number,
                  "last_modified": datetime.fromtimestamp(newest.stat().st_mtime, timezone.utc).isoformat()}
        # recorded before anything is removed: a kill in between leaves files that the next run removes again
        write_atomic(self.path.with_name(self.path.name + REMOVED_SUFFIX), json.dumps(record).encode())
        for n, file in doomed:
            file.unlink(missing_ok=True)
            _numbered(self.path, n).unlink(missing_ok=True)
        log.info("event log retention: removed %d rotated file(s), through %s", len(doomed), newest.name)


def rotated_files(path: str | Path) -> list[Path]:
    """The rotated files of the log at ``path``, oldest first (a ``.gz`` where one is complete).

    Examples
    --------
    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> for name in ("events.jsonl.000002.gz", "events.jsonl.000010", "events.jsonl", "other.jsonl.000001"):
    ...     _ = (root / name).write_bytes(b"")
    >>> [p.name for p in rotated_files(root / "events.jsonl")]
    ['events.jsonl.000002.gz', 'events.jsonl.000010']
    """
    return [file for _n, file in sorted(_rotated(Path(path)).items())]


def removed_until(path: str | Path) -> datetime | None:
    """When the newest file retention removed was last written to (None: nothing removed)."""
    record = _removed_record(Path(path))
    return None if record is None else parse_timestamp(record["last_modified"])


def _numbered(path: Path, number: int) -> Path:
    return path.with_name(f"{path.name}.{number:06d}")


def _rotated(path: Path) -> dict[int, Path]:
    pattern = re.compile(re.escape(path.name) + r"\.(\d{6,})(\.gz)?")
    found: dict[int, Path] = {}
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(path.parent):
            match = pattern.fullmatch(name)
            if match and (match[2] or int(match[1]) not in found):  # the .gz wins: it is only there when whole
                found[int(match[1])] = path.with_name(name)
    return found


def _removed_record(path: Path) -> dict | None:
    try:
        return json.loads(path.with_name(path.name + REMOVED_SUFFIX).read_text())
    except FileNotFoundError:
        return None


def _removed_through(path: Path) -> int:
    record = _removed_record(path)
    return 0 if record is None else int(record["removed_through"])


def _gzip(plain: Path) -> None:
    stat = plain.stat()

    def compress(fh: BinaryIO) -> None:
        with open(plain, "rb") as src, gzip.GzipFile(fileobj=fh, mode="wb", mtime=0) as gz:
            shutil.copyfileobj(src, gz, 1 << 20)
        fh.flush()
        os.utime(fh.fileno(), ns=(stat.st_atime_ns, stat.st_mtime_ns))  # retention by age reads the mtime

    write_atomic(plain.with_name(plain.name + ".gz"), compress)
    plain.unlink()


def _first_event_time(path: Path) -> float | None:
    with open(path, "rb") as fh:
        first = fh.readline()
    try:
        return parse_timestamp(json.loads(first)["at"]).timestamp()
    except (ValueError, KeyError, TypeError):  # empty, or not an event of this version: age counts from now
        return time.time() if first else None


def read_log(path: str | Path, *, since: str | None = None, types: Sequence[str] = (), follow: bool = False,
             stop: threading.Event | None = None, poll_s: float = 0.2) -> Iterator[str]:
    """Lines of an event log after ``since``, optionally only some event types (``latticewatch events``).

    The rotated files are read first, oldest first, then the live file. ``since`` is an event id
    (the events after it) or an ISO 8601 time (events rendered at or after it; a time without a
    zone is UTC); a time before what retention kept is logged as a warning, an id not found raises
    `KeyError` (saying so when retention removed files). ``types`` are event types (``frame``,
    ``particle``, ``error``, ``warning``) or ``defect`` (particles labelled ``stacking_fault``);
    empty means all. Lines are yielded exactly as logged, so they are filtered as plain JSON, not
    as events of this version. An unterminated last line (an append in progress) is not a line yet.

    ``follow``: once at the end, keep yielding lines as they are appended, across rotations (like
    ``tail -F``), until ``stop`` is set (never, when None), checking every ``poll_s`` seconds.

    Examples
    --------
    >>> import tempfile
    >>> from latticewatch.sinks.events import error_event
    >>> path = Path(tempfile.mkdtemp()) / "events.jsonl"
    >>> _ = path.write_text(render([error_event("a", "", "x"), error_event("b", "", "y")]))
    >>> [json.loads(line)["frame_id"] for line in read_log(path, since="a/error")]
    ['b']
    """
    path = Path(path)
    selection = _Selection(since, types)
    gone = removed_until(path)
    if gone is not None and selection.not_before is not None and selection.not_before < gone:
        log.warning("events up to %s were removed by retention ([events.log] keep, keep_days): %s is older; "
                    "printing from the oldest event kept", gone.isoformat(), since)
    for line in _lines(path, follow=follow, stop=stop, poll_s=poll_s):
        if line is None:  # caught up with the log: from here on only new appends
            if not selection.started:
                note = f"; events up to {gone.isoformat()} were removed by retention" if gone else ""
                raise KeyError(f"no event with id {selection.after_id!r} in {path} or its rotated files{note} "
                               "(give an event id or an ISO 8601 time)")
        elif selection.wants(line):
            yield line.decode()


class _Selection:
    """What `read_log` prints: after an id or from a time, of some types."""

    def __init__(self, since: str | None, types: Sequence[str]) -> None:
        self.after_id = None
        self.not_before = None
        if since is not None:
            try:
                t = parse_timestamp(since)
                self.not_before = t if t.tzinfo else t.replace(tzinfo=timezone.utc)
            except ValueError:
                self.after_id = since
        self.types = set(types)
        self.started = self.after_id is None

    def wants(self, line: bytes) -> bool:
        if not line.strip():
            return False
        try:
            event = json.loads(line)
        except ValueError:  # e.g. followed past a crash's cut-back, mid-line: say so, keep reading
            log.warning("skipping a line of the event log that is not JSON: %.80r", line)
            return False
        if not self.started:
            self.started = event.get("event_id") == self.after_id
            return False
        if self.not_before is not None and parse_timestamp(event["at"]) < self.not_before:
            return False
        kind = event.get("type")
        defect = kind == "particle" and event.get("label") == DEFECT_LABEL
        return not self.types or kind in self.types or ("defect" in self.types and defect)


def _lines(path: Path, *, follow: bool, stop: threading.Event | None, poll_s: float) -> Iterator[bytes | None]:
    """Every complete line of the rotated files then the live one; None each time the end is reached."""
    done = 0  # the newest rotated file read
    while True:
        for number, file in sorted(_rotated(path).items()):
            if number > done:
                yield from _whole(file)
                done = number
        try:
            live = open(path, "rb")
        except FileNotFoundError:  # between a rotation's rename and the new file
            live = None
        if live is not None and max(_rotated(path), default=0) > done:  # rotated meanwhile: read that first
            live.close()
            continue
        if live is None:
            yield None
        else:
            with live:
                rotated = yield from _tail(live, path, follow=follow, stop=stop, poll_s=poll_s)
            if rotated:  # the file just read is the first rotated after `done`
                done = min((n for n in _rotated(path) if n > done), default=done)
                continue
        if not follow or _wait(stop, poll_s):
            return


def _whole(file: Path) -> Iterator[bytes]:
    try:
        fh = gzip.open(file, "rb") if file.suffix == ".gz" else open(file, "rb")
    except FileNotFoundError:
        if file.suffix == ".gz":  # removed by retention since it was listed
            return
        yield from _whole(file.with_name(file.name + ".gz"))  # compressed since it was listed
        return
    with fh:
        for line in fh:
            if line.endswith(b"\n"):
                yield line


def _tail(fh: BinaryIO, path: Path, *, follow: bool, stop: threading.Event | None,
          poll_s: float) -> Iterator[bytes | None]:
    """The live file's lines; following, until it is rotated (returns True) or ``stop`` is set."""
    pending = b""
    caught_up = False
    while True:
        chunk = fh.read(1 << 16)
        if chunk:
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                yield line + b"\n"
            continue
        if not caught_up:
            caught_up = True
            yield None
        if not follow:
            return False
        try:
            replaced = os.stat(path).st_ino != os.fstat(fh.fileno()).st_ino
        except FileNotFoundError:
            replaced = True
        if replaced:  # renamed by a rotation: it is complete, whatever was appended before is there to read
            *lines, _ = (pending + fh.read()).split(b"\n")
            for line in lines:
                yield line + b"\n"
            return True
        if os.fstat(fh.fileno()).st_size < fh.tell():  # the daemon restarted and cut uncommitted bytes
            fh.seek(0, os.SEEK_END)
            pending = b""
        if _wait(stop, poll_s):
            return False


def _wait(stop: threading.Event | None, seconds: float) -> bool:
    if stop is None:
        time.sleep(seconds)
        return False
    return stop.wait(seconds)
