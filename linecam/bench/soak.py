"""Soak test: the daemon (``linecam run`` in its own process) inspects >= 100k frames from the
replay source at full speed through a real mosquitto, and its RSS, file descriptors and
threads are compared between the start (after a warm-up) and the end.

    linecam bench soak                      # 100k frames -> benchmarks/results/soak.json
    linecam bench soak --frames 20000 --out /tmp/soak.json
    linecam bench soak --spool-cost         # the spool's cost per message -> results/soak_spool.json

Small frames (96x96 PNGs) and the torch-free "darkness" test bundle keep the run short:
the point is what a long run does to the process, not the model's speed. A subscriber in
this process counts every verdict (no frame without exactly one verdict; duplicates, which
at-least-once delivery allows, are reported). Targets: RSS growth < 5 MB, fds and threads
unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import psutil
import yaml


import linecam
from linecam.broker import MosquittoBroker
from linecam.runtime.sdnotify import NotifyListener

#: Results folder, relative to where the command runs (the checkout), as for `linecam bench`.
RESULTS = Path("benchmarks/results")
TARGET_RSS_MB = 5.0


def tiny_bundle(root: Path) -> Path:
    """The torch-free darkness bundle (:mod:`linecam.bench.darkness`)."""
    from linecam.bench.darkness import make_tiny_bundle

    return make_tiny_bundle(root, size=64, image_threshold=0.3, pixel_threshold=0.5)


def replay_folder(root: Path, n: int = 16, size: int = 96) -> Path:
    """Bright parts; every 8th has a dark square (an NG, so defects and snapshots run too)."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        img = np.full((size, size, 3), 230, np.uint8) + rng.integers(0, 20, (size, size, 3), dtype=np.uint8)
        if i % 8 == 7:
            img[30:60, 30:60] = 20
        cv2.imwrite(str(root / f"part_{i:03d}.png"), img)
    return root


def machine() -> dict:
    try:
        from linecam.bench.machine import cpu_model
        cpu = cpu_model()
    except Exception:
        cpu = platform.processor() or platform.machine()
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "load_avg_at_start": list(os.getloadavg())}


class VerdictCounter:
    """Counts verdicts per frame id (a plain paho subscriber, QoS 1)."""

    def __init__(self, port: int, topic: str) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.frame_ids: dict[int, int] = {}
        self.event_ids: set[str] = set()
        self.n = 0
        ok = threading.Event()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.c.on_message = self._on_message
        self.c.on_subscribe = lambda *a: ok.set()
        self.c.connect("127.0.0.1", port)
        self.c.subscribe(topic, qos=1)
        self.c.loop_start()
        if not ok.wait(10):
            raise RuntimeError("subscription not confirmed")

    def _on_message(self, client, userdata, msg) -> None:
        p = json.loads(msg.payload)
        self.n += 1
        if p["event_id"] not in self.event_ids:
            self.event_ids.add(p["event_id"])
            self.frame_ids[p["frame_id"]] = self.frame_ids.get(p["frame_id"], 0) + 1

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def sample(proc: psutil.Process, frames: int, t0: float) -> dict:
    with proc.oneshot():
        mem = proc.memory_info()
        return {"t_s": round(time.monotonic() - t0, 1), "frames": frames, "rss_mb": round(mem.rss / 1e6, 2),
                "fds": proc.num_fds(), "threads": proc.num_threads()}


def settled(proc: psutil.Process, progress: NotifyListener, t0: float, n: int = 10) -> dict:
    """Ten samples over a second: the median RSS and the *fewest* fds / threads, because a
    replay image or a snapshot being written holds an fd for a moment (a leak never goes away)."""
    xs = []
    for _ in range(n):
        xs.append(sample(proc, progress.frames(), t0))
        time.sleep(0.1)
    return {"t_s": xs[0]["t_s"], "frames": xs[0]["frames"],
            "rss_mb": float(np.median([x["rss_mb"] for x in xs])),
            "fds": min(x["fds"] for x in xs), "fds_max": max(x["fds"] for x in xs),
            "threads": min(x["threads"] for x in xs), "threads_max": max(x["threads"] for x in xs)}


def soak(frames: int, warmup: int, out: Path) -> dict:
    work = Path(tempfile.mkdtemp(prefix="linecam-soak-"))
    bundle = tiny_bundle(work / "bundle")
    images = replay_folder(work / "parts")
    broker = MosquittoBroker(workdir=work / "broker").start()
    cfg = {
        "line": "soak", "camera_id": "c0",
        "camera": {"kind": "replay", "path": str(images), "loop": True},
        "model": {"bundle": str(bundle), "intra_op_threads": 1},
        "mqtt": {"host": "127.0.0.1", "port": broker.port},
        "runtime": {"queue_size": 16, "metrics_interval_s": 1.0},
        "output": {"snapshots_dir": str(work / "snaps"), "snapshots_max_files": 50},
        "spool": {"path": str(work / "spool.db")},
        "log_level": "WARNING",
    }
    cfg_path = work / "line.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    progress = NotifyListener(work / "notify.sock")
    counter = VerdictCounter(broker.port, "linecam/soak/c0/verdict")
    env = dict(os.environ, NOTIFY_SOCKET=str(progress.path), PYTHONUNBUFFERED="1",
               PYTHONPATH=str(Path(linecam.__file__).resolve().parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = open(work / "daemon.log", "wb")
    daemon = subprocess.Popen([sys.executable, "-m", "linecam", "run", "--config", str(cfg_path)],
                              stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work)
    proc = psutil.Process(daemon.pid)
    t0 = time.monotonic()
    series: list[dict] = []
    try:
        if not progress.ready.wait(60):
            raise RuntimeError(f"daemon not ready: {(work / 'daemon.log').read_text()[-2000:]}")
        at_ready = sample(proc, progress.frames(), t0)
        while progress.frames() < warmup:
            time.sleep(0.2)
        start = settled(proc, progress, t0)
        t_start = time.monotonic()
        next_sample = time.monotonic() + 5
        while progress.frames() < start["frames"] + frames:
            if daemon.poll() is not None:
                raise RuntimeError(f"daemon exited: {(work / 'daemon.log').read_text()[-2000:]}")
            if time.monotonic() >= next_sample:
                series.append(sample(proc, progress.frames(), t0))
                next_sample += 5
            time.sleep(0.2)
        end = settled(proc, progress, t0)
        seconds = time.monotonic() - t_start
        spool_rows_live = _spool_rows(work / "spool.db")
        daemon.send_signal(signal.SIGTERM)
        rc = daemon.wait(60)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        log.close()
        progress.close()
    text = (work / "daemon.log").read_text()
    m = re.search(r"frames (\d+)\s+OK (\d+)\s+NG (\d+)\s+skipped (\d+)", text)
    done = {k: int(v) for k, v in zip(("frames", "ok", "ng", "skipped"), m.groups())} if m else {}
    time.sleep(1.0)  # let the last verdicts reach the subscriber
    counter.close()
    broker.close()
    total = done.get("frames", 0)
    missing = [i for i in range(total) if i not in counter.frame_ids]
    result = {
        "benchmark": "soak",
        "what": "linecam run (subprocess), replay source 96x96 PNGs looped at full speed, tiny darkness bundle "
                "(ONNX Runtime CPU, 1 thread), real mosquitto on loopback, spool on, snapshots on",
        "machine": machine(),
        "frames_measured": end["frames"] - start["frames"],
        "warmup_frames": start["frames"],
        "seconds": round(seconds, 1),
        "fps": round((end["frames"] - start["frames"]) / seconds, 1),
        "at_ready": at_ready,
        "start": start,
        "end": end,
        "sampling": "start/end: 10 samples over 1 s; RSS median, fds/threads minimum (and maximum)",
        "growth": {"rss_mb": round(end["rss_mb"] - start["rss_mb"], 2), "fds": end["fds"] - start["fds"],
                   "threads": end["threads"] - start["threads"]},
        "targets": {"rss_mb": f"< {TARGET_RSS_MB}", "fds": 0, "threads": 0},
        "series": series,
        "daemon_summary": done,
        "exit_code": rc,
        "delivery": {"verdict_messages": counter.n, "distinct_event_ids": len(counter.event_ids),
                     "frames_with_verdict": len(counter.frame_ids), "frames_missing": len(missing),
                     "frames_with_two_event_ids": sum(1 for c in counter.frame_ids.values() if c > 1),
                     "spool_rows_at_end_sample": spool_rows_live},
    }
    g = result["growth"]
    result["pass"] = bool(g["rss_mb"] < TARGET_RSS_MB and g["fds"] == 0 and g["threads"] == 0 and rc == 0
                          and not missing and result["frames_measured"] >= frames)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _spool_rows(path: Path) -> int | None:
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)
        try:
            return int(db.execute("SELECT COUNT(*) FROM spool").fetchone()[0])
        finally:
            db.close()
    except sqlite3.Error:
        return None


# -- the spool's cost per message -----------------------------------------------------------------
def spool_cost(out: Path, n: int = 20_000) -> dict:
    from linecam import messages
    from linecam.config import MqttSettings
    from linecam.runtime.publisher import MqttPublisher
    from linecam.config import SpoolSettings
    from linecam.runtime.spool import Spool

    work = Path(tempfile.mkdtemp(prefix="linecam-spoolcost-"))
    msg = messages.verdict(line="l", camera="c", frame_id=1, verdict="OK", score=0.5, score_raw=0.1, threshold=0.2,
                           frame_ts_ns=1, frame_clock="host_monotonic", frame_mono_ns=1,
                           latency_ms={"queue": 0.1, "preprocess": 0.2, "inference": 0.3, "postprocess": 0.1,
                                       "total": 0.7}, model={"name": "m", "sha256": "0" * 64, "file": "onnx_fp32"})
    payload = messages.to_json(msg)
    res: dict = {"benchmark": "spool_cost", "machine": machine(), "payload_bytes": len(payload),
                 "disk": "the repo's file system (ext4-like on a virtual disk); numbers are per message"}

    def storage(sync: str, batch: int, count: int) -> float:
        s = Spool(work / f"s-{sync}-{batch}.db", max_rows=10**7, max_bytes=10**10, sync=sync)  # type: ignore[arg-type]
        items = [("l/c/verdict", payload, 1)] * batch
        t = time.perf_counter()
        for _ in range(count // batch):
            ids, _ = s.append(items)
        dt = time.perf_counter() - t
        t = time.perf_counter()
        all_ids = [r.id for r in s.read_after(0, count)]
        for k in range(0, len(all_ids), 64):
            s.delete(all_ids[k:k + 64])
        ddt = time.perf_counter() - t
        s.close()
        return round(dt / count * 1e6, 1), round(ddt / count * 1e6, 1)

    res["storage_us_per_msg"] = {}
    for sync in ("normal", "full"):
        for batch in (1, 32):
            count = 2000 if sync == "full" and batch == 1 else 10_000
            ins, dele = storage(sync, batch, count)
            res["storage_us_per_msg"][f"{sync}/batch{batch}"] = {"insert_commit": ins, "read_delete_batch64": dele}

    with MosquittoBroker(workdir=work / "broker") as broker:
        def run(spool: bool) -> dict:
            # max_queued=0: an unbounded paho queue, so that without the spool nothing is dropped either
            pub = MqttPublisher(MqttSettings(port=broker.port, max_queued=0), "l", "c", "0", None,
                                spool=SpoolSettings(path=work / f"pub-{time.monotonic_ns()}.db") if spool else None)
            pub.start()
            pub.wait_connected(10)
            call = 0.0
            me = psutil.Process()
            cpu0 = me.cpu_times()
            t = time.perf_counter()
            for i in range(n):
                c0 = time.perf_counter()
                pub.publish("l/c/verdict", msg, qos=1)
                call += time.perf_counter() - c0
            while pub.stats().pending and time.perf_counter() - t < 120:
                time.sleep(0.002)
            total = time.perf_counter() - t
            cpu1 = me.cpu_times()
            st = pub.stats()
            pub.stop()
            cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
            return {"publish_call_us": round(call / n * 1e6, 1), "throughput_acked_msg_s": round(n / total),
                    "cpu_us_per_msg_all_threads": round(cpu / n * 1e6, 1), "failed": st.failed}
        res["publisher"] = {
            "messages": n,
            "note": "publish() as fast as possible to a real mosquitto, until every message is acked; paho's "
                    "queue unbounded (max_queued=0) so that the run without the spool drops nothing either; "
                    "cpu = this process, all threads (JSON encoding included in both)",
            "without_spool": run(False), "with_spool": run(True)}
        wo, wi = res["publisher"]["without_spool"], res["publisher"]["with_spool"]
        res["spool_extra_cpu_us_per_msg"] = round(wi["cpu_us_per_msg_all_threads"] - wo["cpu_us_per_msg_all_threads"], 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="linecam bench soak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=100_000)
    ap.add_argument("--warmup", type=int, default=3000)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--spool-cost", action="store_true", help="measure the spool's cost per message instead")
    a = ap.parse_args(argv)
    if a.spool_cost:
        r = spool_cost(a.out or RESULTS / "soak_spool.json")
        print(json.dumps({k: r[k] for k in ("storage_us_per_msg", "publisher", "spool_extra_cpu_us_per_msg")},
                         indent=2))
        return
    r = soak(a.frames, a.warmup, a.out or RESULTS / "soak.json")
    print(json.dumps({k: r[k] for k in ("frames_measured", "seconds", "fps", "start", "end", "growth", "delivery",
                                        "pass")}, indent=2))
    sys.exit(0 if r["pass"] else 1)


if __name__ == "__main__":
    main()
