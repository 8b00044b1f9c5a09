"""``linecam record``: every verdict, defect, description, web defect/gap and status into a database.

Nothing lost, nothing twice:

- a persistent MQTT 5 session (fixed client id, ``clean_start=False``, a session expiry):
  while the recorder restarts, the broker queues its QoS 1 messages;
- manual acknowledgement: a message is PUBACKed only after the transaction holding it
  committed, so a recorder (or database) that dies before the commit gets it again;
- rows keyed on ``event_id`` (:mod:`linecam.station.store`): a redelivery or a spool
  re-send is a no-op;
- several recorders share the load through a shared subscription ``$share/<group>/…``
  (each message goes to one of them). Caveat: mosquitto 2.0 does not persist shared
  subscriptions over a *broker* restart; the recorders re-subscribe within 0.5 s of the
  broker's return, before the daemon's spool re-sends (its first retry is after 1 s), but a
  publisher that reconnects faster could publish into the gap. ``--group ''`` (plain
  persistent subscriptions, every recorder stores everything, duplicates ignored) has no gap. The retained status is subscribed to without
  sharing (a shared subscription never gets retained messages); its copies are one row.

A database that is down is retried with back-off while messages stay unacknowledged at
the broker (its Receive Maximum bounds how many are in flight to us).
"""

from __future__ import annotations

import json
import logging
import queue
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from linecam import schemas
from linecam.errors import BrokerError, LinecamError
from linecam.station.store import RECORDED_TYPES, Store, event_row

logger = logging.getLogger(__name__)

SNAPSHOT_TOPIC = "snapshot"
#: linecam/schemas/snapshot_properties.json: the user properties that join a JPEG to its defect.
_SNAPSHOT_PROPS = jsonschema.Draft202012Validator(json.loads(
    resources.files("linecam.schemas").joinpath("snapshot_properties.json").read_text(encoding="utf-8")))


@dataclass
class RecorderSettings:
    host: str = "127.0.0.1"
    port: int = 1883
    prefix: str = "linecam/+/+"
    #: Shared-subscription group: recorders with the same group split the messages between them.
    group: str | None = "linecam-record"
    client_id: str | None = None
    session_expiry_s: int = 86400
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: Path | None = None
    #: Read the defect's snapshot file (when this machine can see it) into the database.
    copy_snapshots: bool = False
    batch: int = 500
    receive_maximum: int = 1000
    types: Sequence[str] = RECORDED_TYPES

    def resolved_client_id(self) -> str:
        return self.client_id or f"linecam-record-{self.group or 'solo'}-{socket.gethostname()}"


@dataclass
class RecorderStats:
    received: int = 0
    stored: int = 0
    duplicates: int = 0
    invalid: int = 0
    snapshots: int = 0
    db_errors: int = 0
    by_type: dict[str, int] = field(default_factory=dict)


class Recorder:
    """MQTT -> :class:`Store`. ``start()``, then ``stop()`` (or use as a context manager)."""

    def __init__(self, store: Store, settings: RecorderSettings) -> None:
        p = settings.prefix.rstrip("/")
        if not p or "#" in p or p.startswith("$share"):
            raise LinecamError(f"--prefix {settings.prefix!r}: give the plain prefix (e.g. linecam/+/+); "
                               "the shared subscription is --group")
        self.store, self.s = store, settings
        shared = f"$share/{settings.group}/" if settings.group else ""
        self.filters = [(f"{shared if t != 'status' else ''}{p}/{t}", 1) for t in settings.types]
        self.filters.append((f"{shared}{p}/{SNAPSHOT_TOPIC}", 0))
        self.stats = RecorderStats()
        self._q: queue.Queue[mqtt.MQTTMessage | None] = queue.Queue()
        self._stop = threading.Event()
        self._stop_now = threading.Event()
        self._subscribed = threading.Event()
        self._fatal: str | None = None
        self._writer = threading.Thread(target=self._write_loop, name="record-writer", daemon=True)
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=settings.resolved_client_id(),
                        protocol=mqtt.MQTTv5, manual_ack=True)
        # Quick to come back: mosquitto (2.0.x) does not restore shared subscriptions after a broker
        # restart, so a shared group gets nothing until its recorders have subscribed again (the
        # line daemon's first retry is 1 s after it lost the broker, then 2, 4 ... s).
        c.reconnect_delay_set(0.1, 0.5)
        if settings.username:
            c.username_pw_set(settings.username, settings.password)
        if settings.tls:
            c.tls_set(ca_certs=str(settings.ca_file) if settings.ca_file else None)
        c.on_connect = self._on_connect
        c.on_subscribe = self._on_subscribe
        c.on_message = lambda _c, _u, msg: self._q.put(msg)
        c.on_disconnect = self._on_disconnect
        self.client = c

    # -- MQTT ------------------------------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, _u: Any, flags: Any, rc: Any, _p: Any) -> None:
        if rc.is_failure:
            self._fatal = f"MQTT broker {self.s.host}:{self.s.port} refused the recorder ({rc}): check --username"
            self._subscribed.set()
            client.disconnect()
            return
        logger.info("recorder connected to %s:%d (session present: %s)", self.s.host, self.s.port,
                    flags.session_present)
        client.subscribe(self.filters)

    def _on_subscribe(self, _c: Any, _u: Any, _mid: int, codes: Any, _p: Any) -> None:
        bad = [f for (f, _), rc in zip(self.filters, codes) if getattr(rc, "is_failure", False)]
        if bad:
            self._fatal = f"MQTT broker refused the subscription(s) {bad}: check its ACLs (and MQTT 5 support)"
        self._subscribed.set()

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if not self._stop.is_set():
            logger.warning("recorder lost the broker %s:%d (%s); reconnecting, unacknowledged messages are "
                           "redelivered", self.s.host, self.s.port, rc)

    def start(self, timeout: float = 10.0) -> Recorder:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.s.session_expiry_s
        props.ReceiveMaximum = self.s.receive_maximum
        try:
            self.client.connect(self.s.host, self.s.port, keepalive=30, clean_start=False, properties=props)
        except OSError as e:
            raise BrokerError(f"cannot reach MQTT broker {self.s.host}:{self.s.port} ({e.strerror or e}): "
                              "is it running? check --host / --port") from None
        self._writer.start()
        self.client.loop_start()
        if not self._subscribed.wait(timeout):
            self.stop()
            raise BrokerError(f"MQTT broker {self.s.host}:{self.s.port} did not confirm the subscriptions "
                              f"within {timeout:.0f} s")
        if self._fatal:
            self.stop()
            raise BrokerError(self._fatal)
        logger.info("recording %s into %s", ", ".join(f for f, _ in self.filters), self.store.engine.url)
        return self

    # -- writing ---------------------------------------------------------------------------
    def _decode(self, msg: mqtt.MQTTMessage) -> tuple[str, Any] | None:
        """('event', row) / ('snapshot', (defect_event_id, jpeg)) / None for an invalid message."""
        if msg.topic.endswith("/" + SNAPSHOT_TOPIC):
            props = dict(getattr(msg.properties, "UserProperty", None) or [])
            defect_id = props.get("defect_event_id")
            if not _SNAPSHOT_PROPS.is_valid(props) or not msg.payload.startswith(b"\xff\xd8"):
                self.stats.invalid += 1
                logger.warning("ignored snapshot on %s: not a JPEG with a defect_event_id user property", msg.topic)
                return None
            return "snapshot", (defect_id, bytes(msg.payload))
        try:
            payload = json.loads(msg.payload)
            schemas.validate(payload)
        except (ValueError, jsonschema.ValidationError) as e:
            self.stats.invalid += 1
            logger.warning("ignored invalid message on %s: %s", msg.topic, str(e).splitlines()[0])
            return None
        return "event", event_row(msg.topic, payload)

    def _snapshot_file(self, row: dict[str, Any]) -> tuple[str, bytes] | None:
        if not self.s.copy_snapshots or row["type"] != "defect":
            return None
        path = json.loads(row["payload"]).get("snapshot")
        if not path:
            return None
        try:
            return row["event_id"], Path(path).read_bytes()
        except OSError as e:
            logger.warning("snapshot %s of defect %s not copied: %s", path, row["event_id"], e.strerror)
            return None

    def _write(self, batch: list[mqtt.MQTTMessage]) -> None:
        rows: dict[str, dict[str, Any]] = {}
        snaps: list[tuple[str, bytes, str]] = []
        for msg in batch:
            decoded = self._decode(msg)
            if decoded is None:
                continue
            kind, value = decoded
            if kind == "snapshot":
                snaps.append((*value, "mqtt"))
            else:
                rows.setdefault(value["event_id"], value)
                copied = self._snapshot_file(value)
                if copied is not None:
                    snaps.append((*copied, "file"))
        delay = 0.5
        while True:
            try:
                new = self.store.add_events(list(rows.values()))
                for defect_id, jpeg, source in snaps:
                    self.stats.snapshots += int(self.store.add_snapshot(defect_id, jpeg, source))
                break
            except Exception as e:  # the database is down or refuses: keep the batch, unacked
                self.stats.db_errors += 1
                first = (str(getattr(e, "orig", None) or e).strip().splitlines() or [type(e).__name__])[0]
                logger.error("record database write failed (%s): retrying in %.0f s; the %d message(s) stay "
                             "unacknowledged at the broker", first, delay, len(batch))
                if self._stop_now.wait(delay):  # stop(): what is unacked is redelivered next time
                    return
                delay = min(delay * 2, 30.0)
        self.stats.received += len(batch)
        self.stats.stored += new
        self.stats.duplicates += len(rows) - new
        for r in rows.values():
            self.stats.by_type[r["type"]] = self.stats.by_type.get(r["type"], 0) + 1
        for msg in batch:  # only now: the rows are committed
            if msg.qos > 0:
                self.client.ack(msg.mid, msg.qos)

    def _write_loop(self) -> None:
        while True:
            first = self._q.get()
            if first is None:
                return
            batch = [first]
            done = False
            while len(batch) < self.s.batch:
                try:
                    m = self._q.get_nowait()
                except queue.Empty:
                    break
                if m is None:
                    done = True
                    break
                batch.append(m)
            self._write(batch)
            if done:
                return

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def fatal_error(self) -> str | None:
        return self._fatal

    def wait_idle(self, quiet_s: float = 1.0, timeout: float = 30.0) -> bool:
        """True once nothing arrived for ``quiet_s`` and everything received is written (tests)."""
        deadline = time.monotonic() + timeout
        last, seen = time.monotonic(), -1
        while time.monotonic() < deadline:
            n = self.stats.received + self._q.qsize()
            if n != seen:
                seen, last = n, time.monotonic()
            elif self._q.empty() and time.monotonic() - last >= quiet_s:
                return True
            time.sleep(0.05)
        return False

    def stop(self, timeout: float = 30.0) -> None:
        """Write what was received, then disconnect (the session stays: the broker queues for us)."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._writer.is_alive():  # what came before this point is written and acked
            self._q.put(None)
            self._writer.join(timeout)
            if self._writer.is_alive():
                self._stop_now.set()
                self._writer.join(5)
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> Recorder:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
