"""The thread between the durable spool and paho (see :mod:`linecam.runtime.spool`).

Hot path, per round (one wake-up: a message was submitted, or the ``tick_s`` tick): one
transaction that deletes the rows the broker confirmed since the last round and inserts the
new messages (``executemany``); the new rows are handed to paho *from memory* (the payload just
written is never read back); acks wake nobody (paho's thread only queues them) and are applied
without blocking (an ack whose message paho has not flagged yet is looked at again next round,
not waited for); each row's size travels with it in memory, so no size query per delete. The
rows not yet handed over are kept in memory up to ``memory_rows``; beyond that (broker away
for long) the forwarder falls back to reading them from the spool, so memory stays bounded
while the spool is the buffer.
"""

from __future__ import annotations

import collections
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from paho.mqtt.enums import MQTTErrorCode

from linecam.runtime.spool import Row, Spool, SpoolStats

logger = logging.getLogger(__name__)

#: Minimum seconds between two repeated warnings of one kind.
_WARN_EVERY_S = 10.0

#: How long an ack may wait for paho to flag its message published before it is taken for
#: an ack of another message that reused the mid (a QoS 0 one, after 65535 publishes).
_ACK_GRACE_S = 0.05

#: ``send(topic, payload, qos) -> (rc, mid, info)``: hand one message to the MQTT client.
SendFn = Callable[[str, bytes, int], "tuple[MQTTErrorCode, int, Any]"]

_SENT = (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN)


@dataclass(slots=True)
class _InFlight:
    row_id: int | None  # None: not in the spool (sent directly after a spool write error)
    info: Any  # paho MQTTMessageInfo
    handed_at: float
    size: int = 0  # the row's bytes, for the spool's byte count on delete
    dropped: bool = False  # the cap removed its row meanwhile: its ack changes no count
    row: Row | None = None  # kept for a re-send of a stale message (no re-read)


def _published(info: Any) -> bool | None:
    """True when paho marked this very message published (PUBACK received), False when not
    (yet), None when it cannot tell (the hand-over rc was NO_CONN: paho never updates that rc;
    mids are unique among paho's pending messages anyway)."""
    try:
        return bool(info.is_published())
    except (RuntimeError, ValueError):
        return None


class SpoolForwarder:
    """``send`` hands a message to paho; ``is_connected`` says whether it is connected;
    ``direct_ack(rejected)`` is called for acks that are not for a spooled message (status,
    metrics); ``on_drop(n, total)`` when the cap dropped ``n`` oldest messages; ``on_stale(n)``
    when ``n`` messages are still unconfirmed ``resend_after_s`` into a connection (the publisher
    then drops the connection: MQTT re-sends in-flight messages only on a new one).
    """

    def __init__(self, spool: Spool, send: SendFn, is_connected: Callable[[], bool], *, window: int = 256,
                 resend_after_s: float = 60.0, direct_ack: Callable[[bool], None] | None = None,
                 on_drop: Callable[[int, int], None] | None = None, on_stale: Callable[[int], None] | None = None,
                 max_unwritten: int = 4096,
                 tick_s: float = 0.1, memory_rows: int = 4096) -> None:
        self.spool = spool
        self._send = send
        self._is_connected = is_connected
        self.window = int(window)
        self.resend_after_s = float(resend_after_s)
        self._direct_ack = direct_ack or (lambda rejected: None)
        self.on_drop = on_drop
        self.on_stale = on_stale
        self.max_unwritten = int(max_unwritten)
        self.tick_s = float(tick_s)
        self.memory_rows = int(memory_rows)

        self._cond = threading.Condition()
        self._unwritten: collections.deque[tuple[str, bytes, int]] = collections.deque()
        self._acks: collections.deque[tuple[int, bool, float]] = collections.deque()  # from paho's thread
        self._wake = False
        self._closing = False
        self._thread: threading.Thread | None = None
        self._writing = 0  # items taken from _unwritten, not yet committed

        # Owned by the forwarder thread.
        self._cursor = 0  # highest row id handed to paho
        # Committed rows after the cursor, in id order, while ``_mem_ok`` (else: read them from disk).
        self._mem: collections.deque[Row] = collections.deque()
        self._mem_ok = spool.rows == 0  # leftovers of a previous run are read from disk first
        self._waiting: list[tuple[int, bool, float]] = []  # acks paho has not flagged yet
        self._inflight: dict[int, _InFlight] = {}  # mid -> entry
        self._last_file_check = time.monotonic()
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
            if not self._wake:  # the forwarder already knows there is work: no second wake-up
                self._wake = True
                self._cond.notify_all()

    def on_ack(self, mid: int, rejected: bool) -> None:
        """paho's on_publish (its network thread): just queue it for the forwarder."""
        self._acks.append((mid, rejected, time.monotonic()))
        # No wake-up per ack: acks are applied (and their rows deleted in the same transaction as
        # the next messages' insert) at the next round: the next message, or the tick. Only a
        # window filling up with confirmed messages is worth a round of its own.
        if len(self._acks) >= self.window // 2:
            with self._cond:
                if not self._wake:
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
                self._confirm(*self._apply_acks(final=True))
                return

    def _check_file(self) -> None:
        """About once a second: is the spool's file still there (removed by hand, by a cleaner)?"""
        now = time.monotonic()
        if now - self._last_file_check < 1.0:
            return
        self._last_file_check = now
        try:
            what = self.spool.reattach()
        except (OSError, sqlite3.Error, ValueError) as e:
            self.errors += 1
            self._warn("reattach", "spool %s: its file is gone and cannot be re-created (%s)", self.spool.path, e)
            return
        if what is not None:
            self.errors += 1
            logger.error("spool %s was %s", self.spool.path, what)

    def _step(self, hand: bool) -> None:
        self._check_file()
        done, freed = self._apply_acks()
        self._write(done, freed)
        if hand and self._is_connected():
            self._resend_stale()
            self._hand_over()

    def _confirm(self, done: list[int], freed: int) -> None:
        if not done:
            return
        try:
            self.spool.delete(done, freed)
        except sqlite3.Error as e:  # rows stay: re-sent at the next start (duplicates, no loss)
            self.errors += 1
            self._warn("delete", "spool %s: cannot delete confirmed messages (%s)", self.spool.path, e)

    def _write(self, done: list[int], freed: int) -> None:
        """One transaction: delete the confirmed rows ``done`` and insert what was submitted."""
        with self._cond:
            if not self._unwritten:
                batch = None
            else:
                n = min(len(self._unwritten), 2048)
                batch = [self._unwritten.popleft() for _ in range(n)]
                self._writing = n
                self._cond.notify_all()  # room for blocked submitters
        if batch is None:
            self._confirm(done, freed)
            return
        try:
            try:
                rows, dropped = self.spool.commit(batch, done, freed)
            except sqlite3.Error as e:
                self._confirm(done, freed)
                self._write_failed(batch, e)
                return
            self.inserted += len(rows)
            if self._mem_ok:
                self._mem.extend(rows)
            if dropped:  # may include rows of this very batch: after they joined the memory queue
                self._dropped(dropped)
            if self._mem_ok and len(self._mem) > self.memory_rows:  # broker away: the spool is the buffer
                self._mem.clear()
                self._mem_ok = False
        finally:
            self._writing = 0

    def _dropped(self, row_ids: list[int]) -> None:
        self.dropped += len(row_ids)
        gone = set(row_ids)
        mem = self._mem
        while mem and mem[0].id in gone:  # the oldest unsent rows are the ones the cap drops first
            mem.popleft()
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
            if rc in _SENT:
                self._inflight[mid] = _InFlight(None, info, time.monotonic())
                self._memory_only += 1
            else:
                self.dropped += 1
        self.inserted += len(batch)

    def _apply_acks(self, final: bool = False) -> tuple[list[int], int]:
        """Match the acks received so far to messages in flight; returns the rows to delete
        and their bytes (deleted by the caller, with the round's insert)."""
        done: list[int] = []
        freed = 0
        now = time.monotonic()
        acks = self._waiting
        self._waiting = []
        while self._acks:
            acks.append(self._acks.popleft())
        for mid, rejected, seen in acks:
            entry = self._inflight.get(mid)
            flagged = None if entry is None else _published(entry.info)
            if flagged is False and final:  # closing: no next round, so give paho its moment here
                try:
                    entry.info.wait_for_publish(_ACK_GRACE_S)  # type: ignore[union-attr]
                except (RuntimeError, ValueError):
                    pass
                flagged = _published(entry.info)  # type: ignore[union-attr]
            if entry is None or flagged is False:
                if entry is not None and not final and now - seen < _ACK_GRACE_S:
                    # on_publish runs just before paho flags the message: look again next round.
                    self._waiting.append((mid, rejected, seen))
                elif mid in self._retired:
                    self._retired.discard(mid)
                else:
                    self._direct_ack(rejected)
                continue
            del self._inflight[mid]
            if entry.row_id is not None:
                self._row_mid.pop(entry.row_id, None)
                if not entry.dropped:  # a dropped row is gone from the spool already
                    done.append(entry.row_id)
                    freed += entry.size
            else:
                self._memory_only -= 1
            if entry.dropped:
                continue
            self.acked += 1
            if rejected:
                # Resending cannot help (ACL, quota): the row goes, the publisher warns.
                self.rejected += 1
        return done, freed

    def _next_rows(self, room: int) -> list[Row]:
        if self._mem_ok:
            mem = self._mem
            return [mem.popleft() for _ in range(min(room, len(mem)))]
        rows = self.spool.read_after(self._cursor, room)
        if len(rows) < room:  # caught up with the disk: newer rows come from memory again
            self._mem_ok = True
        return rows

    def _hand_over(self) -> None:
        room = self.window - len(self._inflight)
        if room <= 0:
            return
        rows = self._next_rows(room)
        for k, row in enumerate(rows):
            rc, mid, info = self._send_safe(row.topic, row.payload, row.qos)
            if rc in _SENT:
                self._inflight[mid] = _InFlight(row.id, info, time.monotonic(), row.size, row=row)
                self._row_mid[row.id] = mid
                self._cursor = row.id
                if row.id <= self.spool.leftover_last_id:
                    self.resent += 1
            elif rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
                if self._mem_ok:  # paho's queue is full (or a mid collision): next round, in order
                    self._mem.extendleft(reversed(rows[k:]))
                break
            else:
                # Can never be sent (payload too large for the broker, bad topic): drop it loudly.
                self._warn("unsendable", "spooled message to %s cannot be sent (%s): dropped", row.topic, rc)
                self._cursor = row.id
                self.spool.delete([row.id], row.size)
                self.dropped += 1

    def _resend_stale(self) -> None:
        if not self._inflight or self._connected_at is None:
            return
        now = time.monotonic()
        limit = self.resend_after_s
        stale = [(mid, e) for mid, e in self._inflight.items()
                 if now - max(e.handed_at, self._connected_at) > limit and e.row is not None and not e.dropped]
        for mid, entry in stale:
            row = entry.row
            assert row is not None
            rc, new_mid, info = self._send_safe(row.topic, row.payload, row.qos)
            if rc not in _SENT:
                break
            del self._inflight[mid]
            self._retired.add(mid)
            if len(self._retired) > 65536:  # ids that paho dropped never ack: do not keep them forever
                self._retired.clear()
            self._inflight[new_mid] = _InFlight(row.id, info, now, row.size, row=row)
            self._row_mid[row.id] = new_mid
            self.resent += 1
        if stale:
            self._warn("stale", "%d message(s) unconfirmed %.0f s into the connection: re-sent from the spool",
                       len(stale), limit)
            if self.on_stale is not None:
                try:
                    self.on_stale(len(stale))
                except Exception:
                    logger.exception("spool on_stale callback failed")

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
