"""Helpers shared by several test modules: daemon configs and event collection, the durable
spool's broker and subscriber, the torch blocker. (Model bundles for tests: bundles.py; a
generated MVTec-layout category: mvtec_synth.py.)"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from linecam import messages
from linecam.broker import MosquittoBroker
from linecam.config import MqttSettings
from linecam.config import SpoolSettings
from linecam.events import subscribe
from linecam.runtime.publisher import MqttPublisher

MODEL = {"name": "expert", "sha256": "0" * 64}
LAT = {"total": 0.7}


# -- the daemon ----------------------------------------------------------------------------------
def line_config(bundle: Path, port: int, tmp: Path, **over) -> dict:
    cam = {"kind": "synthetic", "width": 320, "height": 320, "fps": 40.0, "defect_rate": 0.3, "seed": 3,
           "frames": 60}
    cam.update(over.pop("camera", {}))
    cfg = {
        "line": "t", "camera_id": "c0", "camera": cam,
        "model": {"bundle": str(bundle)},
        "mqtt": {"host": "127.0.0.1", "port": port},
        "runtime": {"queue_size": 64, "metrics_interval_s": 0.5},
        "output": {"snapshots_dir": str(tmp / "snaps"), "snapshots_max_files": 50},
        "spool": {"path": str(tmp / "spool.db")},  # never share a spool between test runs
    }
    for k, v in over.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    return cfg


def line_cfg(bundle: Path, port: int, tmp: Path, frames: int, fps: float) -> dict:
    """A small line with its own spool (the broker-fault and recorder tests)."""
    return {
        "line": "t", "camera_id": "c0",
        "camera": {"kind": "synthetic", "width": 160, "height": 160, "fps": fps, "defect_rate": 0.3, "seed": 5,
                   "frames": frames},
        "model": {"bundle": str(bundle)},
        "mqtt": {"host": "127.0.0.1", "port": port},
        "runtime": {"queue_size": 64, "metrics_interval_s": 0.3},
        "output": {"snapshots_dir": str(tmp / "snaps")},
        "spool": {"path": str(tmp / "spool.db"), "window": 32},
    }


def collect(port: int, run, types=("verdict", "defect", "status", "metrics"), settle: float = 1.5):
    """Subscribe, run ``run()`` in this thread, then drain until quiet. Returns (events, result)."""
    events = []
    with subscribe("127.0.0.1", port, prefix="linecam/t/c0", types=types, validate=False) as sub:
        result = run()
        deadline = time.monotonic() + settle
        while time.monotonic() < deadline:
            ev = sub.poll(timeout=0.2)
            if ev is not None:
                events.append(ev)
                deadline = time.monotonic() + settle
    return events, result


# -- the torch blocker (the edge side must import without torch) ------------------------------
BLOCK_TORCH = (
    "import sys\n"
    "class _Block:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name == 'torch' or name.startswith('torch.') or name == 'transformers':\n"
    "            raise ImportError('torch is blocked in this test')\n"
    "sys.meta_path.insert(0, _Block())\n"
)


# -- the durable spool -------------------------------------------------
def persistent_broker(tmp_path: Path, **kw) -> MosquittoBroker:
    """A broker that saves sessions on a clean stop, so a subscriber's queued QoS 1 messages
    survive a broker restart (stop() + start())."""
    d = tmp_path / f"mosq-{uuid.uuid4().hex[:6]}"
    d.mkdir()
    # max_queued_messages 0: mosquitto otherwise drops what exceeds 1000 queued messages for an
    # offline subscriber, which a publisher draining its spool easily does.
    extra = ["persistence true", f"persistence_location {d}/", "max_queued_messages 0",
             *kw.pop("extra_config", [])]
    return MosquittoBroker(extra_config=extra, **kw)


class DurableSubscriber:
    """A plain paho subscriber (not linecam code) with a persistent MQTT 5 session: it
    reconnects by itself after a broker restart and gets what was queued for it meanwhile."""

    def __init__(self, port: int, topic: str = "#", host: str = "127.0.0.1", **tls) -> None:
        self.msgs: list[tuple[str, dict]] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self.topic = topic
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"sub-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5)
        c.on_connect = self._on_connect
        c.on_subscribe = lambda *a: self._subscribed.set()
        c.on_message = self._on_message
        c.reconnect_delay_set(0.2, 1)
        if tls:
            c.tls_set(**tls)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        c.connect(host, port, clean_start=False, properties=props)
        c.loop_start()
        self.client = c
        assert self._subscribed.wait(10), "subscription not confirmed"

    def _on_connect(self, client, userdata, flags, rc, props):
        if not flags.session_present:
            client.subscribe(self.topic, qos=1)

    def _on_message(self, client, userdata, msg):
        with self._cond:
            self.msgs.append((msg.topic, json.loads(msg.payload)))
            self._cond.notify_all()

    def payloads(self, suffix: str) -> list[dict]:
        with self._cond:
            return [p for t, p in self.msgs if t.endswith("/" + suffix)]

    def wait_for(self, pred, timeout: float = 20.0) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not pred():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.2))
            return True

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def verdict_msg(i: int) -> dict:
    return messages.verdict(line="L1", camera="cam0", frame_id=i, verdict="OK", score=0.5, score_raw=0.1,
                            threshold=0.2, frame_ts_ns=i, frame_clock="host_monotonic", frame_mono_ns=i,
                            latency_ms=LAT, model=MODEL)


def spooled_publisher(port: int, path: Path, protocol: str = "5", **spool) -> MqttPublisher:
    return MqttPublisher(MqttSettings(port=port, protocol=protocol), "L1", "cam0", "0.1.0", MODEL,
                         spool=SpoolSettings(path=path, **spool))


def wait(pred, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def spool_rows(path: Path) -> list[dict]:
    """The spool's rows, read independently with sqlite3 (payloads decoded)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return [json.loads(p) for (p,) in db.execute("SELECT payload FROM spool ORDER BY id")]
    finally:
        db.close()
