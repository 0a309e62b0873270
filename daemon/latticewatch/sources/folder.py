"""Watch a folder the way SerialEM (and cameras writing one file per frame) fill it.

When is an image complete?
--------------------------
* **MRC stack with a ``<stack>.mdoc``** (SerialEM): SerialEM appends the section's pixels,
  updates the header (``nz``), then rewrites the mdoc with a new ``[ZValue = N]`` section.
  Section N is complete when the mdoc lists it, the header's ``nz`` covers it and the file holds
  its bytes. Because SerialEM rewrites the mdoc (renaming the old one to ``.mdoc~``), the *last*
  listed section is taken once a later one is listed, or the mdoc was closed after writing, or
  it has not changed for ``settle_s`` — so its keys are never read from a half-written mdoc.
  A stack once seen with an mdoc keeps these rules while the mdoc is briefly absent.
* **MRC without an mdoc**: sections below the header's ``nz``, once the file holds the bytes of
  every announced section; the last one only once the file has not changed for ``settle_s`` or
  was closed after writing. A header announcing sections whose bytes are missing (a writer that
  updates the header first, a stalled copy) is waited for, with one warning, never rejected.
* **Any other file** (single MRC frames behave as stacks of one): complete when closed after
  writing or unchanged (size and mtime) for ``settle_s``; read once, never again.
* Finished sections of a growing stack are never read again; a section is never read while
  its bytes are incomplete. Files are only ever opened read-only.
* Ignored: dotfiles, ``~``-suffixed backups (``*.mdoc~``), temporary names (``*.tmp``,
  ``*.part`` …), and suffixes the readers do not support. A directory named like a frame
  (``grid.mrc/``) is a folder: watched like any other, never opened as a file.
* Never opened, one error event each, left in place: anything that is not a regular file (a FIFO
  would block the reader until someone writes to it; sockets, devices), a symbolic link that
  leads out of the watched folder (links inside it are followed), a path too long for the system
  to open (longer than ``PATH_MAX``), a folder that cannot be listed (at start, or when it appears:
  one error with id ``<source>:<folder>/``, e.g. the first folder of a chain whose path exceeds
  ``PATH_MAX``; nothing below it is seen), and a file the daemon has
  no permission to read (once it has settled; it is tried again when it changes).
* mdoc problems: an mdoc larger than `latticewatch.io.mdoc.MAX_MDOC_BYTES`, or one that holds
  no ``[ZValue = N]`` section once settled, gives one error event (id ``<source>:<stack>.mdoc``)
  and its stack is analysed as if it had none; an mdoc listing sections past the end of a
  settled stack gives one error event per missing section (``<stack>#<N>``). The last section of
  a settled mdoc counts even when its last line has no newline.
* An MRC header whose declared extended header is larger than the file, whose section is larger
  than the readers' ``max_pixels`` (`latticewatch.io.readers.DEFAULT_MAX_PIXELS`), or whose declared data
  is absurd (`latticewatch.io.readers.mrc.MAX_DECLARED_BYTES`), is refused once the file has
  settled; headers are read 1024 bytes at a time, never through mrcfile while waiting.
* On start every existing file is examined, so files and sections that arrived while the
  daemon was down are caught up; ``skip`` keeps finished ones from being read again.

``frame_id`` is ``<source name>:<path relative to the folder>`` plus ``#<section>`` for MRC files
(whose section count may grow) and for multi-image files of other formats. A name that is not
valid UTF-8 appears with its undecodable bytes escaped (``caf\\xe9.mrc``, see
`latticewatch.sources.base.printable`), in ids, origins and log lines alike.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import queue
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from latticewatch.frame import Frame, Rejected
from latticewatch.io.mdoc import Mdoc, MdocError, no_sections_problem, read_mdoc, section_info
from latticewatch.io.readers import (
    MRC_SUFFIXES,
    SUPPORTED_SUFFIXES,
    ReadError,
    count_sections,
    mrc_layout,
    read_frames,
)
from latticewatch.sources.base import SkipFn, StopFlag, printable

log = logging.getLogger(__name__)
# watchdog (7.1) logs "queue_events() called when the thread is inactive" as an ERROR when `stop` races an event it
# had already read; the event only mattered to a source that is stopping (the next start's scan finds every file)
logging.getLogger("watchdog.observers.inotify").addFilter(lambda r: "when the thread is inactive" not in r.getMessage())

#: Names that writers use while a file is incomplete, or for backups.
TEMPORARY_SUFFIXES = ("~", ".tmp", ".temp", ".part", ".partial", ".crdownload", ".swp", ".lock", ".filepart")
#: How often pending files are re-examined (also bounds how quickly ``stop`` is honoured).
TICK_S = 0.1


def is_candidate(name: str) -> bool:
    """Whether a file name can hold frames (not hidden, not temporary, a supported format).

    Examples
    --------
    >>> [is_candidate(n) for n in ("a.mrc", ".a.mrc", "a.mrc.mdoc~", "a.tif.part", "notes.txt")]
    [True, False, False, False, False]
    """
    lower = name.lower()
    if name.startswith((".", "~")) or lower.endswith(TEMPORARY_SUFFIXES):
        return False
    return lower.endswith(SUPPORTED_SUFFIXES)


@dataclass
class _Settle:
    """Tracks one file's (size, mtime) to tell when its writer is done with it."""

    signature: tuple[int, int] | None = None
    since: float = 0.0
    closed_at: tuple[int, int] | None = None  # signature when a close-after-write was reported

    def observe(self, path: Path, now: float) -> bool:
        """Update from ``stat``; False when the file is gone."""
        try:
            st = path.stat()
        except FileNotFoundError:
            self.signature = None
            return False
        signature = (st.st_size, st.st_mtime_ns)
        if signature != self.signature:
            self.signature, self.since = signature, now
        return True

    def closed(self, path: Path) -> None:
        try:
            st = path.stat()
        except FileNotFoundError:
            return
        self.closed_at = (st.st_size, st.st_mtime_ns)

    def settled(self, now: float, settle_s: float) -> bool:
        if self.signature is None:
            return False
        return self.signature == self.closed_at or now - self.since >= settle_s


@dataclass
class _Tracked:
    path: Path
    rel: str  # printable: the frame id's part
    is_mrc: bool
    data: _Settle = field(default_factory=_Settle)
    mdoc: _Settle = field(default_factory=_Settle)
    has_mdoc: bool = False
    next_section: int = 0
    done: bool = False  # non-MRC file fully read (or rejected)
    vetted: bool = False  # checked once that it is a regular file we may open
    refused: bool = False  # never to be opened (not a regular file, a link out of the folder …)
    failed_at: tuple[int, int] | None = None  # signature at which reading failed; retried if it changes
    stalled_at: tuple[int, int] | None = None  # signature at which an incomplete section was reported
    mdoc_cache: tuple[tuple[int, int] | None, Mdoc] | None = None  # parsed at the mdoc's signature
    mdoc_failed_at: tuple[int, int] | None = None  # mdoc signature at which it was refused
    missing_reported: int = -1  # highest mdoc section past the stack's end reported
    io_errors: int = 0

    @classmethod
    def found(cls, path: Path, rel: str) -> _Tracked:
        """A file seen for the first time: MRC rules by suffix, mdoc rules if it has an mdoc now."""
        tracked = cls(path, rel, path.suffix.lower() in MRC_SUFFIXES)
        tracked.has_mdoc = tracked.mdoc_path.exists()
        return tracked

    @property
    def shown(self) -> str:
        """The path as origins and log lines show it."""
        return printable(str(self.path))

    @property
    def mdoc_path(self) -> Path:
        return self.path.with_name(self.path.name + ".mdoc")


class FolderSource:
    """Frames from files appearing in a folder (SerialEM stacks + mdoc, one file per frame).

    Parameters
    ----------
    path
        The folder to watch (created if missing; never written to).
    name
        Source name, the prefix of frame ids.
    polling
        Use watchdog's polling observer (SMB/NFS shares, where inotify misses remote writes).
    settle_s
        How long a file (or mdoc) must stay unchanged before its last image counts as complete.
    poll_interval_s
        Interval of the polling observer.
    recursive
        Also watch sub-folders.
    permissive
        Passed to the readers: warn and guess on inconsistent headers.

    Examples
    --------
    >>> import threading, tempfile
    >>> source = FolderSource(tempfile.mkdtemp(), name="incoming", settle_s=0.2)
    >>> stop = threading.Event(); stop.set()
    >>> list(source.frames(stop))
    []
    """

    replayable = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        name: str = "folder",
        polling: bool = False,
        settle_s: float = 1.0,
        poll_interval_s: float = 1.0,
        recursive: bool = True,
        permissive: bool = False,
    ) -> None:
        self.root = Path(path)
        self.name = name
        self.polling = polling
        self.settle_s = settle_s
        self.poll_interval_s = poll_interval_s
        self.recursive = recursive
        self.permissive = permissive
        self.counters: dict[str, int] = {"frames": 0, "rejected": 0, "io_errors": 0}
        self._files: dict[Path, _Tracked] = {}

    # -- events -------------------------------------------------------------------------------

    def _observer(self, inbox: queue.SimpleQueue):
        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                path = os.fsdecode(getattr(event, "dest_path", "") or event.src_path)
                if event.is_directory:
                    if event.event_type in ("created", "moved"):  # a new folder: can it be watched?
                        inbox.put(("folder", path))
                # opens and read-only closes are also our own reads: they change nothing
                elif event.event_type not in ("opened", "closed_no_write"):
                    inbox.put((event.event_type, path))

        observer = PollingObserver(timeout=self.poll_interval_s) if self.polling else Observer()
        observer.schedule(Handler(), str(self.root), recursive=self.recursive)
        return observer

    def _track(self, path: Path) -> _Tracked | None:
        """The tracked file for an event on ``path`` (a data file or its ``.mdoc``)."""
        if path.name.lower().endswith(".mdoc"):
            stack = path.with_name(path.name[: -len(".mdoc")])
            if not is_candidate(stack.name):
                return None
            tracked = self._track(stack)
            if tracked is not None:
                tracked.has_mdoc = True
            return tracked
        if not is_candidate(path.name):
            return None
        tracked = self._files.get(path)
        if tracked is None:
            rel = printable(path.relative_to(self.root).as_posix())
            tracked = self._files[path] = _Tracked.found(path, rel)
        return tracked

    def _catch_up(self) -> tuple[set[Path], list[Rejected]]:
        """Every candidate file now in the folder, and a `Rejected` per folder that cannot be listed."""
        found: set[Path] = set()
        unlisted: list[OSError] = []  # os.walk skips these silently unless told
        walker = (os.walk(self.root, onerror=unlisted.append) if self.recursive
                  else [(str(self.root), [], os.listdir(self.root))])
        for directory, dirs, names in walker:
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(names):
                tracked = self._track(Path(directory) / name)
                if tracked is not None:
                    found.add(tracked.path)
        if found:
            log.info("%s: examining %d existing file(s) in %s", self.name, len(found), self.root)
        return found, [self._unlisted(err) for err in unlisted]

    def _unlisted(self, err: OSError) -> Rejected:
        """One `Rejected` (id ``<source>:<folder>/``) for a folder that cannot be listed, so not watched."""
        where = printable(os.fsdecode(err.filename or ""))
        rel = printable(Path(os.fsdecode(err.filename or "")).relative_to(self.root).as_posix())
        problem = f"{where}: folder cannot be listed ({err.strerror}); its files are not watched"
        log.error("%s: %s", self.name, problem)
        self.counters["rejected"] += 1
        return Rejected(f"{self.name}:{rel}/", where, problem)

    def _new_folder(self, path: Path) -> Iterator[Rejected]:
        """A folder that appeared: watchdog silently skips one it cannot watch (a path over PATH_MAX …)."""
        try:
            with os.scandir(path):
                pass
        except (FileNotFoundError, NotADirectoryError):
            pass  # gone or replaced already: nothing to watch
        except OSError as err:
            yield self._unlisted(err)

    # -- main loop ----------------------------------------------------------------------------

    def frames(self, stop: StopFlag, skip: SkipFn | None = None) -> Iterator[Frame | Rejected]:
        """Yield complete images in arrival order until ``stop`` is set."""
        self.root.mkdir(parents=True, exist_ok=True)
        inbox: queue.SimpleQueue = queue.SimpleQueue()
        observer = self._observer(inbox)
        observer.start()  # before the catch-up scan, so nothing written meanwhile is missed
        try:
            active, unlisted = self._catch_up()
            yield from unlisted
            while not stop.is_set():
                while True:
                    try:
                        kind, raw = inbox.get_nowait()
                    except queue.Empty:
                        break
                    path = Path(raw)
                    if kind == "folder":
                        yield from self._new_folder(path)
                        continue
                    tracked = self._track(path) if kind != "deleted" else self._files.get(path)
                    if tracked is None:
                        continue
                    if kind == "closed":
                        (tracked.mdoc if path != tracked.path else tracked.data).closed(path)
                    active.add(tracked.path)
                now = time.monotonic()
                for path in sorted(active, key=lambda p: self._files[p].data.since):
                    if stop.is_set():
                        break
                    tracked = self._files[path]
                    pending = yield from self._poll(tracked, now, skip or (lambda _fid: False))
                    if not pending:
                        active.discard(path)
                time.sleep(TICK_S)
        finally:
            observer.stop()
            observer.join(timeout=5)

    def reread(self, frame_id: str) -> Frame | None:
        """Read one frame this source yielded before again, exactly as it was (mdoc keys included).

        For the archive backlog: frames published while the archive was unavailable. Safe to call
        from another thread while `frames` runs (it shares no tracking state). ``None`` when the id
        is not this source's or its file holds no such section any more.

        Raises
        ------
        FileNotFoundError
            The file is gone.
        ReadError
            It no longer reads as a frame.
        """
        rest = frame_id.removeprefix(f"{self.name}:")
        if rest == frame_id:
            return None
        rel, _, section = rest.rpartition("#")
        if not rel or not section.isdigit() or self._locate(rest).is_file():
            rel, section = rest, ""  # a single image (whose name may contain '#')
        path = self._locate(rel)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no longer there")
        f = _Tracked.found(path, rel)
        k = int(section or 0)
        sections = read_frames(path, permissive=self.permissive, start=k)
        try:
            frame = next(sections, None)
        finally:
            sections.close()
        return None if frame is None else self._finish(f, frame, frame_id, self._stack_mdoc(f)[0], k)

    def _locate(self, rel: str) -> Path:
        """The path of a frame id's ``rel``: names with undecodable bytes are found by their printable form."""
        path = self.root / rel
        if "\\" not in rel or path.exists():
            return path
        path = self.root
        for part in rel.split("/"):
            candidate = path / part
            if not candidate.exists() and path.is_dir():
                candidate = next((path / n for n in os.listdir(path) if printable(n) == part), candidate)
            path = candidate
        return path

    def _refusal(self, f: _Tracked) -> str | None:
        """Why the file must never be opened, or None when it is a regular file we may read."""
        try:
            st = os.lstat(f.path)
            if stat.S_ISLNK(st.st_mode):
                root, target = os.path.realpath(self.root), os.path.realpath(f.path)
                if os.path.commonpath([root, target]) != root:
                    return (f"symbolic link to {printable(target)}, outside the watched folder {printable(root)}; "
                            "not followed")
                st = os.stat(f.path)
        except FileNotFoundError:
            return None  # gone (or a dangling link): `observe` sees that
        except OSError as err:
            if err.errno != errno.ENAMETOOLONG:
                raise
            return (f"path of {len(os.fsencode(f.path))} bytes is too long to open ({err.strerror}); "
                    "move the file to a shorter path")
        if stat.S_ISDIR(st.st_mode):
            return ""  # a folder named like a frame: watched as a folder, no error
        if not stat.S_ISREG(st.st_mode):
            kinds = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
                     stat.S_IFBLK: "a block device"}
            return f"not a regular file but {kinds.get(stat.S_IFMT(st.st_mode), 'a special file')}; never opened"
        return None

    def _vet(self, f: _Tracked) -> Iterator[Rejected]:
        """Once per file: refuse (one `Rejected`) what must not be opened; False when refused."""
        f.vetted = True
        problem = self._refusal(f)
        if problem is None:
            return True
        f.refused = True
        if problem:
            yield self._rejected(f, ReadError(f.shown, problem), None)
        return False

    def _poll(self, f: _Tracked, now: float, skip: SkipFn) -> Iterator[Frame | Rejected]:
        """Yield what is complete in one file; return True while the file needs watching."""
        if not f.vetted and not (yield from self._vet(f)):
            return False
        if f.refused:
            return False
        if not f.data.observe(f.path, now):
            return False
        if f.failed_at is not None:
            if f.data.signature == f.failed_at:
                return False
            f.failed_at = None  # the file changed since it failed: try again
        if f.has_mdoc:
            f.mdoc.observe(f.mdoc_path, now)
        try:
            if f.is_mrc:
                return (yield from self._poll_stack(f, now, skip))
            return (yield from self._poll_single(f, now, skip))
        except OSError as err:
            if err.errno in (errno.EACCES, errno.EPERM) and f.data.settled(now, self.settle_s):
                # not transient: tried again only when the file changes (a chmod alone does not count)
                f.failed_at = f.data.signature
                problem = f"permission denied ({err.strerror}); left in place, fix its permissions and touch it"
                yield self._rejected(f, ReadError(f.shown, problem), None)
                return False
            # transient (NFS hiccup, file locked by the writer on SMB): retry on the next tick
            f.io_errors += 1
            self.counters["io_errors"] += 1
            level = logging.WARNING if f.io_errors in (1, 10, 100) else logging.DEBUG
            log.log(level, "%s: cannot read %s yet (%s); retrying", self.name, f.shown, printable(str(err)))
            return True

    def _frame_id(self, f: _Tracked, section: int | None) -> str:
        return f"{self.name}:{f.rel}" if section is None else f"{self.name}:{f.rel}#{section}"

    def _rejected(self, f: _Tracked, err: ReadError, section: int | None) -> Rejected:
        self.counters["rejected"] += 1
        log.error("%s: %s", self.name, printable(str(err)))
        return Rejected(self._frame_id(f, section), f.shown, err.problem, pixels=err.pixels)

    def _finish(self, f: _Tracked, frame: Frame, frame_id: str, mdoc: Mdoc | None, section: int) -> Frame:
        meta = dict(frame.meta)
        pixel_size, acquired = frame.pixel_size_nm, frame.acquired_at
        if mdoc is not None and section in mdoc.sections:
            info = section_info(mdoc, section)
            meta["mdoc"] = info.meta
            if info.pixel_size_nm is not None:  # SerialEM's calibration beats the header; the analyser checks it
                pixel_size = info.pixel_size_nm
                meta["pixel_size_source"] = f"{f.mdoc_path.name} [ZValue = {section}] PixelSpacing"
            acquired = info.acquired_at or acquired
        return dataclasses.replace(
            frame, frame_id=frame_id, meta=meta, pixel_size_nm=pixel_size, acquired_at=acquired, origin=f.shown
        )

    def _poll_single(self, f: _Tracked, now: float, skip: SkipFn) -> Iterator[Frame | Rejected]:
        if f.done:
            return False
        if not f.data.settled(now, self.settle_s):
            return True
        n = 0
        try:
            n = count_sections(f.path, permissive=self.permissive)
            ids = [self._frame_id(f, k if n > 1 else None) for k in range(n)]
            mdoc, _problem = self._stack_mdoc(f)  # a single image's mdoc only adds keys: ignored when unusable
            while f.next_section < n and skip(ids[f.next_section]):
                f.next_section += 1
            if f.next_section < n:
                for frame in read_frames(f.path, permissive=self.permissive, start=f.next_section):
                    k = f.next_section
                    f.next_section += 1
                    if not skip(ids[k]):
                        self.counters["frames"] += 1
                        yield self._finish(f, frame, ids[k], mdoc, k)
        except ReadError as err:
            yield self._rejected(f, err, err.section if n > 1 else None)
        f.done = True
        return False

    def _read_mdoc(self, f: _Tracked) -> Mdoc | None:
        """The file's mdoc, parsed once per version (size, mtime); None when it has none now.

        Raises `MdocError` for an mdoc too large to read.
        """
        if not f.has_mdoc:
            return None
        signature = f.mdoc.signature
        if f.mdoc_cache is not None and signature is not None and f.mdoc_cache[0] == signature:
            return f.mdoc_cache[1]
        try:
            doc = read_mdoc(f.mdoc_path)
        except FileNotFoundError:
            return None  # SerialEM is between renaming the old mdoc and writing the new one
        f.mdoc_cache = (signature, doc)
        return doc

    def _stack_mdoc(self, f: _Tracked) -> tuple[Mdoc | None, str | None]:
        """The mdoc and why it cannot be used (too large, no section), or None when it can."""
        try:
            doc = self._read_mdoc(f)
        except MdocError as err:
            return None, printable(str(err))
        return doc, None if doc is None else no_sections_problem(doc, printable(str(f.mdoc_path)))

    def _mdoc_rejected(self, f: _Tracked, problem: str) -> Rejected:
        self.counters["rejected"] += 1
        log.error("%s: %s", self.name, problem)
        return Rejected(f"{self.name}:{f.rel}.mdoc", printable(str(f.mdoc_path)), problem)

    def _poll_stack(self, f: _Tracked, now: float, skip: SkipFn) -> Iterator[Frame | Rejected]:
        if f.stalled_at is not None and f.stalled_at == f.data.signature:
            return True  # still waiting for announced bytes, and nothing changed since the last look
        settled = f.data.settled(now, self.settle_s)
        layout = mrc_layout(f.path)
        if layout is None or layout.problem is not None:
            if not settled:
                return True  # the header is still being written
            f.failed_at = f.data.signature
            if layout is not None:
                yield self._rejected(f, ReadError(f.shown, layout.problem), None)
                return False
            try:  # settled but unparseable: the strict reader says precisely what is wrong
                count_sections(f.path, permissive=self.permissive)
            except ReadError as err:
                yield self._rejected(f, err, None)
            return False
        if layout.complete_sections < layout.nz:
            # the header announces a section whose bytes are not all there yet (a writer that
            # updates the header first, or a stalled copy): wait, however long it takes
            if settled:
                if f.stalled_at is None:
                    log.warning("%s: %s announces %d section(s) but holds %d; waiting for the rest",
                                self.name, f.shown, layout.nz, layout.complete_sections)
                f.stalled_at = f.data.signature
            return True
        f.stalled_at = None
        mdoc = None
        if f.has_mdoc and (f.mdoc_failed_at is None or f.mdoc.signature != f.mdoc_failed_at):
            mdoc, problem = self._stack_mdoc(f)
            if problem is not None:
                if not f.mdoc.settled(now, self.settle_s):
                    return True  # perhaps still being written
                f.mdoc_failed_at, mdoc = f.mdoc.signature, None
                yield self._mdoc_rejected(f, problem)
            elif mdoc is None:
                return True
        if mdoc is not None:
            # a settled mdoc's last section counts, newline or not: its writer is done with it
            limit = min(layout.nz, mdoc.last_z + (1 if f.mdoc.settled(now, self.settle_s) else 0))
        else:
            limit = layout.nz if settled else layout.nz - 1
        while f.next_section < limit:
            k = f.next_section
            frame_id = self._frame_id(f, k)
            if skip(frame_id):
                f.next_section += 1
                continue
            sections = read_frames(f.path, permissive=self.permissive, start=k)
            try:
                frame = next(sections)
            except ReadError as err:
                f.next_section += 1
                yield self._rejected(f, err, k)
                continue
            except StopIteration:
                return True  # the file shrank under us: look again on the next tick
            finally:
                sections.close()  # release the file now, not when the generator is collected
            f.next_section += 1
            self.counters["frames"] += 1
            yield self._finish(f, frame, frame_id, mdoc, k)
        if mdoc is not None and settled and f.mdoc.settled(now, self.settle_s):
            yield from self._missing_sections(f, mdoc, layout.nz)
        return f.next_section < layout.nz or not settled or (f.has_mdoc and not f.mdoc.settled(now, self.settle_s))

    def _missing_sections(self, f: _Tracked, mdoc: Mdoc, nz: int) -> Iterator[Rejected]:
        """One `Rejected` per section a settled mdoc lists past the end of its settled stack."""
        for z in sorted(z for z in mdoc.sections if z >= max(nz, f.missing_reported + 1)):
            f.missing_reported = z
            problem = f"{f.mdoc_path.name} lists section {z} but the stack holds only {nz} section(s)"
            yield self._rejected(f, ReadError(f.shown, problem, section=z), z)
