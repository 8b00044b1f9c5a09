"""What the page shows live: one MQTT subscription in the view process, the state it builds
(per-camera status, counts, verdict rate, the latest NG frames with their defect and
description) and a fan-out to every open page (server-sent events).

The line daemon never sees a viewer: the view is one more MQTT subscriber.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections import OrderedDict, deque
from typing import Any

import jsonschema
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from linecam import schemas
from linecam.errors import BrokerError

logger = logging.getLogger(__name__)

TYPES = ("verdict", "defect", "description", "status", "web_defect", "web_gap")


class LiveState:
    """Thread-safe state of the line(s), fed from the MQTT thread, read by the web handlers."""

    def __init__(self, max_ng: int = 24, max_snapshots: int = 64) -> None:
        self._lock = threading.Lock()
        self.status: dict[str, dict[str, Any]] = {}  # "line/camera" -> status payload
        self.counts: dict[str, dict[str, int]] = {}  # "line/camera" -> {"OK": n, "NG": n, "SKIPPED": n}
        self._times: dict[str, deque[float]] = {}  # recent verdict receipt times, per camera
        self.ng: OrderedDict[str, dict[str, Any]] = OrderedDict()  # verdict event_id -> card
        self._by_defect: dict[str, str] = {}  # defect event_id -> verdict event_id
        self.snapshots: OrderedDict[str, bytes] = OrderedDict()  # defect event_id -> JPEG (…/snapshot topic)
        self.snapshot_paths: dict[str, str] = {}  # defect event_id -> file a defect message named
        self.max_ng, self.max_snapshots = max_ng, max_snapshots
        self.broker_connected = False
        self._subscribers: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue[dict[str, Any]]]] = []

    # -- fan-out -----------------------------------------------------------------------------
    def listen(self, loop: asyncio.AbstractEventLoop, maxsize: int = 1000) -> asyncio.Queue[dict[str, Any]]:
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize)
        with self._lock:
            self._subscribers.append((loop, q))
        return q

    def unlisten(self, q: asyncio.Queue[dict[str, Any]]) -> None:
        with self._lock:
            self._subscribers = [(lp, x) for lp, x in self._subscribers if x is not q]

    def _push(self, item: dict[str, Any]) -> None:
        for loop, q in list(self._subscribers):
            def put(q: asyncio.Queue[dict[str, Any]] = q) -> None:
                if not q.full():  # a stalled page loses live items, never the view's memory
                    q.put_nowait(item)
            try:
                loop.call_soon_threadsafe(put)
            except RuntimeError:  # its loop closed
                self.unlisten(q)

    # -- updates (MQTT thread) -------------------------------------------------------------
    def rate(self, cam: str, window_s: float = 10.0) -> float:
        times = self._times.get(cam)
        if not times:
            return 0.0
        now = time.monotonic()
        n = sum(1 for t in times if now - t <= window_s)
        return n / window_s

    def add(self, kind: str, p: dict[str, Any]) -> None:
        cam = f"{p.get('line')}/{p.get('camera')}"
        out: dict[str, Any] | None = None
        with self._lock:
            if kind == "verdict":
                v = str(p.get("verdict"))
                c = self.counts.setdefault(cam, {"OK": 0, "NG": 0, "SKIPPED": 0})
                c[v] = c.get(v, 0) + 1
                self._times.setdefault(cam, deque(maxlen=5000)).append(time.monotonic())
                out = {"kind": "counts", "cam": cam, "counts": dict(c), "rate": round(self.rate(cam), 2)}
                if v == "NG":
                    card = {"cam": cam, "verdict": p, "defect": None, "description": None}
                    self.ng[str(p["event_id"])] = card
                    while len(self.ng) > self.max_ng:
                        self.ng.popitem(last=False)
                    out = {**out, "card": card}
            elif kind == "defect":
                did, vid = str(p["event_id"]), str(p.get("verdict_event_id"))
                self._by_defect[did] = vid
                while len(self._by_defect) > 8 * self.max_ng:
                    self._by_defect.pop(next(iter(self._by_defect)))
                if p.get("snapshot"):
                    self.snapshot_paths[did] = str(p["snapshot"])
                    while len(self.snapshot_paths) > 8 * self.max_ng:
                        self.snapshot_paths.pop(next(iter(self.snapshot_paths)))
                card = self.ng.get(vid)
                if card is not None:
                    card["defect"] = p
                    out = {"kind": "card", "card": card}
            elif kind == "description":
                card = self.ng.get(self._by_defect.get(str(p.get("defect_event_id")), ""))
                if card is not None:
                    card["description"] = p
                    out = {"kind": "card", "card": card}
            elif kind == "status":
                self.status[cam] = p
                out = {"kind": "status", "cam": cam, "status": p}
        if out is not None:
            self._push(out)

    def add_snapshot(self, defect_event_id: str, jpeg: bytes) -> None:
        with self._lock:
            self.snapshots[defect_event_id] = jpeg
            while len(self.snapshots) > self.max_snapshots:
                self.snapshots.popitem(last=False)

    def live_defect(self, defect_event_id: str) -> dict[str, Any] | None:
        """The defect message of a card still on the page, or None."""
        with self._lock:
            for card in self.ng.values():
                d = card.get("defect")
                if d is not None and d.get("event_id") == defect_event_id:
                    return d
        return None

    def set_broker(self, up: bool) -> None:
        self.broker_connected = up
        self._push({"kind": "broker", "connected": up})

    def snapshot_state(self) -> dict[str, Any]:
        """Everything a freshly opened page needs."""
        with self._lock:
            return {"kind": "state", "broker": self.broker_connected, "status": dict(self.status),
                    "counts": {k: dict(v) for k, v in self.counts.items()},
                    "rates": {k: round(self.rate(k), 2) for k in self.counts},
                    "cards": list(self.ng.values())}


class LiveFeed:
    """The view's MQTT client: JSON messages into :class:`LiveState`, JPEGs from ``…/snapshot``."""

    def __init__(self, state: LiveState, host: str, port: int, prefix: str = "linecam/+/+",
                 username: str | None = None, password: str | None = None, tls: bool = False,
                 ca_file: str | None = None) -> None:
        self.state, self.address = state, f"{host}:{port}"
        p = prefix.rstrip("/")
        self.filters = [(f"{p}/{t}", 1) for t in TYPES] + [(f"{p}/snapshot", 0)]
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"linecam-view-{uuid.uuid4().hex[:8]}",
                        protocol=mqtt.MQTTv5)
        c.reconnect_delay_set(0.2, 5)
        if username:
            c.username_pw_set(username, password)
        if tls:
            c.tls_set(ca_certs=ca_file)
        c.on_connect = self._on_connect
        c.on_disconnect = lambda *_: state.set_broker(False)
        c.on_message = self._on_message
        self.client, self.host, self.port = c, host, port

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if rc.is_failure:
            logger.error("MQTT broker %s refused the view (%s): check --username / password", self.address, rc)
            return
        client.subscribe(self.filters)
        self.state.set_broker(True)

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic.endswith("/snapshot"):
            props = dict(getattr(msg.properties, "UserProperty", None) or [])
            if props.get("defect_event_id") and msg.payload[:2] == b"\xff\xd8":
                self.state.add_snapshot(props["defect_event_id"], bytes(msg.payload))
            return
        try:
            payload = json.loads(msg.payload)
            schemas.validate(payload)
        except (ValueError, jsonschema.ValidationError) as e:
            logger.warning("ignored invalid message on %s: %s", msg.topic, str(e).splitlines()[0])
            return
        self.state.add(str(payload.get("type") or msg.topic.rsplit("/", 1)[-1]), payload)

    def start(self) -> LiveFeed:
        try:
            self.client.connect(self.host, self.port, keepalive=30)
        except OSError as e:
            raise BrokerError(f"cannot reach MQTT broker {self.address} ({e.strerror or e}): is it running? "
                              "check --host / --port") from None
        self.client.loop_start()
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
