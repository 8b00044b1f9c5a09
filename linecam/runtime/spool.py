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
  forget. A row is deleted only when the broker's PUBACK for it arrives.
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

import collections
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from paho.mqtt.enums import MQTTErrorCode

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
_SIZE_OF_IDS = f"SELECT COUNT(*), COALESCE(SUM(LENGTH(topic) + LENGTH(payload)), 0) FROM spool WHERE id IN ({_MARKS})"
_DELETE_IDS = f"DELETE FROM spool WHERE id IN ({_MARKS})"


class Spool:
    """The SQLite table. Not thread-safe: one thread uses it (the forwarder), except
    :attr:`rows` / :attr:`bytes`, which are plain ints other threads may read."""

    def __init__(self, path: str | Path, max_rows: int = 500_000, max_bytes: int = 256_000_000,
                 sync: Literal["normal", "full"] = "normal") -> None:
        self.path = Path(path)
        self.max_rows = int(max_rows)
        self.max_bytes = int(max_bytes)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: we issue BEGIN/COMMIT ourselves (one transaction per batch).
            db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as e:
            raise ConfigError(f"cannot open the spool {self.path}: {e}; set spool.path to a writable file") from None
        self._db = db
        try:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                logger.warning("spool %s: journal mode %s, not WAL (file system without shared memory?)",
                               self.path, mode)
            db.execute(f"PRAGMA synchronous={'FULL' if sync == 'full' else 'NORMAL'}")
            # Deleted rows leave free pages that are reused; keep the WAL file from growing past 8 MB.
            db.execute("PRAGMA journal_size_limit=8388608")
            # The working set is the table's tail: 1 MiB of page cache (default 2 MiB) is plenty.
            db.execute("PRAGMA cache_size=-1024")
            db.execute(_SCHEMA)
            rows, size, last = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(topic) + LENGTH(payload)), 0), COALESCE(MAX(id), 0) FROM spool"
            ).fetchone()
        except sqlite3.DatabaseError as e:
            db.close()
            raise ConfigError(
                f"spool {self.path} is not a usable SQLite database ({e}): move it aside (its unsent "
                "messages are lost) or set spool.path elsewhere"
            ) from None
        self.rows, self.bytes = int(rows), int(size)
        #: Rows left by a previous run, and the highest of their ids.
        self.leftover, self.leftover_last_id = self.rows, int(last)

    # -- writes (each one transaction) --------------------------------------------------------
    def append(self, items: Sequence[tuple[str, bytes, int]]) -> tuple[list[int], list[int]]:
        """Insert ``(topic, payload, qos)`` items, then drop the oldest rows while over a cap;
        returns (new ids, dropped ids), in one transaction."""
        added = sum(len(t) + len(p) for t, p, _ in items)
        db = self._db
        now = time.time()
        db.execute("BEGIN IMMEDIATE")
        try:
            ids = []
            for topic, payload, qos in items:
                cur = db.execute("INSERT INTO spool (topic, payload, qos, created) VALUES (?, ?, ?, ?)",
                                 (topic, payload, qos, now))
                ids.append(int(cur.lastrowid))  # type: ignore[arg-type]
            dropped: list[int] = []
            freed = 0
            over_rows = self.rows + len(items) - self.max_rows
            over_bytes = self.bytes + added - self.max_bytes
            if over_rows > 0 or over_bytes > 0:
                dropped, freed = self._oldest(max(over_rows, 0), max(over_bytes, 0))
                db.executemany("DELETE FROM spool WHERE id = ?", [(i,) for i in dropped])
            db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        self.rows += len(items) - len(dropped)
        self.bytes += added - freed
        return ids, dropped

    def _oldest(self, n_rows: int, n_bytes: int) -> tuple[list[int], int]:
        ids: list[int] = []
        freed = 0
        for rid, size in self._db.execute("SELECT id, LENGTH(topic) + LENGTH(payload) FROM spool ORDER BY id"):
            if len(ids) >= n_rows and freed >= n_bytes:
                break
            ids.append(int(rid))
            freed += int(size)
        return ids, freed

    def delete(self, ids: Sequence[int]) -> None:
        if not ids:
            return
        db = self._db
        n = freed = 0
        db.execute("BEGIN IMMEDIATE")
        try:
            for k in range(0, len(ids), _CHUNK):
                # Always _CHUNK parameters (padded with an id that never exists): two prepared
                # statements for the life of the process, not one per batch size.
                chunk = list(ids[k:k + _CHUNK])
                chunk += [-1] * (_CHUNK - len(chunk))
                cnt, size = db.execute(_SIZE_OF_IDS, chunk).fetchone()
                db.execute(_DELETE_IDS, chunk)
                n += int(cnt)  # rows the cap dropped meanwhile are simply not there
                freed += int(size)
            db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        self.rows -= n
        self.bytes -= freed

    def _rollback(self) -> None:
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    # -- reads ----------------------------------------------------------------------------------
    def read_after(self, after_id: int, limit: int) -> list[Row]:
        cur = self._db.execute("SELECT id, topic, payload, qos FROM spool WHERE id > ? ORDER BY id LIMIT ?",
                               (after_id, limit))
        return [Row(int(i), str(t), bytes(p), int(q)) for i, t, p, q in cur]

    def get(self, row_id: int) -> Row | None:
        r = self._db.execute("SELECT id, topic, payload, qos FROM spool WHERE id = ?", (row_id,)).fetchone()
        return None if r is None else Row(int(r[0]), str(r[1]), bytes(r[2]), int(r[3]))

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
SendFn = Callable[[str, bytes, int], "tuple[MQTTErrorCode, int, Any]"]


@dataclass(slots=True)
class _InFlight:
    row_id: int | None  # None: not in the spool (sent directly after a spool write error)
    info: Any  # paho MQTTMessageInfo
    handed_at: float
    dropped: bool = False  # the cap removed its row meanwhile: its ack changes no count


def _confirmed(info: Any) -> bool:
    """True when paho marked this very message published (PUBACK received)."""
    try:
        if info.is_published():
            return True
        # on_publish runs just before paho flags the message: give it a moment.
        info.wait_for_publish(0.05)
        return bool(info.is_published())
    except (RuntimeError, ValueError):
        # Its hand-over rc was NO_CONN (queued during a reconnect): paho never updates that
        # rc, so it cannot be checked; mids are unique among paho's pending messages anyway.
        return True


class SpoolForwarder:
    """The thread between the spool and paho (see the module docstring).

    ``send`` hands a message to paho; ``is_connected`` says whether it is connected;
    ``direct_ack(rejected)`` is called for acks that are not for a spooled message (status,
    metrics); ``on_drop(n, total)`` when the cap dropped ``n`` oldest messages.
    """

    def __init__(
        self,
        spool: Spool,
        send: SendFn,
        is_connected: Callable[[], bool],
        *,
        window: int = 256,
        resend_after_s: float = 60.0,
        direct_ack: Callable[[bool], None] | None = None,
        on_drop: Callable[[int, int], None] | None = None,
        max_unwritten: int = 4096,
        tick_s: float = 0.5,
    ) -> None:
        self.spool = spool
        self._send = send
        self._is_connected = is_connected
        self.window = int(window)
        self.resend_after_s = float(resend_after_s)
        self._direct_ack = direct_ack or (lambda rejected: None)
        self.on_drop = on_drop
        self.max_unwritten = int(max_unwritten)
        self.tick_s = float(tick_s)

        self._cond = threading.Condition()
        self._unwritten: collections.deque[tuple[str, bytes, int]] = collections.deque()
        self._acks: collections.deque[tuple[int, bool]] = collections.deque()  # appended by paho's thread
        self._wake = False
        self._closing = False
        self._thread: threading.Thread | None = None
        self._writing = 0  # items taken from _unwritten, not yet committed

        # Owned by the forwarder thread.
        self._cursor = 0  # highest row id handed to paho
        self._inflight: dict[int, _InFlight] = {}  # mid -> entry
        self._row_mid: dict[int, int] = {}  # row id -> mid (for rows in flight)
        self._retired: set[int] = set()  # mids replaced by a re-send: their late ack is ignored
        self._connected_at: float | None = None
        self._last_warn: dict[str, float] = {}
        self._memory_only = 0  # sent without the spool after a write error, not yet confirmed

        # Counters (written by the forwarder thread; read anywhere).
        self.inserted = self.acked = self.dropped = self.rejected = self.resent = self.errors = 0
        self.leftover_at_start = spool.rows

    # -- any thread -----------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            if self.leftover_at_start:
                logger.info("spool %s holds %d message(s) from a previous run: sending them first",
                            self.spool.path, self.leftover_at_start)
            self._thread = threading.Thread(target=self._run, name="mqtt-spool", daemon=True)
            self._thread.start()

    def submit(self, topic: str, payload: bytes, qos: int) -> None:
        """Queue one message for the spool. Returns at once unless ``max_unwritten`` messages
        are still waiting for the disk (a stalled disk then stalls the caller, and with it the
        systemd watchdog, instead of growing memory)."""
        with self._cond:
            while len(self._unwritten) >= self.max_unwritten and not self._closing and self._alive():
                self._cond.wait(0.5)
            self._unwritten.append((topic, payload, qos))
            self._wake = True
            self._cond.notify_all()

    def on_ack(self, mid: int, rejected: bool) -> None:
        """paho's on_publish (its network thread): just queue it for the forwarder."""
        self._acks.append((mid, rejected))
        with self._cond:
            self._wake = True
            self._cond.notify_all()

    def on_connected(self) -> None:
        with self._cond:
            self._connected_at = time.monotonic()
            self._wake = True
            self._cond.notify_all()

    @property
    def pending(self) -> int:
        """Messages not yet confirmed by the broker (queued for the disk or in the spool)."""
        return len(self._unwritten) + self._writing + self.spool.rows + self._memory_only

    def stats(self) -> SpoolStats:
        return SpoolStats(rows=self.spool.rows, bytes=self.spool.bytes, unwritten=len(self._unwritten) + self._writing,
                          inserted=self.inserted, acked=self.acked, dropped=self.dropped, rejected=self.rejected,
                          resent=self.resent, leftover_at_start=self.leftover_at_start, errors=self.errors)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, apply the acks received so far, stop the thread, close the file."""
        with self._cond:
            self._closing = True
            self._wake = True
            self._cond.notify_all()
        t = self._thread
        if t is not None:
            t.join(timeout)
            if t.is_alive():
                logger.warning("spool thread did not finish within %.0f s", timeout)
                return
        else:  # never started: still write what was submitted
            self._step(hand=False)
        self.spool.close()

    def _alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the forwarder thread -------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                if not (self._wake or self._closing):
                    self._cond.wait(self.tick_s)
                self._wake = False
                closing = self._closing
            try:
                self._step(hand=not closing)
            except Exception:  # never let the thread die: the spool would stop silently
                self.errors += 1
                logger.exception("spool forwarder step failed")
                time.sleep(0.1)
            if closing and not self._unwritten:
                self._apply_acks()
                return

    def _step(self, hand: bool) -> None:
        self._write()
        self._apply_acks()
        if hand and self._is_connected():
            self._resend_stale()
            self._hand_over()

    def _write(self) -> None:
        with self._cond:
            if not self._unwritten:
                return
            n = min(len(self._unwritten), 2048)
            batch = [self._unwritten.popleft() for _ in range(n)]
            self._writing = n
            self._cond.notify_all()  # room for blocked submitters
        try:
            try:
                ids, dropped = self.spool.append(batch)
            except sqlite3.Error as e:
                self._write_failed(batch, e)
                return
            self.inserted += len(ids)
            if dropped:
                self._dropped(dropped)
        finally:
            self._writing = 0

    def _dropped(self, row_ids: list[int]) -> None:
        self.dropped += len(row_ids)
        for rid in row_ids:
            mid = self._row_mid.pop(rid, None)
            if mid is not None and mid in self._inflight:
                self._inflight[mid].dropped = True
        self._warn("drop", "spool %s full (max_rows=%d, max_mb=%.0f): dropped the %d oldest unsent message(s), "
                   "%d in total", self.spool.path, self.spool.max_rows, self.spool.max_bytes / 1e6,
                   len(row_ids), self.dropped)
        if self.on_drop is not None:
            try:
                self.on_drop(len(row_ids), self.dropped)
            except Exception:
                logger.exception("spool on_drop callback failed")

    def _write_failed(self, batch: list[tuple[str, bytes, int]], err: Exception) -> None:
        # Disk full, I/O error: these messages cannot be made durable. Hand them to paho
        # directly (kept in memory while the broker is reachable) rather than dropping them.
        self.errors += 1
        self._warn("write", "spool %s: cannot write (%s): sending %d message(s) without the spool",
                   self.spool.path, err, len(batch))
        for topic, payload, qos in batch:
            rc, mid, info = self._send_safe(topic, payload, qos)
            if rc in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                self._inflight[mid] = _InFlight(None, info, time.monotonic())
                self._memory_only += 1
            else:
                self.dropped += 1
        self.inserted += len(batch)

    def _apply_acks(self) -> None:
        done: list[int] = []
        while self._acks:
            mid, rejected = self._acks.popleft()
            entry = self._inflight.get(mid)
            if entry is None or not _confirmed(entry.info):
                if mid in self._retired:
                    self._retired.discard(mid)
                else:
                    self._direct_ack(rejected)
                continue
            del self._inflight[mid]
            if entry.row_id is not None:
                self._row_mid.pop(entry.row_id, None)
                done.append(entry.row_id)
            else:
                self._memory_only -= 1
            if entry.dropped:
                continue
            self.acked += 1
            if rejected:
                # Resending cannot help (ACL, quota): the row goes, the publisher warns.
                self.rejected += 1
        if done:
            try:
                self.spool.delete(done)
            except sqlite3.Error as e:  # rows stay: re-sent at the next start (duplicates, no loss)
                self.errors += 1
                self._warn("delete", "spool %s: cannot delete confirmed messages (%s)", self.spool.path, e)

    def _hand_over(self) -> None:
        room = self.window - len(self._inflight)
        if room <= 0:
            return
        rows = self.spool.read_after(self._cursor, room)
        for row in rows:
            rc, mid, info = self._send_safe(row.topic, row.payload, row.qos)
            if rc in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                self._inflight[mid] = _InFlight(row.id, info, time.monotonic())
                self._row_mid[row.id] = mid
                self._cursor = row.id
                if row.id <= self.spool.leftover_last_id:
                    self.resent += 1
            elif rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
                break  # paho's queue is full (or a mid collision): next round
            else:
                # Can never be sent (payload too large for the broker, bad topic): drop it loudly.
                self._warn("unsendable", "spooled message to %s cannot be sent (%s): dropped", row.topic, rc)
                self._cursor = row.id
                self.spool.delete([row.id])
                self.dropped += 1

    def _resend_stale(self) -> None:
        if not self._inflight or self._connected_at is None:
            return
        now = time.monotonic()
        limit = self.resend_after_s
        stale = [(mid, e) for mid, e in self._inflight.items()
                 if now - max(e.handed_at, self._connected_at) > limit and e.row_id is not None]
        for mid, entry in stale:
            row = self.spool.get(entry.row_id)  # type: ignore[arg-type]
            if row is None:
                continue
            rc, new_mid, info = self._send_safe(row.topic, row.payload, row.qos)
            if rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                break
            del self._inflight[mid]
            self._retired.add(mid)
            if len(self._retired) > 65536:  # ids that paho dropped never ack: do not keep them forever
                self._retired.clear()
            self._inflight[new_mid] = _InFlight(row.id, info, now)
            self._row_mid[row.id] = new_mid
            self.resent += 1
        if stale:
            self._warn("stale", "%d message(s) unconfirmed %.0f s into the connection: re-sent from the spool",
                       len(stale), limit)

    def _send_safe(self, topic: str, payload: bytes, qos: int) -> tuple[Any, int, Any]:
        try:
            return self._send(topic, payload, qos)
        except ValueError as e:  # paho: bad topic, payload too large
            return str(e), -1, None

    def _warn(self, kind: str, fmt: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last_warn.get(kind, -1e18) < _WARN_EVERY_S:
            return
        self._last_warn[kind] = now
        logger.warning(fmt, *args)
