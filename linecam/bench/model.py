"""``model`` mode: the backend alone, the ceiling every other number is divided by.

* ``ceiling``: an already preprocessed input → ``session.run``, in a loop, per
  session setting (one stream with ONNX Runtime's intra-op threads, or several
  threads sharing one session with one intra-op thread each, as the daemon's
  workers do). The best setting is the ceiling.
* ``bare path``: preprocess → run → postprocess on frames already in memory, one
  thread, no queue, no MQTT: what the daemon's worker does per frame, minus the daemon.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from linecam.bundle import Bundle
from linecam.camera.frame import Frame
from linecam.config import ThresholdsConfig
from linecam.runtime.stats import percentile_summary

from .workload import bundle_session

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SessionSetting:
    """How ONNX Runtime is driven: ``streams`` threads share one session with
    ``intra_op_threads`` each (0 = ONNX Runtime's default, one per core)."""

    streams: int
    intra_op_threads: int

    @property
    def label(self) -> str:
        intra = "default" if self.intra_op_threads == 0 else str(self.intra_op_threads)
        return f"{self.streams} stream{'s' if self.streams > 1 else ''} x intra-op {intra}"


def candidate_settings(cores: int) -> list[SessionSetting]:
    """The settings worth trying on ``cores`` cores (one stream, or one stream per core)."""
    out = [SessionSetting(1, 0), SessionSetting(1, 1)]
    if cores > 1:
        out.append(SessionSetting(cores, 1))
    return out


def _timed_loop(fn: Any, deadline: float, out: list[int]) -> None:
    while time.perf_counter() < deadline:
        t0 = time.perf_counter_ns()
        fn()
        out.append(time.perf_counter_ns() - t0)


def measure_ceiling(bundle: Bundle, x: np.ndarray, setting: SessionSetting, warmup_s: float,
                    duration_s: float) -> tuple[dict[str, Any], np.ndarray]:
    """Throughput and per-call latency of bare ``session.run`` with one setting
    (the result, and the per-call latencies in ms)."""
    sess = bundle_session(bundle, setting.intra_op_threads)
    m = bundle.manifest
    feeds = {m.input.name: x}
    outputs = [m.outputs.anomaly_map.name, m.outputs.image_score.name]

    def call() -> None:
        sess.run(outputs, feeds)

    def phase(seconds: float) -> tuple[list[list[int]], float]:
        per_thread: list[list[int]] = [[] for _ in range(setting.streams)]
        t0 = time.perf_counter()
        deadline = t0 + seconds
        threads = [threading.Thread(target=_timed_loop, args=(call, deadline, per_thread[i]), daemon=True)
                   for i in range(setting.streams)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return per_thread, time.perf_counter() - t0

    for _ in range(3):  # first runs allocate: never inside the warm-up's timing either
        call()
    warm, _ = phase(warmup_s)
    cpu0 = time.process_time()
    runs, elapsed = phase(duration_s)
    cpu_s = time.process_time() - cpu0
    samples = np.concatenate([np.asarray(r, dtype=np.float64) for r in runs]) / 1e6
    return {
        "setting": asdict(setting),
        "label": setting.label,
        "warmup": {"seconds": warmup_s, "calls": sum(len(w) for w in warm) + 3},
        "seconds": round(elapsed, 3),
        "calls": int(samples.size),
        "throughput_fps": samples.size / elapsed,
        # Process CPU time per call (all ONNX Runtime threads): the cost the daemon's
        # per-thread CPU figures are compared with.
        "cpu_ms_per_call": cpu_s * 1e3 / max(samples.size, 1),
        "latency_ms": percentile_summary(samples),
    }, samples


def measure_bare_path(bundle: Bundle, frames: list[Frame], intra_op_threads: int, warmup_s: float,
                      duration_s: float) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Preprocess → run → postprocess, sequential, frames from memory, one thread
    (the result, and per-stage latencies in ms)."""
    from linecam.runtime.backends import make_runner
    from linecam.runtime.inspector import Inspector, Thresholds

    # The daemon's own inspection, with the default thresholds section (min_region_area_px).
    inspector = Inspector(bundle, make_runner(bundle, "onnxruntime", None, intra_op_threads),
                          Thresholds.of(bundle, ThresholdsConfig()))
    stages: dict[str, list[float]] = {"preprocess": [], "inference": [], "postprocess": [], "total": []}
    n_ng = 0

    def one(frame: Frame, record: bool) -> bool:
        ins = inspector.inspect(frame.image, frame.bit_depth)
        if record:
            stages["preprocess"].append(ins.preprocess_ms)
            stages["inference"].append(ins.inference_ms)
            stages["postprocess"].append(ins.postprocess_ms)
            stages["total"].append((ins.t3_ns - ins.t0_ns) / 1e6)
        return ins.verdict == "NG"

    i = 0
    warm_end = time.perf_counter() + warmup_s
    warm_calls = 0
    while time.perf_counter() < warm_end or warm_calls < 3:
        one(frames[i % len(frames)], False)
        i += 1
        warm_calls += 1
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    end = t0 + duration_s
    while time.perf_counter() < end:
        n_ng += one(frames[i % len(frames)], True)
        i += 1
    elapsed = time.perf_counter() - t0
    cpu_s = time.process_time() - cpu0
    n = len(stages["total"])
    return {
        "intra_op_threads": intra_op_threads,
        "warmup": {"seconds": warmup_s, "calls": warm_calls},
        "seconds": round(elapsed, 3),
        "frames": n,
        "ng": n_ng,
        "throughput_fps": n / elapsed,
        "cpu_ms_per_frame": cpu_s * 1e3 / max(n, 1),
        "latency_ms": {k: percentile_summary(v) for k, v in stages.items()},
    }, {k: np.asarray(v) for k, v in stages.items()}
