"""Store and forward: a durable local spool between the daemon and the MQTT broker.

Every QoS 1 message the daemon publishes (verdict, defect, description) goes through
here; retained status and QoS 0 metrics do not (status is latest-value, re-sent on every
connect; metrics are disposable)::

    any thread --submit()--> [unwritten, bounded] --forwarder thread--> SQLite (WAL)
                                                                     |
                                   paho <--hand over, window of N--- +
                                   paho --on_publish(mid), PUBACK--> delete row

* A message is *accepted* once its row is committed (the forwarder commits whatever
  queued up in one transaction, so a verdict costs one INSERT, not one fsync); only
  committed rows are handed to paho, so nothing reaches the broker that a crash could
  forget (handed over from memory, not read back). A row is deleted only when the broker's
  PUBACK for it arrives. The forwarder thread is :mod:`linecam.runtime.forwarder`.
* paho's in-memory queue holds at most ``window`` spooled messages, and nothing new is
  handed over while disconnected: with the broker down, the spool is the buffer.
* Across reconnects paho re-sends its in-flight QoS 1 messages itself, with the same
  message ids, whatever the clean-start flag (paho 2.x ``_messages_reconnect_reset_out``),
  and never allocates an id still in flight; so the mid -> row map stays valid. Should a
  message still go unconfirmed ``resend_after_s`` seconds into a connection (a client
  library or broker that dropped it), it is handed over again under a fresh mid from the
  spool, and the old mid is retired. A mid can also collide with a later QoS 0 mid after
  65535 publishes: an ack is applied to a row only once paho marks that very message
  published.
* At start, leftovers of a previous run (crash, power cut, broker down at shutdown) are
  sent first, byte for byte: same ``event_id``, so subscribers can de-duplicate.
  Delivery is at least once: duplicates are possible (a crash between PUBACK and the
  row's deletion), losses are not.
* The spool is capped (rows and bytes). When full, the *oldest* rows are dropped, counted
  in :attr:`SpoolStats.dropped`, and ``on_drop`` is called (the daemon publishes a status
  saying so).

``sync``: ``normal`` (default) survives any crash of the process (kill -9, OOM, systemd
watchdog); ``full`` also a power cut, for an fsync per transaction.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal


from linecam.errors import ConfigError

logger = logging.getLogger(__name__)

#: Minimum seconds between two repeated warnings of one kind.
_WARN_EVERY_S = 10.0


@dataclass(frozen=True, slots=True)
class SpoolStats:
    """``rows``/``bytes`` on disk now; the rest are counts since start."""

    rows: int
    bytes: int
    unwritten: int
    inserted: int
    acked: int
    dropped: int
    rejected: int
    resent: int
    leftover_at_start: int
    errors: int


@dataclass(slots=True)
class Row:
    id: int
    topic: str
    payload: bytes
    qos: int
    #: Bytes it counts for against ``max_mb``: topic + payload.
    size: int = 0


_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    topic    TEXT    NOT NULL,
    payload  BLOB    NOT NULL,
    qos      INTEGER NOT NULL,
    created  REAL    NOT NULL
)
"""


_CHUNK = 64
_MARKS = ",".join("?" * _CHUNK)
_SIZE_OF_IDS = f"SELECT COALESCE(SUM(LENGTH(topic) + LENGTH(payload)), 0) FROM spool WHERE id IN ({_MARKS})"
_DELETE_IDS = f"DELETE FROM spool WHERE id IN ({_MARKS})"


#: The spool's files (database, WAL, shared memory): the service's user only.
SPOOL_MODE = 0o600


class Spool:
    """The SQLite table. Not thread-safe: one thread uses it (the forwarder), except
    :attr:`rows` / :attr:`bytes`, which are plain ints other threads may read."""

    def __init__(self, path: str | Path, max_rows: int = 500_000, max_bytes: int = 256_000_000,
                 sync: Literal["normal", "full"] = "normal") -> None:
        self.path = Path(path)
        self.max_rows = int(max_rows)
        self.max_bytes = int(max_bytes)
        self._sync = sync
        self._db = self._open()
        try:
            rows, size, last = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(topic) + LENGTH(payload)), 0), COALESCE(MAX(id), 0) FROM spool"
            ).fetchone()
        except sqlite3.DatabaseError as e:
            self._db.close()
            raise self._unusable(e) from None
        self.rows, self.bytes = int(rows), int(size)
        #: Rows left by a previous run, and the highest of their ids.
        self.leftover, self.leftover_last_id = self.rows, int(last)

    def _unusable(self, e: Exception) -> ConfigError:
        return ConfigError(f"spool {self.path} is not a usable SQLite database ({e}): move it aside (its unsent "
                           "messages are lost) or set spool.path elsewhere")

    def _open(self) -> sqlite3.Connection:
        """Open (or create, mode 0600) the file at :attr:`path` and remember which file it is."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Messages may carry what only the service should read: 0600 whatever the umask.
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, SPOOL_MODE))
            st = os.stat(self.path)
            # isolation_level=None: we issue BEGIN/COMMIT ourselves (one transaction per batch).
            db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as e:
            raise ConfigError(f"cannot open the spool {self.path}: {e}; set spool.path to a writable file") from None
        self._file_id = (st.st_dev, st.st_ino)
        try:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                logger.warning("spool %s: journal mode %s, not WAL (file system without shared memory?)",
                               self.path, mode)
            db.execute(f"PRAGMA synchronous={'FULL' if self._sync == 'full' else 'NORMAL'}")
            # Deleted rows leave free pages that are reused; keep the WAL file from growing past 8 MB.
            db.execute("PRAGMA journal_size_limit=8388608")
            # The working set is the table's tail: 1 MiB of page cache (default 2 MiB) is plenty.
            db.execute("PRAGMA cache_size=-1024")
            db.execute(_SCHEMA)
            for p in (self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm")):
                if p.exists():
                    os.chmod(p, SPOOL_MODE)
        except sqlite3.DatabaseError as e:
            db.close()
            raise self._unusable(e) from None
        return db

    def reattach(self) -> str | None:
        """If the spool's file was removed (or replaced) under us, a restart would lose what the
        open file still holds: write those rows (same ids, same id sequence) into a fresh file at
        :attr:`path` and use it. Returns what happened (None: the file is still ours). A file put
        in its place is moved aside to ``<path>.replaced-<time>``, never overwritten."""
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._file_id:
                return None
            what = "replaced"
            os.replace(self.path, f"{self.path}.replaced-{int(time.time())}")
        except FileNotFoundError:
            what = "removed"
        for suffix in ("-wal", "-shm"):  # the old file's; they belong to no database now
            try:
                os.unlink(f"{self.path}{suffix}")
            except FileNotFoundError:
                pass
        old = self._db
        rows = old.execute("SELECT id, topic, payload, qos, created FROM spool ORDER BY id").fetchall()
        seq = old.execute("SELECT COALESCE(MAX(seq), 0) FROM sqlite_sequence WHERE name = 'spool'").fetchone()[0]
        db = self._open()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("INSERT INTO spool (id, topic, payload, qos, created) VALUES (?, ?, ?, ?, ?)", rows)
            db.execute("DELETE FROM sqlite_sequence WHERE name = 'spool'")
            db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('spool', ?)", (int(seq),))
            db.execute("COMMIT")
        except BaseException:
            db.close()
            raise
        self._db = db
        old.close()
        return f"{what}; re-created it with the {len(rows)} unsent message(s) it held"

    # -- writes (each one transaction) --------------------------------------------------------
    def append(self, items: Sequence[tuple[str, bytes, int]]) -> tuple[list[int], list[int]]:
        """:meth:`append_rows`, returning the new rows' ids."""
        rows, dropped = self.append_rows(items)
        return [r.id for r in rows], dropped

    def append_rows(self, items: Sequence[tuple[str, bytes, int]]) -> tuple[list[Row], list[int]]:
        """Insert ``(topic, payload, qos)`` items, then drop the oldest rows while over a cap;
        returns (the new rows, dropped ids), in one transaction. The rows carry their payload
        and size, so that the forwarder hands them to paho from memory (no re-read)."""
        return self.commit(items, (), 0)

    def commit(self, items: Sequence[tuple[str, bytes, int]], confirmed: Sequence[int],
               confirmed_size: int) -> tuple[list[Row], list[int]]:
        """One transaction for the forwarder's round: delete the ``confirmed`` rows (their bytes
        ``confirmed_size``, carried in memory), insert ``items``, drop the oldest rows while over
        a cap. Returns (the new rows, dropped ids)."""
        sizes = [len(t) + len(p) for t, p, _ in items]
        added = sum(sizes)
        db = self._db
        now = time.time()
        deleted = 0
        last = 0
        db.execute("BEGIN IMMEDIATE")
        try:
            for k in range(0, len(confirmed), _CHUNK):
                chunk = list(confirmed[k:k + _CHUNK])
                chunk += [-1] * (_CHUNK - len(chunk))  # one prepared statement, whatever the count
                deleted += db.execute(_DELETE_IDS, chunk).rowcount
            if items:
                db.executemany("INSERT INTO spool (topic, payload, qos, created) VALUES (?, ?, ?, ?)",
                               [(t, p, q, now) for t, p, q in items])
                # AUTOINCREMENT ids of one writer's batch are consecutive: the last one names them all.
                last = int(db.execute("SELECT last_insert_rowid()").fetchone()[0])
            dropped: list[int] = []
            freed = 0
            over_rows = self.rows - deleted + len(items) - self.max_rows
            over_bytes = self.bytes - confirmed_size + added - self.max_bytes
            if over_rows > 0 or over_bytes > 0:
                dropped, freed = self._oldest(max(over_rows, 0), max(over_bytes, 0))
                db.executemany("DELETE FROM spool WHERE id = ?", [(i,) for i in dropped])
            db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        first = last - len(items) + 1
        rows = [Row(first + k, t, p, q, n) for k, ((t, p, q), n) in enumerate(zip(items, sizes))]
        self.rows += len(items) - len(dropped) - deleted
        self.bytes += added - freed - confirmed_size
        return rows, dropped

    def _oldest(self, n_rows: int, n_bytes: int) -> tuple[list[int], int]:
        ids: list[int] = []
        freed = 0
        for rid, size in self._db.execute("SELECT id, LENGTH(topic) + LENGTH(payload) FROM spool ORDER BY id"):
            if len(ids) >= n_rows and freed >= n_bytes:
                break
            ids.append(int(rid))
            freed += int(size)
        return ids, freed

    def delete(self, ids: Sequence[int], size: int | None = None) -> None:
        """Delete rows (unknown ids are ignored). ``size``: their bytes (topic + payload) when the
        caller carries them in memory, as the forwarder does (then no size query per delete)."""
        if not ids:
            return
        db = self._db
        n = 0
        freed = 0
        db.execute("BEGIN IMMEDIATE")
        try:
            for k in range(0, len(ids), _CHUNK):
                # Always _CHUNK parameters (padded with an id that never exists): one prepared
                # statement for the life of the process, not one per batch size.
                chunk = list(ids[k:k + _CHUNK])
                chunk += [-1] * (_CHUNK - len(chunk))
                if size is None:
                    freed += int(db.execute(_SIZE_OF_IDS, chunk).fetchone()[0])
                n += db.execute(_DELETE_IDS, chunk).rowcount
            db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        self.rows -= n
        self.bytes -= freed if size is None else size

    def _rollback(self) -> None:
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    # -- reads ----------------------------------------------------------------------------------
    def read_after(self, after_id: int, limit: int) -> list[Row]:
        cur = self._db.execute("SELECT id, topic, payload, qos FROM spool WHERE id > ? ORDER BY id LIMIT ?",
                               (after_id, limit))
        return [Row(int(i), str(t), bytes(p), int(q), len(t) + len(p)) for i, t, p, q in cur]

    def close(self) -> None:
        try:
            if self.rows == 0:
                # Everything was delivered: hand the free pages back to the file system.
                self._db.execute("VACUUM")
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as e:
            logger.debug("spool %s: checkpoint on close failed: %s", self.path, e)
        self._db.close()


#: ``send(topic, payload, qos) -> (rc, mid, info)``: hand one message to the MQTT client.
