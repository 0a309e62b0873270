"""The archive writer: reduce each frame, write it durably as a segment, rotate segments into volumes.

:meth:`ArchiveWriter.write` returns its :class:`ArchiveReceipt` only once the frame's segment is
renamed into place and fsynced (`latticewatch.io.atomic`), so a ledger may mark the frame
archived. Storage failures (disk full, quota, permission, read-only, I/O errors) pause the
writer instead of breaking it: the write raises :class:`ArchiveUnavailable` with nothing partial
left behind, and the writer touches the disk again only after a backoff or a successful
:meth:`ArchiveWriter.probe`. The session directory (lock, segments, volumes, crash recovery) is
`latticewatch.sinks.archive.session`; the file layout is `latticewatch.sinks.archive.layout`.
"""

from __future__ import annotations

import dataclasses
import errno as errno_mod
import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from latticewatch import __version__
from latticewatch.errors import ConfigError
from latticewatch.frame import Analysis, Frame
from latticewatch.io.atomic import write_atomic
from latticewatch.sinks.archive.codec import Codec
from latticewatch.sinks.archive.layout import encode_frame_file, frame_key
from latticewatch.sinks.archive.reduce import Policy, ReducedFrame, margin_to_pixels, reduce_frame
from latticewatch.sinks.archive.rules import UncertaintyRule, lossless_reason
from latticewatch.sinks.archive.session import ArchiveError, SessionDir, tidy_other_sessions

__all__ = ["ArchiveCounters", "ArchiveReceipt", "ArchiveUnavailable", "ArchiveWriter"]

log = logging.getLogger(__name__)


class ArchiveUnavailable(ArchiveError):
    """Archiving is paused: no space, no permission, read-only or failing storage.

    Nothing partial was left behind. The pipeline should keep analysing and publishing, raise an
    error event and count it; the writer retries by itself on a later :meth:`ArchiveWriter.write`
    (after ``retry_in_s``) or when :meth:`ArchiveWriter.probe` succeeds.

    Attributes
    ----------
    reason
        ``"no_space"``, ``"permission"``, ``"read_only"`` or ``"io"``.
    errno
        The OS error number when there was one.
    path
        The path that failed.
    retry_in_s
        Seconds until the writer tries the disk again.
    """

    def __init__(self, message: str, *, reason: str, errno: int | None = None, path: str = "", retry_in_s: float = 0.0):
        super().__init__(message)
        self.reason = reason
        self.errno = errno
        self.path = path
        self.retry_in_s = retry_in_s


def _reason(exc: OSError) -> str:
    if exc.errno in (errno_mod.ENOSPC, errno_mod.EDQUOT):
        return "no_space"
    if exc.errno in (errno_mod.EACCES, errno_mod.EPERM):
        return "permission"
    if exc.errno == errno_mod.EROFS:
        return "read_only"
    return "io"


def _versions() -> dict[str, str]:
    return {
        "latticewatch": __version__,
        "numpy": np.__version__,
        "h5py": h5py.version.version,
        "hdf5": h5py.version.hdf5_version,
    }


@dataclass(frozen=True)
class ArchiveReceipt:
    """Proof that a frame is durably archived (returned only after the rename is fsynced).

    The ledger should keep ``session_dir`` and ``key``: the frame moves from its segment file
    into a volume at the next rotation, and :class:`ArchiveReader` finds it either way.
    """

    frame_id: str
    key: str
    session_dir: Path
    path: Path
    lossless: bool
    lossless_reason: str
    raw_bytes: int
    stored_bytes: int
    warnings: tuple[str, ...] = ()


@dataclass
class ArchiveCounters:
    """Running totals for the metrics sink (read them, do not write them)."""

    frames_written: int = 0
    frames_lossless: int = 0
    raw_bytes: int = 0
    stored_bytes: int = 0
    failures: int = 0
    rotations: int = 0
    rotation_failures: int = 0


class ArchiveWriter:
    """Archive analysed frames of one acquisition session.

    Parameters
    ----------
    root
        The configured archive root; the session lives in ``root/<session>/``.
    session
        Session name (letters, digits, ``.``, ``_``, ``-``).
    policy
        What to do with the low-value class: ``drop[:FILL]``, ``mean`` or ``quantize:N``.
    margin_nm
        Margin around the high-value class kept exactly, in nm (in pixels when a frame has no
        pixel size; the provenance says so).
    reduce
        ``False`` archives every frame whole and lossless.
    low_value_class
        Class id that may be reduced (0 = background for nanoparticles; 1 = contamination for
        graphene). The profile says which.
    uncertainty
        Safety valve: frames whose segmentation it distrusts are archived whole and lossless.
    codec
        Lossless compression of the stored arrays (see :class:`Codec`).
    max_bytes, max_age_s
        Rotate — consolidate the pending segments into the next volume — when they pass this
        size or when the oldest is this old (checked after each write and on :meth:`close`).
    min_free_bytes
        Stop archiving before the filesystem is completely full, so that the ledger and logs on
        the same disk keep working.
    retry_after_s, retry_max_s
        After a failure, the writer waits this long (doubling up to the maximum) before it
        touches the disk again; writes in between fail fast with :class:`ArchiveUnavailable`.
    fsync
        Leave on in production; tests on tmpfs may switch it off for speed.

    Examples
    --------
    >>> import tempfile
    >>> fr = Frame("a.mrc", np.zeros((8, 8), np.int16), pixel_size_nm=0.1)
    >>> with tempfile.TemporaryDirectory() as d:
    ...     with ArchiveWriter(d, "s1", policy="mean", margin_nm=0.2, reduce=False) as w:
    ...         receipt = w.write(fr, None)
    ...     receipt.lossless
    True
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        session: str,
        policy: str | Policy = "drop",
        margin_nm: float = 0.5,
        *,
        reduce: bool = True,
        low_value_class: int = 0,
        uncertainty: UncertaintyRule | Callable[[Analysis | None], str | None] | None = None,
        codec: str | Codec = "auto",
        max_bytes: int = 2 * 2**30,
        max_age_s: float = 3600.0,
        min_free_bytes: int = 64 * 2**20,
        retry_after_s: float = 1.0,
        retry_max_s: float = 60.0,
        fsync: bool = True,
    ):
        self._session = SessionDir(root, session)
        self.root = self._session.root
        self.session = session
        self.session_dir = self._session.path
        self.segments_dir = self._session.segments
        self.policy = Policy.parse(policy)
        if margin_nm < 0:
            raise ConfigError(f"archive margin must be >= 0 nm, got {margin_nm}")
        self.margin_nm = float(margin_nm)
        self.reduce = bool(reduce)
        self.low_value_class = int(low_value_class)
        self.uncertainty = UncertaintyRule() if uncertainty is None else uncertainty
        self.codec = Codec.parse(codec)
        self.max_bytes = int(max_bytes)
        self.max_age_s = float(max_age_s)
        self.min_free_bytes = int(min_free_bytes)
        self.retry_after_s = float(retry_after_s)
        self.retry_max_s = float(retry_max_s)
        self.fsync = bool(fsync)
        self.counters = ArchiveCounters()

        self._lock = threading.RLock()
        self._opened = False
        self._failure: ArchiveUnavailable | None = None
        self._unavailable_since: float | None = None
        self._retry_at = 0.0
        self._backoff = self.retry_after_s
        self._rotate_retry_at = 0.0
        self._last_size = 0

    # -- state ------------------------------------------------------------------------------

    @property
    def available(self) -> bool:
        """False while archiving is paused by a storage failure."""
        return self._failure is None

    @property
    def unavailable_since(self) -> float | None:
        """``time.time()`` of the first failure of the current outage, else ``None``."""
        return self._unavailable_since

    @property
    def pending_segments(self) -> int:
        """Frames archived as segments and not yet consolidated into a volume."""
        return len(self._session.pending)

    def __enter__(self) -> ArchiveWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- public -----------------------------------------------------------------------------

    def write(
        self, frame: Frame, analysis: Analysis | None, provenance: Mapping[str, Any] | None = None
    ) -> ArchiveReceipt:
        """Reduce and archive one frame; return only once it is durably on disk.

        ``provenance`` is stored with the frame, after (and over) what the writer records itself.

        Raises
        ------
        ArchiveUnavailable
            Storage refused (no space, permission, read-only, I/O error) or the writer is
            still backing off from such a failure. Nothing partial is left behind.
        """
        with self._lock:
            self._check_backoff()
            self._ensure_open()
            reduced, settings = self._reduce(frame, analysis)
            prov = {
                "profile": analysis.profile if analysis is not None else None,
                "model_ids": dict(analysis.model_ids) if analysis is not None else {},
                "versions": _versions(),
                "archive": settings,
                **dict(provenance or {}),
            }
            key = frame_key(frame.frame_id)
            data = encode_frame_file(reduced, frame, analysis, prov, session=self.session, codec=self.codec)
            final = self._write_segment(key, data)
            self._count(reduced, len(data))
            return ArchiveReceipt(
                frame_id=frame.frame_id,
                key=key,
                session_dir=self.session_dir,
                path=final,
                lossless=reduced.lossless,
                lossless_reason=reduced.lossless_reason,
                raw_bytes=reduced.raw_nbytes,
                stored_bytes=len(data),
                warnings=self._maybe_rotate(),
            )

    def probe(self) -> bool:
        """Check now whether the archive can be written (ignores the backoff); resume if so.

        "Can be written" means: the session directory is writable and has room for a frame the
        size of the last one.
        """
        with self._lock:
            try:
                self._ensure_open()
                self._check_space(max(self._last_size, 4096))
                write_atomic(self.segments_dir / ".probe", b"latticewatch probe\n", fsync=self.fsync)
                os.unlink(self.segments_dir / ".probe")
            except ArchiveUnavailable:
                return False
            except OSError as exc:
                self._fail(exc, self.segments_dir)
                return False
            self._recovered()
            return True

    def tidy_stale_sessions(self, frame_ids: Collection[str] = ()) -> set[str]:
        """Remove the temporaries killed writers left in this root's other sessions; return which
        of ``frame_ids`` those sessions already hold (archived just before a kill, unknown to the ledger).

        Storage errors are logged, never raised: tidying is a courtesy, and a frame not found here
        is simply archived again.
        """
        keys = {frame_key(frame_id): frame_id for frame_id in frame_ids}
        try:
            found = tidy_other_sessions(self.root, self.session, keys)
        except OSError as exc:
            log.warning("archive: could not tidy the earlier sessions in %s: %s", self.root, exc)
            return set()
        return {keys[key] for key in found}

    def rotate(self) -> Path | None:
        """Consolidate the pending segments into the next volume now; return its path.

        Raises ``OSError`` (after cleaning up) when the volume cannot be written; the segments
        stay where they are and nothing is lost.
        """
        with self._lock:
            self._ensure_open()
            segments = self._session.pending_paths()
            if not segments:
                return None
            self._check_space(sum(p.stat().st_size for p in segments))
            volume = self._session.consolidate(segments, fsync=self.fsync)
            self.counters.rotations += 1
            log.info("archive: rotated %d frames into %s", len(segments), volume)
            return volume

    def close(self) -> None:
        """Consolidate what is pending (when the disk allows) and release the session lock."""
        with self._lock:
            if self._opened and self._session.pending:
                try:
                    self.rotate()
                except Exception as exc:  # noqa: BLE001 - h5py has its own error types
                    # The segments are complete archive files; the next writer of this session
                    # (or ``latticewatch restore``) reads them as they are.
                    log.warning("archive: could not consolidate %s on close: %s", self.session_dir, exc)
            self._session.unlock()
            self._opened = False

    # -- one frame --------------------------------------------------------------------------

    def _reduce(self, frame: Frame, analysis: Analysis | None) -> tuple[ReducedFrame, dict[str, Any]]:
        """The reduced frame, and the settings that made it (for its provenance)."""
        margin_px, margin_unit = margin_to_pixels(self.margin_nm, frame.pixel_size_nm)
        reason = lossless_reason(frame, analysis, reduce=self.reduce, rule=self.uncertainty)
        # A mask that does not fit the frame is not stored: it could not be restored onto it.
        fits = analysis is not None and analysis.mask.shape == frame.pixels.shape
        reduced = reduce_frame(
            frame.pixels,
            analysis.mask if fits else None,
            low_value_class=self.low_value_class,
            policy=self.policy,
            margin_px=margin_px,
            lossless=reason is not None,
            lossless_reason=reason or "",
        )
        settings = {
            "policy": str(self.policy),
            "reduce": self.reduce,
            "lossless": reduced.lossless,
            "lossless_reason": reduced.lossless_reason,
            "low_value_class": self.low_value_class,
            "margin_nm": self.margin_nm,
            "margin_px": margin_px,
            "margin_unit": margin_unit,
            "margin_shape": "square",
            "codec": str(self.codec),
            "uncertainty_rule": dataclasses.asdict(self.uncertainty)
            if isinstance(self.uncertainty, UncertaintyRule)
            else repr(self.uncertainty),
        }
        if margin_unit == "px" and self.margin_nm:
            settings["note"] = "pixel size unknown: margin_nm was applied as pixels"
        return reduced, settings

    def _write_segment(self, key: str, data: memoryview) -> Path:
        """Write one frame's file durably under ``segments/``; a storage failure pauses the writer."""
        final = self._session.segment_path(key)
        self._last_size = len(data)
        try:
            self._check_space(len(data))
            write_atomic(final, data, fsync=self.fsync)
        except OSError as exc:
            raise self._fail(exc, final) from exc
        self._recovered()
        self._session.pending[key] = (len(data), time.time())
        return final

    def _count(self, reduced: ReducedFrame, stored_bytes: int) -> None:
        c = self.counters
        c.frames_written += 1
        c.frames_lossless += int(reduced.lossless)
        c.raw_bytes += reduced.raw_nbytes
        c.stored_bytes += stored_bytes

    def _maybe_rotate(self) -> tuple[str, ...]:
        """Rotate when the pending segments are big or old enough; a failure is a warning, not an error."""
        pending = self._session.pending
        if not pending or time.monotonic() < self._rotate_retry_at:
            return ()
        size = sum(b for b, _ in pending.values())
        oldest = min(t for _, t in pending.values())
        if size < self.max_bytes and time.time() - oldest < self.max_age_s:
            return ()
        try:
            self.rotate()
        except Exception as exc:  # h5py reports some write failures as its own error types
            self.counters.rotation_failures += 1
            self._rotate_retry_at = time.monotonic() + self.retry_max_s
            why = f" ({_reason(exc)})" if isinstance(exc, OSError) else ""
            msg = f"archive rotation deferred{why}: {exc}; frames stay in {self.segments_dir}"
            log.warning(msg)
            return (msg,)
        return ()

    # -- the session and the disk -----------------------------------------------------------

    def _ensure_open(self) -> None:
        """Lock the session and recover it after a crash, once (and again after a failed try)."""
        if self._opened:
            return
        try:
            self._session.lock(fsync=self.fsync)
            self._session.recover()
        except OSError as exc:
            self._session.unlock()
            raise self._fail(exc, self.session_dir) from exc
        self._opened = True

    def _check_space(self, nbytes: int) -> None:
        st = os.statvfs(self.session_dir)
        free = st.f_bavail * st.f_frsize
        if free - nbytes < self.min_free_bytes:
            raise OSError(
                errno_mod.ENOSPC,
                f"{free} bytes free, {nbytes} needed with a reserve of {self.min_free_bytes}",
            )

    # -- outages and backoff ----------------------------------------------------------------

    def _check_backoff(self) -> None:
        """Fail fast, without touching the disk, while backing off from a storage failure."""
        if self._failure is None:
            return
        wait = self._retry_at - time.monotonic()
        if wait > 0:
            f = self._failure
            raise ArchiveUnavailable(
                f"archive paused ({f.reason}): {f}; retrying in {wait:.1f} s",
                reason=f.reason,
                errno=f.errno,
                path=f.path,
                retry_in_s=wait,
            )

    def _fail(self, exc: OSError, path: Path) -> ArchiveUnavailable:
        """Record a storage failure: start or extend the outage and its backoff; return the error to raise."""
        reason = _reason(exc)
        self.counters.failures += 1
        if self._failure is None:
            self._unavailable_since = time.time()
            self._backoff = self.retry_after_s
            log.error("archive: paused, %s at %s: %s (analysis and publishing continue)", reason, path, exc)
        else:
            self._backoff = min(max(self._backoff * 2, self.retry_after_s), self.retry_max_s)
        self._retry_at = time.monotonic() + self._backoff
        self._failure = ArchiveUnavailable(
            f"cannot archive to {path}: {exc.strerror or exc}",
            reason=reason,
            errno=exc.errno,
            path=str(path),
            retry_in_s=self._backoff,
        )
        return self._failure

    def _recovered(self) -> None:
        """End the outage (if any): the disk took a write."""
        if self._failure is not None:
            log.warning(
                "archive: resumed after %.0f s paused (%s)",
                time.time() - (self._unavailable_since or time.time()),
                self._failure.reason,
            )
        self._failure = None
        self._unavailable_since = None
        self._backoff = self.retry_after_s
