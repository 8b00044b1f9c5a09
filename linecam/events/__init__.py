"""The subscriber side: watch a line's verdicts, defects and status (``linecam events``).

    with subscribe("127.0.0.1", 1883, ng_only=True, timeout=60) as events:
        for ev in events:                    # Event(topic, type, payload, retained, received_mono_ns)
            print(ev.type, ev.payload["frame_id"])

:func:`subscribe` returns once the broker has confirmed the subscription, so what is
published after it returns is received. It yields :class:`Event` objects whose
``payload`` is the decoded (and, with ``validate=True``, schema-checked) message,
exactly as published. It survives broker restarts (paho reconnects and we
re-subscribe); a retained status is delivered on (re)subscribe with ``retained=True``.
"""

from __future__ import annotations

import json
import logging
import queue
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import jsonschema
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from linecam import schemas
from linecam.errors import BrokerError, LinecamError
from linecam.paho_log import paho_logger

logger = logging.getLogger(__name__)

DEFAULT_TYPES: tuple[str, ...] = ("verdict", "defect", "status", "description", "web_defect", "web_gap")

#: Called with (topic, raw payload, why) for a message that is not JSON or not valid.
InvalidHandler = Callable[[str, bytes, str], None]


@dataclass(frozen=True, slots=True)
class Event:
    """One received message. ``payload`` is the JSON object as published."""

    topic: str
    type: str
    payload: dict[str, Any]
    retained: bool
    #: time.monotonic_ns() on receipt.
    received_mono_ns: int

    @property
    def latency_ms(self) -> float | None:
        """Publisher build -> receipt; meaningful only when both run on the same host."""
        sent = self.payload.get("mono_ns")
        return None if not isinstance(sent, int) else (self.received_mono_ns - sent) / 1e6


def _log_invalid(topic: str, raw: bytes, why: str) -> None:
    logger.warning("ignored invalid message on %s: %s", topic, why)


class Subscription(Iterator[Event]):
    """An open subscription; iterate it for :class:`Event` objects, ``close()`` when done.

    Iteration ends when ``timeout`` seconds (from subscribing) have passed, or never
    with ``timeout=None``.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 1883,
        prefix: str = "linecam/+/+",
        types: Sequence[str] = DEFAULT_TYPES,
        ng_only: bool = False,
        camera: str | None = None,
        timeout: float | None = None,
        *,
        validate: bool = True,
        username: str | None = None,
        password: str | None = None,
        tls: bool = False,
        ca_file: str | Path | None = None,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
        protocol: Literal["5", "3.1.1"] = "5",
        connect_timeout: float = 10.0,
        on_invalid: InvalidHandler | None = None,
    ) -> None:
        self.address = f"{host}:{port}"
        self.ng_only, self.camera, self.validate = ng_only, camera, validate
        self.on_invalid = on_invalid or _log_invalid
        p = prefix.rstrip("/")
        if not p or "#" in p:
            raise LinecamError(f"topic prefix {prefix!r} is empty or has '#': use '+' for one level, e.g. linecam/+/+")
        self.topic_filters = [f"{p}/{t}" for t in types]
        self.invalid = 0
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._q: queue.SimpleQueue[tuple[str, bytes, bool, int]] = queue.SimpleQueue()
        self._ready: queue.SimpleQueue[str | None] = queue.SimpleQueue()  # None = subscribed, str = error
        self._closed = False

        c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"linecam-events-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311,
        )
        c.enable_logger(paho_logger(f"{__name__}.paho"))
        c.reconnect_delay_set(1, 10)
        if username:
            c.username_pw_set(username, password)
        if tls:
            try:
                c.tls_set(
                    ca_certs=str(ca_file) if ca_file else None,
                    certfile=str(cert_file) if cert_file else None,
                    keyfile=str(key_file) if key_file else None,
                )
            except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
                raise LinecamError(f"cannot load the TLS files: {e}") from None
        c.on_connect = self._on_connect
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        self._client = c
        try:
            c.connect(host, port, keepalive=30)
        except OSError as e:
            raise LinecamError(
                f"cannot reach MQTT broker {self.address} ({e.strerror or e}): is it running? check --host / --port"
            ) from None
        c.loop_start()
        try:
            error = self._ready.get(timeout=connect_timeout)
        except queue.Empty:
            error = f"MQTT broker {self.address} did not confirm the subscription within {connect_timeout:.0f} s"
        if error is not None:
            self.close()
            raise BrokerError(error)

    # -- paho callbacks (network thread: keep them light) ----------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, props: Any) -> None:
        if reason_code.is_failure:
            client.disconnect()  # do not retry a refusal
            self._ready.put(
                f"MQTT broker {self.address} refused the connection ({reason_code}): check --username / password"
            )
            return
        client.subscribe([(t, 1) for t in self.topic_filters])

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        if all(getattr(rc, "is_failure", False) for rc in codes):
            self._ready.put(f"MQTT broker {self.address} refused the subscription to {self.topic_filters}: check ACLs")
        else:
            self._ready.put(None)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self._q.put((msg.topic, msg.payload, bool(msg.retain), time.monotonic_ns()))

    # -- iteration ------------------------------------------------------------------------
    def __iter__(self) -> Subscription:
        return self

    def __next__(self) -> Event:
        while True:
            if self._closed:
                raise StopIteration
            wait = 0.25 if self._deadline is None else min(0.25, self._deadline - time.monotonic())
            if wait <= 0:
                raise StopIteration
            try:
                topic, raw, retained, t_ns = self._q.get(timeout=wait)
            except queue.Empty:
                continue
            event = self._decode(topic, raw, retained, t_ns)
            if event is not None and self._wanted(event):
                return event

    def poll(self, timeout: float) -> Event | None:
        """The next wanted event, or ``None`` if none arrives within ``timeout`` seconds
        (for loops that must also watch something else, e.g. a daemon process)."""
        end = time.monotonic() + timeout
        while not self._closed:
            left = end - time.monotonic()
            if left <= 0:
                return None
            try:
                topic, raw, retained, t_ns = self._q.get(timeout=left)
            except queue.Empty:
                return None
            event = self._decode(topic, raw, retained, t_ns)
            if event is not None and self._wanted(event):
                return event
        return None

    def _decode(self, topic: str, raw: bytes, retained: bool, t_ns: int) -> Event | None:
        try:
            payload = json.loads(raw)
            if not isinstance(payload, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            self.invalid += 1
            self.on_invalid(topic, raw, f"not JSON: {e}")
            return None
        if self.validate:
            try:
                schemas.validate(payload)
            except jsonschema.ValidationError as e:
                self.invalid += 1
                where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
                self.on_invalid(topic, raw, f"{where}: {e.message}")
                return None
        kind = payload.get("type") or topic.rsplit("/", 1)[-1]
        return Event(topic, str(kind), payload, retained, t_ns)

    def _wanted(self, ev: Event) -> bool:
        if self.camera is not None and ev.payload.get("camera") != self.camera:
            return False
        if self.ng_only and ev.type == "verdict" and ev.payload.get("verdict") != "NG":
            return False
        return True

    # -- lifecycle ------------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def subscribe(
    host: str = "127.0.0.1",
    port: int = 1883,
    prefix: str = "linecam/+/+",
    types: Sequence[str] = DEFAULT_TYPES,
    ng_only: bool = False,
    camera: str | None = None,
    timeout: float | None = None,
    **kwargs: Any,
) -> Subscription:
    """Subscribe to ``<prefix>/<type>`` for each type; see :class:`Subscription` for the
    keyword options (validate, username, password, tls, ca_file, cert_file, key_file,
    protocol, connect_timeout, on_invalid). ``ng_only`` drops OK / SKIPPED verdicts
    (other types pass); ``camera`` keeps only that camera's messages."""
    return Subscription(host, port, prefix, types, ng_only, camera, timeout, **kwargs)


# The live table and the `linecam events` command (they use subscribe above).
from linecam.events.view import EventTable, events_command  # noqa: E402

__all__ = ["DEFAULT_TYPES", "Event", "EventTable", "Subscription", "events_command", "subscribe"]
