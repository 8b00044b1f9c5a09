"""Per-frame CPU cost of the daemon's Prometheus metrics (``metrics.prometheus_port``).

The only per-frame work the exporter adds is one histogram observation per latency stage
(5 per frame, through ``linecam.runtime.prometheus._TeeStats``); everything else is read at
scrape time. This measures ``stats.add`` for the 5 stages of a frame with and without the
exporter's wrapper, and the cost of one scrape, and writes
``benchmarks/results/prometheus_cost.json``.

    python benchmarks/prometheus_cost.py
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from types import SimpleNamespace

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from linecam.runtime.prometheus import BUCKETS, STAGES, _DaemonCollector, _TeeStats
from linecam.runtime.stats import Counters, LatencyStats

N = 200_000
OUT = Path(__file__).parent / "results" / "prometheus_cost.json"


def per_frame_us(stats, n: int = N) -> float:
    add = stats.add
    samples = (0.1, 0.6, 4.7, 0.3, 6.3)
    t0 = time.process_time_ns()
    for _ in range(n):
        for stage, ms in zip(STAGES, samples):
            add(stage, ms)
    return (time.process_time_ns() - t0) / n / 1e3


def main() -> None:
    reg = CollectorRegistry()
    hist = Histogram("linecam_stage_latency_seconds", "x", ["line", "camera", "stage"], buckets=BUCKETS, registry=reg)
    tee = _TeeStats(LatencyStats(), {s: hist.labels("l", "c", s) for s in STAGES})
    rounds = [(per_frame_us(LatencyStats()), per_frame_us(tee)) for _ in range(5)]
    base = sorted(r[0] for r in rounds)[2]
    with_prom = sorted(r[1] for r in rounds)[2]
    import queue

    fake = SimpleNamespace(counters=Counters(), cfg=None, _in_q=queue.Queue(), _snap_q=queue.Queue(),
                           publisher=SimpleNamespace(connected=True), describer=None, _camera_state="up")
    reg.register(_DaemonCollector(fake, {"line": "l", "camera": "c"}))
    t0 = time.process_time_ns()
    for _ in range(200):
        generate_latest(reg)
    scrape_ms = (time.process_time_ns() - t0) / 200 / 1e6
    daemon_cpu_ms = 8.87  # CPU per frame of the daemon, all threads (README benchmark table)
    extra = with_prom - base
    result = {
        "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": platform.processor() or platform.machine(),
        "stats_add_5_stages_us": round(base, 3),
        "stats_add_5_stages_with_prometheus_us": round(with_prom, 3),
        "extra_cpu_per_frame_us": round(extra, 3),
        "share_of_daemon_cpu_per_frame": round(extra / (daemon_cpu_ms * 1e3), 5),
        "scrape_cpu_ms": round(scrape_ms, 3),
        "note": "CPU time (process_time), median of 5 rounds of 200k frames; the daemon's 8.87 ms CPU per frame "
                "is from benchmarks/results/bench.json",
    }
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
