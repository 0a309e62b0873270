"""The ledger: one SQLite row per frame that ever arrived, recording how far it got.

States::

    seen ──▶ analysed ──▶ published ──▶ archived
      └────▶ quarantined (with the reason; its error event is published too)

* ``seen``: the frame arrived (a stream frame's pixels are in the spool, ``spool`` names them).
* ``analysed``: the analysis is done and its events are stored in the row, not yet in the log.
* ``published``: the events are in the event log; ``events_end`` (the log's committed length)
  moves forward in the same transaction.
* ``archived``: the archive writer returned its receipt (the frame's file is renamed into place
  and fsynced).
* ``quarantined``: it cannot be analysed; ``reason`` says why. A quarantined frame that still has
  pixels is archived whole; ``archived_at`` records it and the state stays ``quarantined``.

``archivable`` marks frames the archive must hold (set when the daemon archives). Those with
``archivable = 1`` and no ``archived_at`` are the archive backlog: published while the archive was
unavailable or its queue full, or when the process stopped — `unarchived` lists them.

Restart rules (what makes "exactly once" hold after a crash or SIGKILL): a frame in any state but
``seen`` is never analysed again (sources are told to skip it); a ``seen`` frame is analysed
again, from its spool file or by the source yielding it again; events stored but not yet
published are published from the row, after the log is cut back to ``events_end`` — so an event
written just before the crash is not written twice.

SQLite runs in WAL mode with ``synchronous=FULL``: a committed transition survives a process
crash and a power cut. One connection, guarded by a lock, serves all threads.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from latticewatch.errors import StateError

log = logging.getLogger(__name__)

STATES = ("seen", "analysed", "published", "archived", "quarantined")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS frames (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    frame_id TEXT NOT NULL UNIQUE,
    source TEXT NOT NULL,
    origin TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    spool TEXT,
    events TEXT,
    seen_at REAL NOT NULL,
    analysed_at REAL,
    published_at REAL,
    archived_at REAL,
    analyses INTEGER NOT NULL DEFAULT 0,
    archivable INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS frames_state ON frames(state);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS notices (event_id TEXT PRIMARY KEY, at REAL NOT NULL);
INSERT OR IGNORE INTO meta(key, value) VALUES ('events_end', 0);
"""


class Ledger:
    """Frame progress in ``<state dir>/ledger.sqlite``.

    Examples
    --------
    >>> import tempfile
    >>> ledger = Ledger(Path(tempfile.mkdtemp()) / "ledger.sqlite")
    >>> ledger.see("cam:s#0", source="cam", origin="pull tcp://127.0.0.1:5555")
    True
    >>> ledger.analysed("cam:s#0", '{"event_id": "cam:s#0/frame"}\\n')
    >>> ledger.state("cam:s#0"), ledger.is_done("cam:s#0"), ledger.see("cam:s#0", source="cam", origin="")
    ('analysed', True, False)
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(frames)")}
        if "archivable" not in columns:  # a ledger written before the daemon archived
            self._db.execute("ALTER TABLE frames ADD COLUMN archivable INTEGER NOT NULL DEFAULT 0")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, *args) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -- reading --------------------------------------------------------------------------------

    def state(self, frame_id: str) -> str | None:
        rows = self._query("SELECT state FROM frames WHERE frame_id = ?", frame_id)
        return rows[0][0] if rows else None

    def is_done(self, frame_id: str) -> bool:
        """True once the frame is past ``seen``: it must never be analysed again."""
        return self.state(frame_id) not in (None, "seen")

    def is_archived(self, frame_id: str) -> bool:
        """True once the archive writer's receipt for the frame is recorded."""
        rows = self._query("SELECT archived_at IS NOT NULL FROM frames WHERE frame_id = ?", frame_id)
        return bool(rows and rows[0][0])

    def counts(self) -> dict[str, int]:
        """Frames per state (every state listed, zeros included)."""
        counts = dict.fromkeys(STATES, 0)
        counts.update(dict(self._query("SELECT state, COUNT(*) FROM frames GROUP BY state")))
        return counts

    def analyses(self, frame_id: str) -> int:
        """How many times the frame was analysed (1 for every analysed frame, by design)."""
        rows = self._query("SELECT analyses FROM frames WHERE frame_id = ?", frame_id)
        return rows[0][0] if rows else 0

    def spooled(self) -> list[tuple[str, str]]:
        """``(frame_id, spool)`` of frames waiting in the spool, in arrival order."""
        return self._query("SELECT frame_id, spool FROM frames WHERE state = 'seen' AND spool IS NOT NULL ORDER BY seq")

    def unpublished(self) -> list[tuple[str, str]]:
        """``(frame_id, events)`` of frames whose events are stored but not yet in the log."""
        return self._query(
            "SELECT frame_id, events FROM frames WHERE events IS NOT NULL AND published_at IS NULL ORDER BY seq")

    def unarchived(self, limit: int = -1) -> list[tuple[str, str]]:
        """``(frame_id, source)`` of the archive backlog, oldest first, at most ``limit`` (-1: all)."""
        return self._query(
            "SELECT frame_id, source FROM frames WHERE archivable = 1 AND archived_at IS NULL "
            "AND state IN ('published', 'quarantined') ORDER BY seq LIMIT ?", limit)

    def events_end(self) -> int:
        """Length in bytes of the event log up to the last committed publication."""
        return self._query("SELECT value FROM meta WHERE key = 'events_end'")[0][0]

    # -- transitions ----------------------------------------------------------------------------

    def see(self, frame_id: str, *, source: str, origin: str, spool: str | None = None) -> bool:
        """Record an arrival; True when the frame still needs analysing (new, or ``seen`` before a crash)."""
        with self._transaction() as db:
            row = db.execute("SELECT state FROM frames WHERE frame_id = ?", (frame_id,)).fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO frames(frame_id, source, origin, state, spool, seen_at) "
                    "VALUES (?, ?, ?, 'seen', ?, ?)",
                    (frame_id, source, origin, spool, time.time()),
                )
                return True
            if row[0] != "seen":
                return False
            if spool is not None:
                db.execute("UPDATE frames SET spool = ? WHERE frame_id = ?", (spool, frame_id))
            return True

    def analysed(self, frame_id: str, events: str, *, archivable: bool = False) -> None:
        """The analysis is done; ``events`` (JSON lines) will be published from here."""
        self._advance(frame_id, "analysed", "seen", events=events, analysed_at=time.time(), archivable=int(archivable),
                      analyses_inc=True)

    def quarantined(self, frame_id: str, reason: str, events: str, *, source: str = "", origin: str = "",
                    archivable: bool = False) -> None:
        """The frame cannot be analysed; record why (creates the row for input never seen as a frame).

        ``archivable``: the frame has pixels the archive should keep (whole and lossless).
        """
        with self._transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO frames(frame_id, source, origin, state, seen_at) VALUES (?, ?, ?, 'seen', ?)",
                (frame_id, source, origin, time.time()),
            )
            db.execute(
                "UPDATE frames SET state = 'quarantined', reason = ?, events = ?, spool = NULL, archivable = ? "
                "WHERE frame_id = ? AND state = 'seen'",
                (reason, events, int(archivable), frame_id),
            )

    def published(self, frame_id: str, events_end: int) -> None:
        """The frame's events are in the log, which is now ``events_end`` bytes long."""
        with self._transaction() as db:
            db.execute(
                "UPDATE frames SET published_at = ?, "
                "state = CASE state WHEN 'analysed' THEN 'published' ELSE state END, spool = NULL WHERE frame_id = ?",
                (time.time(), frame_id),
            )
            db.execute("UPDATE meta SET value = ? WHERE key = 'events_end'", (events_end,))

    def events_appended(self, events_end: int) -> None:
        """Events not belonging to one frame's analysis (notices) are in the log, now this long."""
        with self._transaction() as db:
            db.execute("UPDATE meta SET value = ? WHERE key = 'events_end'", (events_end,))

    def new_notices(self, event_ids: list[str]) -> list[str]:
        """Claim notice event ids (warnings, archive errors); returns those never claimed before, in order.

        Notices are not a frame's analysis, yet their ids are deterministic (``<frame>/pixel-size``)
        and a restarted run can meet the same frame again: claiming them here keeps an id from
        appearing twice in the log. The claim comes before the append, so a kill between the two
        loses that notice rather than repeating it (a notice describes the running process).

        Examples
        --------
        >>> import tempfile
        >>> ledger = Ledger(Path(tempfile.mkdtemp()) / "ledger.sqlite")
        >>> ledger.new_notices(["a/pixel-size", "b/pixel-size"]), ledger.new_notices(["a/pixel-size"])
        (['a/pixel-size', 'b/pixel-size'], [])
        """
        fresh = []
        with self._transaction() as db:
            for event_id in event_ids:
                if db.execute("INSERT OR IGNORE INTO notices(event_id, at) VALUES (?, ?)",
                              (event_id, time.time())).rowcount:
                    fresh.append(event_id)
        return fresh

    def archived(self, frame_id: str) -> bool:
        """The archive writer's receipt came back; False when the frame was archived already.

        A published frame moves to ``archived``; a quarantined one keeps its state (and reason).
        """
        with self._transaction() as db:
            changed = db.execute(
                "UPDATE frames SET archived_at = ?, state = CASE state WHEN 'published' THEN 'archived' ELSE state END "
                "WHERE frame_id = ? AND state IN ('published', 'quarantined') AND archived_at IS NULL",
                (time.time(), frame_id),
            ).rowcount
        if not changed and self.state(frame_id) not in ("archived", "quarantined"):
            raise LedgerError(f"{frame_id}: cannot be archived before it is published; it is {self.state(frame_id)!r}")
        return bool(changed)

    def unarchivable(self, frame_id: str) -> None:
        """Take a frame out of the archive backlog: its pixels are gone (file deleted, spool lost)."""
        with self._transaction() as db:
            db.execute("UPDATE frames SET archivable = 0 WHERE frame_id = ?", (frame_id,))

    def _advance(self, frame_id: str, new: str, expected: str, *, analyses_inc: bool = False, **columns) -> None:
        sets = ", ".join(f"{name} = ?" for name in columns)
        inc = ", analyses = analyses + 1" if analyses_inc else ""
        with self._transaction() as db:
            changed = db.execute(
                f"UPDATE frames SET state = ?, {sets}{inc} WHERE frame_id = ? AND state = ?",
                (new, *columns.values(), frame_id, expected),
            ).rowcount
        if not changed:
            raise LedgerError(f"{frame_id}: cannot move to {new!r}; it is {self.state(frame_id)!r}, not {expected!r}")


class LedgerError(StateError):
    """A transition that would break the state machine (a frame analysed twice, say)."""
