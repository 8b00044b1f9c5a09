"""The baseline a user writes first: one loop, read → preprocess → ``session.run`` → publish.

ONNX Runtime with its default options, paho publishing JSON at QoS 1, everything in
sequence on one thread: no queue, no overlap of acquisition with inference. The
preprocessing is the bundle's own (the numbers must not differ by a resize).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import onnxruntime as ort
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from linecam.bundle import Bundle
from linecam.camera.replay import ReplaySource
from linecam.errors import BrokerError
from linecam.preprocess import Preprocessor
from linecam.runtime.stats import percentile_summary

logger = logging.getLogger(__name__)


def run_naive_loop(bundle: Bundle, frames_dir: Path, host: str, port: int, warmup_s: float,
                   duration_s: float) -> dict[str, Any]:
    m = bundle.manifest
    sess = ort.InferenceSession(str(bundle.path(bundle.pick("onnxruntime", None))),
                                providers=["CPUExecutionProvider"])
    pre = Preprocessor(m.preprocess)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"linecam-bench-naive-{uuid.uuid4().hex[:6]}")
    if client.connect(host, port) != mqtt.MQTT_ERR_SUCCESS:
        raise BrokerError(f"the naive loop cannot connect to the benchmark broker {host}:{port}")
    client.loop_start()
    totals: list[float] = []
    n = 0
    try:
        with ReplaySource(frames_dir, fps=None, loop=True) as src:
            t_start = time.perf_counter()
            warm_end = t_start + warmup_s
            end = warm_end + duration_s
            t_measure = None
            cpu0 = 0.0
            while True:
                now = time.perf_counter()
                if now >= end:
                    break
                if t_measure is None and now >= warm_end:
                    t_measure = now
                    cpu0 = time.process_time()
                t0 = time.perf_counter_ns()
                frame = src.read(timeout=1.0)
                x = pre(frame.image, frame.bit_depth)
                amap, score = sess.run(None, {m.input.name: x})
                s = float(score.reshape(-1)[0])
                client.publish("bench/naive/verdict", json.dumps(
                    {"frame_id": frame.frame_id, "score": s, "verdict": "NG" if s >= m.thresholds.image else "OK"}),
                    qos=1)
                if t_measure is not None:
                    totals.append((time.perf_counter_ns() - t0) / 1e6)
                    n += 1
            elapsed = time.perf_counter() - (t_measure or time.perf_counter())
            cpu_s = time.process_time() - cpu0 if t_measure is not None else 0.0
    finally:
        client.loop_stop()
        client.disconnect()
    return {
        "description": "read -> preprocess -> session.run -> publish, sequential, ORT default options",
        "warmup": {"seconds": warmup_s},
        "seconds": round(elapsed, 3),
        "frames": n,
        "throughput_fps": n / elapsed if elapsed > 0 else 0.0,
        "cpu_ms_per_frame": cpu_s * 1e3 / max(n, 1),
        "latency_ms": {"total": percentile_summary(totals)},
    }
