"""``linecam bench faults``: the daemon against a real mosquitto through a fault-injecting TCP
proxy (:mod:`linecam.bench.faultproxy`), one fault per run, and a table: fault, detection time,
messages lost, duplicates, recovery time.

Each run: the synthetic line (``--frames`` at ``--fps``, tiny darkness bundle, ONNX Runtime CPU)
through ``run_service`` unchanged, the spool on, ``mqtt.keepalive`` 5 s, ``spool.resend_after_s``
1 s; a plain paho subscriber on the broker itself (not through the proxy) counts verdicts.
*Detection*: fault → linecam's own signal (connection marked lost, first re-send, spool file
re-created); *recovery*: fault cleared → every verdict of the frames made until then delivered
to the subscriber; *lost*: frames without a verdict at the subscriber; *duplicates*: verdict messages
received more than once (same ``event_id``: subscribers de-duplicate on it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from linecam.bench.darkness import make_tiny_bundle
from linecam.bench.faultproxy import FaultProxy
from linecam.broker import MosquittoBroker
from linecam.config import parse_config
from linecam.runtime.service import run_service

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


class _Counter:
    def __init__(self, port: int) -> None:
        self.verdicts: list[tuple[int, str]] = []
        self.lock = threading.Lock()
        ready = threading.Event()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"faults-{uuid.uuid4().hex[:6]}")
        c.on_connect = lambda cl, *_: cl.subscribe("linecam/b/c0/verdict", qos=1)
        c.on_subscribe = lambda *_: ready.set()
        c.on_message = self._on_message
        c.connect("127.0.0.1", port)
        c.loop_start()
        self.client = c
        if not ready.wait(10):
            raise RuntimeError("bench subscriber: subscription not confirmed")

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        p = json.loads(msg.payload)
        with self.lock:
            self.verdicts.append((p["frame_id"], p["event_id"]))

    def frames(self) -> set[int]:
        with self.lock:
            return {f for f, _ in self.verdicts}

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _wait(pred: Callable[[], bool], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def _run(name: str, fault: Callable[[Any, FaultProxy, Path, dict], None], work: Path, frames: int, fps: float,
         spool_dir: Path | None = None, resend_after_s: float = 1.0) -> dict[str, Any]:
    run_dir = work / "".join(ch if ch.isalnum() else "_" for ch in name)
    run_dir.mkdir(parents=True, exist_ok=True)
    bundle = make_tiny_bundle(run_dir / "bundle", size=64, image_threshold=0.3, pixel_threshold=0.5)
    spool = (spool_dir or run_dir) / "spool.db"
    with MosquittoBroker() as broker:
        proxy = FaultProxy(broker.port)
        sub = _Counter(broker.port)
        cfg = parse_config({
            "line": "b", "camera_id": "c0",
            "camera": {"kind": "synthetic", "width": 160, "height": 160, "fps": fps, "defect_rate": 0.3,
                       "seed": 7, "frames": frames},
            "model": {"bundle": str(bundle)},
            "mqtt": {"host": "127.0.0.1", "port": proxy.port, "keepalive": 5},
            "runtime": {"queue_size": 64, "metrics_interval_s": 1.0},
            "output": {"snapshots_dir": str(run_dir / "snaps")},
            "spool": {"path": str(spool), "resend_after_s": resend_after_s},
        }, run_dir / "line.yaml")
        out: dict[str, Any] = {"fault": name, "resend_after_s": resend_after_s}

        def on_daemon(daemon: Any) -> None:
            def script() -> None:
                _wait(lambda: daemon.counters.get("frames") >= 30 and daemon.publisher.connected, 30)
                fault(daemon, proxy, spool, out)
                healed = time.monotonic()
                n_now = daemon.counters.get("frames")
                ok = _wait(lambda: len(sub.frames() & set(range(n_now))) >= n_now, 60)
                out["recovery_s"] = round(time.monotonic() - healed, 2) if ok else None
            threading.Thread(target=script, daemon=True).start()

        summary = run_service(cfg, on_daemon=on_daemon)
        _wait(lambda: len(sub.frames()) >= frames, 20)
        got = sub.frames()
        with sub.lock:
            n_msgs = len(sub.verdicts)
            distinct = len({e for _, e in sub.verdicts})
        sub.close()
        proxy.close()
    out.update(frames=summary.counters.get("frames", 0), lost=len(set(range(frames)) - got),
               duplicates=n_msgs - distinct)
    return out


def _partition(daemon: Any, proxy: FaultProxy, spool: Path, out: dict) -> None:
    t0 = time.monotonic()
    proxy.set_mode("blackhole")
    _wait(lambda: not daemon.publisher.connected, 30)
    out["detection_s"] = round(time.monotonic() - t0, 2)
    out["signal"] = ("MQTT keep-alive: connection marked lost" if daemon.publisher.spool_stats().resent == 0
                     else "messages unacknowledged for spool.resend_after_s: linecam dropped the connection")
    time.sleep(0.5)
    proxy.set_mode("pass")


def _no_ack(daemon: Any, proxy: FaultProxy, spool: Path, out: dict) -> None:
    t0 = time.monotonic()
    proxy.set_mode("no_puback")
    _wait(lambda: daemon.publisher.spool_stats().resent > 0, 30)
    out["detection_s"] = round(time.monotonic() - t0, 2)
    out["signal"] = "unacknowledged after spool.resend_after_s: re-send, reconnect"
    time.sleep(1.0)
    proxy.set_mode("pass")


def _cut(daemon: Any, proxy: FaultProxy, spool: Path, out: dict) -> None:
    t0 = time.monotonic()
    proxy.cut()
    _wait(lambda: not daemon.publisher.connected, 30)
    out["detection_s"] = round(time.monotonic() - t0, 2)
    out["signal"] = "TCP reset: connection lost"


def _spool_removed(daemon: Any, proxy: FaultProxy, spool: Path, out: dict) -> None:
    proxy.set_mode("no_puback")  # so that the spool holds something when its file goes
    _wait(lambda: daemon.publisher.spool_stats().rows >= 20, 30)
    t0 = time.monotonic()
    for suffix in ("", "-wal", "-shm"):
        try:
            os.unlink(f"{spool}{suffix}")
        except FileNotFoundError:
            pass
    _wait(spool.exists, 30)
    out["detection_s"] = round(time.monotonic() - t0, 2)
    out["signal"] = "spool file re-created with the rows it held"
    proxy.set_mode("pass")


def _disk_full(daemon: Any, proxy: FaultProxy, spool: Path, out: dict) -> None:
    t0 = time.monotonic()
    errors0 = daemon.publisher.spool_stats().errors
    with open(spool.parent / "filler", "wb", buffering=0) as f:
        for size in (65536, 512, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError:
                pass
    _wait(lambda: daemon.publisher.spool_stats().errors > errors0, 30)
    out["detection_s"] = round(time.monotonic() - t0, 2)
    out["signal"] = "ENOSPC: messages sent without the spool, counted"


def run_faults(frames: int, fps: float, out_path: Path) -> dict[str, Any]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="linecam-faults-") as tmp:
        work = Path(tmp)
        partition_default = "network partition without reset (spool.resend_after_s 60 s, the default)"
        for name, fn, resend in ((partition_default, _partition, 60.0),
                                 ("network partition without reset, spool.resend_after_s 1 s", _partition, 1.0),
                                 ("broker never acknowledges", _no_ack, 1.0),
                                 ("connection reset (unclean drop)", _cut, 1.0),
                                 ("spool file removed while running", _spool_removed, 1.0)):
            rows.append(_run(name, fn, work, frames, fps, resend_after_s=resend))
        disk = work / "disk"
        disk.mkdir()
        mounted = os.geteuid() == 0 and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True).returncode == 0
        if mounted:
            try:
                rows.append(_run("spool disk full (ENOSPC)", _disk_full, work, frames, fps, spool_dir=disk))
            finally:
                subprocess.run(["umount", "-l", str(disk)], capture_output=True)
        else:
            rows.append({"fault": "spool disk full (ENOSPC)", "skipped": "needs root to mount a 4 MB tmpfs"})
    result = {"benchmark": "faults", "frames": frames, "fps": fps, "keepalive_s": 5,
              "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    out_path.with_suffix(".md").write_text(markdown(result))
    return result


def markdown(r: dict[str, Any]) -> str:
    lines = [f"# Fault table ({r['when']})", "",
             f"`linecam bench faults`: {r['frames']} frames at {r['fps']:g} fps per run, one fault per run, "
             f"real mosquitto behind a fault-injecting TCP proxy; mqtt.keepalive {r['keepalive_s']} s, "
             "spool.resend_after_s 1 s unless the row says otherwise. Detection: fault → linecam's own signal; "
             "recovery: "
             "fault cleared → the verdicts of every frame made until then delivered; duplicates: the same event_id "
             "received twice (subscribers de-duplicate on it).", "",
             "| fault | detection time | messages lost | duplicates | recovery time | signal |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    for row in r["rows"]:
        if "skipped" in row:
            lines.append(f"| {row['fault']} | not run: {row['skipped']} | | | | |")
            continue
        rec = "not within 60 s" if row.get("recovery_s") is None else f"{row['recovery_s']:.2f} s"
        lines.append(f"| {row['fault']} | {row.get('detection_s', float('nan')):.2f} s | {row['lost']} | "
                     f"{row['duplicates']} | {rec} | {row.get('signal', '')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="linecam bench faults", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=400)
    ap.add_argument("--fps", type=float, default=25.0)
    ap.add_argument("--out", type=Path, default=None, help="results JSON (a .md beside it)")
    a = ap.parse_args(argv)
    r = run_faults(a.frames, a.fps, a.out or RESULTS / "faults.json")
    print(markdown(r))
