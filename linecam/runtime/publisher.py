"""MQTT publishing for the daemon: paho-mqtt 2.x on its own network thread.

The broker may be down at start and may go away at any time: the publisher never
raises because of that. paho reconnects by itself (1 s .. 30 s back-off); QoS 0
messages (metrics) are dropped while disconnected.

With a spool (``spool=SpoolSettings(...)``, what the daemon uses), every QoS 1
non-retained message (verdict, defect, description) is written to a durable SQLite
spool first and deleted only on the broker's PUBACK; leftovers are re-sent at the next
start (see :mod:`linecam.runtime.spool`). Without one, paho keeps QoS 1 messages in
memory while the broker is away (up to ``max_queued``) and a crash loses them.

Status is retained, with a Last Will ``online: false`` so subscribers learn about a
crash or a cut cable. Because the broker publishes that Will on every unclean
drop, the latest status is re-sent on every (re)connect.

A broker that *refuses* us (bad credentials, not authorised) is not "down": that is
remembered in :attr:`MqttPublisher.fatal_error`, retrying stops, and the daemon exits
with that one line.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from linecam import messages
from linecam.runtime.mqtt_client import FATAL_CONNACK as _FATAL_CONNACK, make_client
from linecam.runtime.tls import tls_problem
from linecam.config import MqttSettings, SpoolSettings
from linecam.runtime.forwarder import SpoolForwarder
from linecam.runtime.spool import Spool, SpoolStats

logger = logging.getLogger(__name__)

#: Minimum seconds between two repeated warnings of one kind (the broker can be down for hours).
_WARN_EVERY_S = 10.0

#: Minimum seconds between two TLS diagnostic handshakes after failed connects.
_TLS_PROBE_EVERY_S = 30.0

@dataclass(frozen=True, slots=True)
class PublisherStats:
    """Counts since start. ``published`` = accepted (sent or queued; with a spool: committed
    to it, plus the leftovers of a previous run), ``acked`` = confirmed by the broker (QoS 1
    PUBACK; QoS 0 when written), ``failed`` = never going out (including messages the full
    spool dropped), ``spooled`` = messages waiting in the spool."""

    published: int
    acked: int
    failed: int
    rejected: int
    spooled: int = 0

    @property
    def pending(self) -> int:
        return self.published - self.acked


class MqttPublisher:
    """Thread-safe publisher for one camera's topics (see module docstring)."""

    def __init__(
        self,
        settings: MqttSettings,
        line: str,
        camera: str,
        version: str,
        model: Mapping[str, Any] | None = None,
        *,
        spool: SpoolSettings | None = None,
        status_on_connect: bool = True,
    ) -> None:
        """``spool``: store-and-forward settings with ``path`` set (None or ``enabled: false``:
        paho's in-memory queue only). ``status_on_connect``: a connect before the application
        published any status sends a default ``starting`` one (the daemon, which publishes its
        own ``starting`` status, turns that off: one ``starting`` per run)."""
        self.settings = settings
        self.line, self.camera = line, camera
        self.version, self.model = version, (dict(model) if model is not None else None)
        self.topics = messages.topics(settings.topic_prefix or messages.default_prefix(line, camera))
        self.address = f"{settings.host}:{settings.port}"

        # Lock order: _status_lock may be held while calling paho; _cond never is (paho calls
        # on_publish, which takes _cond, while holding its own message lock).
        self._cond = threading.Condition()  # counters, warnings; notified on every ack
        self._published = self._acked = self._failed = self._rejected = 0
        self._fatal_error: str | None = None
        # Serialises status publishing, so the status sent on (re)connect can never overtake a
        # newer one the application publishes at the same moment.
        self._status_lock = threading.Lock()
        self._last_status: dict[str, Any] | None = None
        # Statuses published while we are not connected, oldest first; on_connect sends them. Not
        # paho's own queue: paho flushes that only after on_connect returns, while it already counts
        # as connected, so a status another thread published in that gap reached the broker
        # first and an older one ("starting") ended up as the retained, current state.
        self._status_pending: deque[dict[str, Any]] = deque(maxlen=64)
        self._status_on_connect = status_on_connect
        self._closing = False
        self._started = False
        self._stopped = False
        self._last_warn: dict[str, float] = {}
        self._last_tls_probe = -1e18
        self._connected = threading.Event()
        self._client = self._make_client()
        #: Called with (n dropped now, total) when the full spool drops its oldest messages.
        self.on_spool_drop: Callable[[int, int], None] | None = None
        self._forwarder: SpoolForwarder | None = None
        if spool is not None and spool.enabled:
            if spool.path is None:
                raise ValueError("SpoolSettings.path must be set (LinecamConfig.spool_settings() does it)")
            store = Spool(spool.path, max_rows=spool.max_rows, max_bytes=int(spool.max_mb * 1e6), sync=spool.sync)
            self._forwarder = SpoolForwarder(
                store, self._hand_over, self._connected.is_set, window=spool.window,
                resend_after_s=spool.resend_after_s, direct_ack=self._count_ack, on_drop=self._spool_dropped,
                on_stale=self._unacknowledged,
            )
        self._last_kick = -1e18

    # -- construction ------------------------------------------------------------------
    def _make_client(self) -> mqtt.Client:
        c = make_client(self.settings, f"linecam-{self.line}-{self.camera}-{uuid.uuid4().hex[:8]}",
                        f"{__name__}.paho")
        self._set_will(c)
        c.on_connect = self._on_connect
        c.on_connect_fail = self._on_connect_fail
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        return c

    def _set_will(self, client: mqtt.Client) -> None:
        """A fresh Last Will (new ``event_id``) for the next CONNECT: the broker publishes it once
        per unclean drop, and subscribers de-duplicate on ``event_id``. Called at construction
        and after every disconnect, before paho reconnects (its network thread)."""
        will = messages.last_will(self.line, self.camera, version=self.version, model=self.model)
        client.will_set(self.topics.status, messages.to_json(will), qos=1, retain=True)

    # -- public API --------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def fatal_error(self) -> str | None:
        """One line when the broker refused us for good (auth); the daemon should exit."""
        return self._fatal_error

    def stats(self) -> PublisherStats:
        with self._cond:
            direct = (self._published, self._acked, self._failed, self._rejected)
        f = self._forwarder
        if f is None:
            return PublisherStats(*direct)
        return PublisherStats(
            published=direct[0] + f.inserted + f.leftover_at_start - f.dropped,
            acked=direct[1] + f.acked, failed=direct[2] + f.dropped, rejected=direct[3] + f.rejected,
            spooled=f.pending,
        )

    def spool_stats(self) -> SpoolStats | None:
        """The spool's counters, or None without a spool."""
        return None if self._forwarder is None else self._forwarder.stats()

    def start(self) -> None:
        """Connect in the background; returns at once (the broker may be down)."""
        if self._started:
            return
        self._started = True
        s = self.settings
        if self._forwarder is not None:
            self._forwarder.start()
        self._client.connect_async(s.host, s.port, keepalive=s.keepalive)
        self._client.loop_start()
        logger.info("MQTT publisher for %s starting (broker %s, MQTT %s)", self.topics.prefix, self.address, s.protocol)

    def wait_connected(self, timeout: float) -> bool:
        """Wait until connected; False on timeout or once :attr:`fatal_error` is set."""
        deadline = time.monotonic() + timeout
        while not self._connected.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._fatal_error is not None:
                return False
            self._connected.wait(min(remaining, 0.05))
        return True

    def publish(self, topic: str, msg: Mapping[str, Any], qos: int = 1, retain: bool = False) -> None:
        """Send ``msg`` as JSON. Never raises for a broker problem; failures are counted."""
        try:
            payload = messages.to_json(msg)
        except (TypeError, ValueError) as e:  # a NaN or a stray object: a bug upstream, not a reason to die
            with self._cond:
                self._failed += 1
            logger.error("message for %s not sent, it is not valid JSON: %s", topic, e)
            return
        self._send(topic, payload, qos, retain)

    def publish_bytes(self, topic: str, payload: bytes, *, content_type: str | None = None,
                      user_properties: Sequence[tuple[str, str]] = ()) -> bool:
        """Raw bytes (a snapshot JPEG): QoS 0, not retained, never spooled (lost while the broker
        is away). The content type and user properties need MQTT 5: under 3.1.1 nothing is sent.
        True when handed to paho."""
        if self.settings.protocol != "5":
            return False
        props = Properties(PacketTypes.PUBLISH)
        if content_type:
            props.ContentType = content_type
        if user_properties:
            props.UserProperty = [(str(k), str(v)) for k, v in user_properties]
        return self._send(topic, payload, 0, False, props) == MQTTErrorCode.MQTT_ERR_SUCCESS

    def publish_status(self, msg: Mapping[str, Any] | None = None, /, **fields: Any) -> None:
        """Publish a retained status: a ready message, or the fields of :func:`messages.status`
        (line, camera, version and model filled in; ``online`` defaults to True)."""
        if msg is None:
            fields.setdefault("online", True)
            fields.setdefault("version", self.version)
            fields.setdefault("model", self.model)
            msg = messages.status(line=self.line, camera=self.camera, **fields)
        status = dict(msg)
        with self._status_lock:
            self._last_status = status
            if self._connected.is_set():
                self._publish_status_raw(status)
            else:
                self._status_pending.append(status)

    def _publish_status_raw(self, status: Mapping[str, Any]) -> MQTTErrorCode | None:
        try:
            payload = messages.to_json(status)
        except (TypeError, ValueError) as e:
            logger.error("status not sent, it is not valid JSON: %s", e)
            return None
        return self._send(self.topics.status, payload, 1, True)

    def stop(self, drain_timeout: float = 5.0, final: Mapping[str, Any] | None = None) -> None:
        """Publish ``online: false`` (retained), wait up to ``drain_timeout`` s for unacked
        messages, then disconnect cleanly (so the broker does not send the Will). What is
        still unconfirmed then stays in the spool for the next start (without a spool: lost).
        ``final``: the run's final counts (fps, frames, ng, dropped) for that last status; without
        it, those of the latest status published."""
        if self._stopped:
            return
        self._stopped = True
        if not self._started:
            if self._forwarder is not None:
                self._forwarder.close()
            return
        with self._status_lock:
            last = self._last_status
        fields = dict(fps=None, frames=None, ng=None, dropped=None)
        if final is not None:
            fields = {k: final.get(k) for k in fields}
        elif last is not None:
            fields = {k: last.get(k) for k in fields}
        self._closing = True
        fwd = self._forwarder
        if self._fatal_error is None:
            self.publish_status(
                online=False, state="stopped", camera_state="unknown", detail="stopped", **fields
            )
            deadline = time.monotonic() + drain_timeout
            with self._cond:
                while time.monotonic() < deadline and (self._published > self._acked or self._status_pending
                                                        or (fwd is not None and fwd.pending > 0)):
                    self._cond.wait(min(0.05, max(deadline - time.monotonic(), 0.0)))
                pending = self._published - self._acked + len(self._status_pending)
            if pending and fwd is not None:  # what bypasses the spool: retained status (and QoS 0 metrics)
                logger.warning(
                    "%d status/metrics message(s) not confirmed by broker %s after %.1f s: not sent (they are "
                    "not spooled; the next start publishes a fresh status); verdicts and events are in the spool",
                    pending, self.address, drain_timeout,
                )
            elif pending:
                logger.warning(
                    "%d MQTT message(s) not confirmed by broker %s after %.1f s; they are lost (spool off)",
                    pending, self.address, drain_timeout,
                )
        self._client.disconnect()
        self._client.loop_stop()
        self._connected.clear()
        if fwd is not None:
            fwd.close()
            if fwd.spool.rows:
                logger.warning("%d message(s) not confirmed by broker %s stay in the spool %s; they are sent "
                               "at the next start", fwd.spool.rows, self.address, fwd.spool.path)
        logger.info("MQTT publisher stopped: %s", self.stats())

    # -- internals -----------------------------------------------------------------------
    def _send(self, topic: str, payload: bytes, qos: int, retain: bool,
              properties: Properties | None = None) -> MQTTErrorCode | None:
        """The one place a message leaves us: QoS >= 1 non-retained ones into the spool
        (when there is one), everything else straight to paho."""
        if self._forwarder is not None and qos > 0 and not retain:
            self._forwarder.submit(topic, payload, qos)
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        # Count before handing over: paho may confirm (on_publish) before publish() returns.
        with self._cond:
            self._published += 1
        try:
            rc = self._client.publish(topic, payload, qos=qos, retain=retain, properties=properties).rc
        except ValueError as e:  # bad topic / payload too large
            rc, why = None, str(e)
        else:
            # NO_CONN for QoS >= 1 means "queued until we reconnect"; for QoS 0 it means lost.
            if rc == MQTTErrorCode.MQTT_ERR_SUCCESS or (rc == MQTTErrorCode.MQTT_ERR_NO_CONN and qos > 0):
                return rc
            why = mqtt.error_string(rc)
            if rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
                why = f"outgoing queue full (mqtt.max_queued={self.settings.max_queued})"
        with self._cond:
            self._published -= 1
            self._failed += 1
        self._warn(f"drop:{qos}", "MQTT message(s) to %s dropped: %s (%d dropped so far)", topic, why, self._failed)
        return rc

    def _hand_over(self, topic: str, payload: bytes, qos: int) -> tuple[MQTTErrorCode, int, Any]:
        """The spool forwarder's way into paho (its thread only)."""
        info = self._client.publish(topic, payload, qos=qos, retain=False)
        return info.rc, info.mid, info

    def _unacknowledged(self, n: int) -> None:
        """Messages unconfirmed ``spool.resend_after_s`` into a live connection (a broker that takes
        publishes but does not acknowledge them, a lost PUBACK): MQTT re-sends in-flight messages
        only on a new connection, and paho's in-flight window stays full until then, so drop this
        one (paho reconnects at once; the spool keeps every message until it is acknowledged)."""
        now = time.monotonic()
        fwd = self._forwarder
        if fwd is None or now - self._last_kick < fwd.resend_after_s or self._closing:
            return
        self._last_kick = now
        logger.warning("%d message(s) not acknowledged by broker %s %.0f s into the connection: reconnecting "
                       "(they stay in the spool until acknowledged)", n, self.address, fwd.resend_after_s)
        sock = self._client.socket()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # paho's network thread sees the drop and reconnects
            except OSError:
                pass

    def _spool_dropped(self, n: int, total: int) -> None:
        cb = self.on_spool_drop
        if cb is not None:
            cb(n, total)

    def _warn(self, kind: str, fmt: str, *args: Any) -> None:
        now = time.monotonic()
        with self._cond:
            if now - self._last_warn.get(kind, -1e18) < _WARN_EVERY_S:
                return
            self._last_warn[kind] = now
        logger.warning(fmt, *args)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            hint = _FATAL_CONNACK.get(reason_code.value)
            if hint is not None:
                self._fatal_error = f"MQTT broker {self.address} refused the connection ({reason_code}): {hint}"
                logger.error(self._fatal_error)
                client.disconnect()  # stop paho's reconnect loop: retrying cannot help
            else:
                self._warn("refused", "broker %s refused the connection (%s), retrying", self.address, reason_code)
            return
        logger.info("connected to broker %s", self.address)
        with self._cond:
            self._last_warn.pop("unreachable", None)
        with self._status_lock:
            # What was published while we were away goes out now, in order; otherwise re-send the
            # latest status: the Will may have replaced it while we were away.
            last = self._last_status
            if self._status_pending:
                for status in self._status_pending:
                    self._publish_status_raw(status)
                self._status_pending.clear()
            elif last is not None or self._status_on_connect:
                self._publish_status_raw(
                    messages.restamp(last) if last is not None else messages.status(
                        line=self.line, camera=self.camera, online=True, state="starting",
                        camera_state="unknown", version=self.version, model=self.model,
                    )
                )
            self._connected.set()  # under the lock: a status published from now on is sent directly
        if self._forwarder is not None:
            self._forwarder.on_connected()

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        if self._tls_refused(client):
            return
        self._warn("unreachable", "broker %s unreachable, retrying", self.address)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        self._set_will(client)  # the Will of the connection just lost may have been published
        if was_connected and not self._closing:
            logger.warning("lost connection to broker %s (%s), retrying", self.address, reason_code)
        elif not was_connected and not self._closing:
            # Dropped before CONNACK: with TLS 1.3 that is how a refused client certificate shows.
            self._tls_refused(client)

    def _tls_refused(self, client: mqtt.Client) -> bool:
        """paho does not say why a connection failed. With TLS, find out once in a while with
        a handshake of our own: a broker we do not trust, or one that refuses our certificate,
        is a configuration problem like a wrong password (fatal, one line), not 'down'."""
        if not self.settings.tls or self._fatal_error is not None or self._closing:
            return False
        now = time.monotonic()
        if now - self._last_tls_probe < _TLS_PROBE_EVERY_S:
            return False
        self._last_tls_probe = now
        why = tls_problem(self.settings)
        if why is None:
            return False
        self._fatal_error = f"MQTT broker {self.address}: TLS {why}"
        logger.error(self._fatal_error)
        client.disconnect()  # stop paho's reconnect loop: retrying cannot help
        return True

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        rejected = bool(getattr(reason_code, "is_failure", False))
        if rejected:
            self._warn("rejected", "broker %s rejected a message (%s): check its ACLs", self.address, reason_code)
        if self._forwarder is not None:
            self._forwarder.on_ack(mid, rejected)  # it tells spooled acks from direct ones
        else:
            self._count_ack(rejected)

    def _count_ack(self, rejected: bool) -> None:
        with self._cond:
            self._acked += 1
            if rejected:
                self._rejected += 1
            self._cond.notify_all()

    def __repr__(self) -> str:
        return (
            f"MqttPublisher({self.topics.prefix!r} -> {self.address}, connected={self.connected}, "
            f"fatal_error={self._fatal_error!r})"
        )
