"""``pipeline`` and ``e2e`` modes: the daemon itself, in this process, on the replay source.

:func:`linecam.runtime.service.run_service` runs unchanged (bundle check, ONNX Runtime
runner, acquisition thread, bounded queue, workers, snapshots, a real MQTT publisher
to a real mosquitto). The bench only watches: it tees the verdicts the daemon
publishes (every one still goes to the broker) and stops the daemon after the
warm-up plus the measured window. With ``subscriber=True`` a separate process
subscribes through the broker and times each verdict's arrival (see
:mod:`linecam.bench.subscriber`).

Counting, in the window ``[start + warmup, stop)`` on the host monotonic clock:
throughput = verdicts with a model result *completed* in the window / its length;
offered = frames that became ready in it; dropped = SKIPPED verdicts for frames
that became ready after the warm-up (drops during the warm-up are reported apart).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from linecam.config import LinecamConfig, parse_config
from linecam.errors import LinecamError
from linecam.runtime.stats import percentile_summary

from .resources import ResourceMonitor

logger = logging.getLogger(__name__)

STAGES = ("queue", "preprocess", "inference", "postprocess", "total")


@dataclass(frozen=True)
class PipelineSetting:
    """The daemon settings the bench chooses (everything else is the config's default)."""

    workers: int
    intra_op_threads: int
    queue_size: int = 8
    snapshots: bool = True
    #: The durable store-and-forward spool between daemon and broker (on by default when deployed).
    spool: bool = True

    @property
    def label(self) -> str:
        intra = "default" if self.intra_op_threads == 0 else str(self.intra_op_threads)
        return f"{self.workers} worker{'s' if self.workers > 1 else ''} x intra-op {intra}"


class _VerdictTee:
    """Forwards everything to the daemon's real publisher; keeps the verdicts it sees."""

    def __init__(self, inner: Any, verdict_topic: str) -> None:
        self._inner = inner
        self._topic = verdict_topic
        self.verdicts: list[Mapping[str, Any]] = []  # list.append is atomic under the GIL

    def publish(self, topic: str, msg: Mapping[str, Any], qos: int = 1, retain: bool = False) -> None:
        if topic == self._topic:
            self.verdicts.append(msg)
        self._inner.publish(topic, msg, qos=qos, retain=retain)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@dataclass
class PipelineRun:
    """One daemon run: the JSON-ready ``result`` and the raw samples (ms) for plots."""

    result: dict[str, Any]
    samples: dict[str, np.ndarray]


def _config(bundle: Path, frames_dir: Path, port: int, camera_id: str, setting: PipelineSetting,
            fps: float | None, workdir: Path) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "line": "bench", "camera_id": camera_id,
        "camera": {"kind": "replay", "path": str(frames_dir), "fps": fps, "loop": True},
        "model": {"bundle": str(bundle), "intra_op_threads": setting.intra_op_threads},
        "mqtt": {"host": "127.0.0.1", "port": port},
        "runtime": {"workers": setting.workers, "queue_size": setting.queue_size},
        "output": {"snapshots": setting.snapshots, "snapshots_dir": str(workdir / "snapshots" / camera_id),
                   "snapshots_max_files": 100},
        "log_level": "WARNING",
    }
    if "spool" in LinecamConfig.model_fields:  # the spool's files go in the work dir, never ./linecam-state
        cfg["spool"] = {"enabled": setting.spool, "path": str(workdir / f"spool-{camera_id}.db")}
    return cfg


def _thread_group(name: str) -> str:
    if name == "MainThread":
        return "acquisition (main thread)"
    if name.startswith("infer-"):
        return "inference workers"
    if name.startswith("paho-mqtt-client-"):
        return "mqtt network (paho)"
    if name.startswith("bench-"):
        return "bench (sampling)"
    return name


def thread_cpu_s() -> dict[int, tuple[str, float]]:
    """CPU seconds used so far by each live thread of this process: ``{tid: (role, seconds)}``.

    CPU time, not wall time: it says what each of the daemon's threads costs per frame
    even when other processes share the cores.
    """
    import psutil

    names = {t.native_id: t.name for t in threading.enumerate()}
    return {t.id: (_thread_group(names.get(t.id, "other (native: ONNX Runtime, OpenCV)")),
                   t.user_time + t.system_time) for t in psutil.Process().threads()}


def cpu_ms_per_frame(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
                     frames: int) -> dict[str, float]:
    """CPU ms per frame by thread role between two :func:`thread_cpu_s` snapshots.

    Per thread id: a thread that started in between counts from zero, one that ended in
    between is left out (its last CPU time cannot be read), never counted negative.
    """
    out: dict[str, float] = {}
    for tid, (role, cpu) in after.items():
        delta = cpu - before[tid][1] if tid in before else cpu
        out[role] = out.get(role, 0.0) + max(delta, 0.0)
    return {k: round(v * 1e3 / max(frames, 1), 3) for k, v in sorted(out.items())}


def _start_subscriber(port: int, prefix: str, out: Path) -> subprocess.Popen[str]:
    import linecam

    # The same linecam as this process, installed or not (linecam bench from a checkout).
    root = str(Path(linecam.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.Popen([sys.executable, "-m", "linecam.bench.subscriber", "--port", str(port),
                             "--prefix", prefix, "--out", str(out)], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # blocks until READY or the process dies
    if line.strip() != "READY":
        proc.kill()
        err = (proc.stderr.read() if proc.stderr else "").strip().splitlines()[-3:]
        raise LinecamError(f"the e2e subscriber process did not start: {' | '.join(err) or 'no output'}")
    return proc


def _finish_subscriber(proc: subprocess.Popen[str], expected: int, out: Path) -> dict[str, list]:
    try:
        proc.communicate(f"{expected}\n", timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise LinecamError("the e2e subscriber did not finish within 120 s after the run") from None
    if proc.returncode != 0 or not out.is_file():
        raise LinecamError(f"the e2e subscriber failed (exit {proc.returncode})")
    return json.loads(out.read_text())


def run_pipeline(bundle: Path, frames_dir: Path, port: int, setting: PipelineSetting, fps: float | None,
                 warmup_s: float, duration_s: float, workdir: Path, camera_id: str,
                 subscriber: bool = False) -> PipelineRun:
    """Run the daemon for ``warmup_s + duration_s`` at ``fps`` (None: as fast as the replay reads)."""
    from linecam.runtime.service import run_service

    # The config resolves relative paths against its own folder: hand it absolute ones.
    bundle, frames_dir, workdir = bundle.resolve(), frames_dir.resolve(), workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = parse_config(_config(bundle, frames_dir, port, camera_id, setting, fps, workdir), workdir / "bench.yaml")
    prefix = f"linecam/bench/{camera_id}"
    sub_out = workdir / f"{camera_id}-received.json"
    sub_proc = _start_subscriber(port, prefix, sub_out) if subscriber else None
    marks: dict[str, int] = {}
    cpu: dict[str, dict[int, tuple[str, float]]] = {}
    tee_box: dict[str, _VerdictTee] = {}

    def on_daemon(daemon: Any) -> None:
        tee = _VerdictTee(daemon.publisher, daemon.topics.verdict)
        daemon.publisher = tee
        tee_box["tee"] = tee

        def stopper() -> None:
            marks["start"] = time.monotonic_ns()
            time.sleep(warmup_s)
            cpu["warm"] = thread_cpu_s()
            marks["warm"] = time.monotonic_ns()
            time.sleep(duration_s)
            marks["stop"] = time.monotonic_ns()
            cpu["stop"] = thread_cpu_s()  # while the daemon's threads are still alive
            daemon.request_stop()

        threading.Thread(target=stopper, name="bench-stopper", daemon=True).start()

    # run_service installs SIGINT/SIGTERM handlers for its daemon: give ours back afterwards.
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with ResourceMonitor() as mon:
            summary = run_service(cfg, on_daemon=on_daemon)
    except BaseException:
        if sub_proc is not None:
            sub_proc.kill()
        raise
    finally:
        if threading.current_thread() is threading.main_thread():
            for s, h in saved.items():
                signal.signal(s, h)
    verdicts = tee_box["tee"].verdicts
    received = _finish_subscriber(sub_proc, len(verdicts), sub_out) if sub_proc is not None else None
    run = _analyse(verdicts, received, marks, summary.counters, mon.summary(), setting, fps, warmup_s, duration_s)
    run.result["cpu_ms_per_frame"] = cpu_ms_per_frame(cpu["warm"], cpu["stop"], run.result["processed"])
    return run


def _analyse(verdicts: list[Mapping[str, Any]], received: dict[str, list] | None, marks: dict[str, int],
             counters: dict[str, int], resources: dict[str, Any], setting: PipelineSetting, fps: float | None,
             warmup_s: float, duration_s: float) -> PipelineRun:
    t_warm, t_stop = marks["warm"], marks["stop"]
    window_s = (t_stop - t_warm) / 1e9
    done = [v for v in verdicts if v["verdict"] != "SKIPPED"]
    in_window = [v for v in done if t_warm <= v["mono_ns"] < t_stop]
    offered = sum(1 for v in verdicts if t_warm <= v["frame_mono_ns"] < t_stop)
    skipped = [v for v in verdicts if v["verdict"] == "SKIPPED"]
    measured = [v for v in done if v["frame_mono_ns"] >= t_warm]
    samples = {s: np.array([v["latency_ms"][s] for v in measured], dtype=np.float64) for s in STAGES}
    result: dict[str, Any] = {
        "setting": {**asdict(setting), "label": setting.label},
        "offered_fps_target": fps,
        "warmup": {"seconds": warmup_s, "verdicts": sum(1 for v in verdicts if v["frame_mono_ns"] < t_warm)},
        "seconds": round(window_s, 3),
        "frames_ready": offered,
        "offered_fps": offered / window_s,
        "processed": len(in_window),
        "throughput_fps": len(in_window) / window_s,
        "dropped": sum(1 for v in skipped if v["frame_mono_ns"] >= t_warm),
        "dropped_during_warmup": sum(1 for v in skipped if v["frame_mono_ns"] < t_warm),
        "ng": sum(1 for v in measured if v["verdict"] == "NG"),
        "daemon_counters": dict(counters),
        "latency_ms": {s: percentile_summary(samples[s]) for s in STAGES},
        "resources": resources,
    }
    if received is not None:
        rx_ok = [i for i, (fm, vd) in enumerate(zip(received["frame_mono_ns"], received["verdict"]))
                 if vd != "SKIPPED" and fm >= t_warm]
        e2e = np.array([(received["received_ns"][i] - received["frame_mono_ns"][i]) / 1e6 for i in rx_ok])
        wire = np.array([(received["received_ns"][i] - received["mono_ns"][i]) / 1e6 for i in rx_ok])
        samples["e2e"] = e2e
        samples["publish_to_receive"] = wire
        result["e2e"] = {
            "verdicts_published": len(verdicts),
            "verdicts_received": len(received["frame_id"]),
            "lost": len(verdicts) - len(set(received["frame_id"])),
            "latency_ms": {"e2e": percentile_summary(e2e), "publish_to_receive": percentile_summary(wire)},
        }
    return PipelineRun(result, samples)
