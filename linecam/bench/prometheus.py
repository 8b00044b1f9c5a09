"""Per-frame CPU cost of the daemon's Prometheus metrics (``metrics.prometheus_port``).

The only per-frame work the exporter adds is counting each latency stage into its histogram
bucket inside :meth:`~linecam.runtime.stats.LatencyStats.add_all` (the one call per frame,
under the lock it takes anyway); everything else is read at scrape time. This measures that
call for a frame's 5 stages with and without histograms, and the CPU of one scrape:

    linecam bench prometheus        # -> benchmarks/results/prometheus_cost.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from types import SimpleNamespace

from linecam.runtime.prometheus import BUCKETS, STAGES, DaemonCollector
from linecam.runtime.stats import Counters, LatencyStats

RESULTS = Path("benchmarks/results")


def daemon_cpu_ms(bench_json: Path) -> float | None:
    """The daemon's CPU per frame, all threads, from the latency suite's results (README table)."""
    try:
        return float(json.loads(bench_json.read_text())["headline"]["daemon_cpu_ms_per_frame"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def per_frame_us(stats: LatencyStats, n: int) -> float:
    add_all = stats.add_all
    samples = (0.1, 0.6, 4.7, 0.3, 6.3)
    t0 = time.process_time_ns()
    for _ in range(n):
        add_all(STAGES, samples)
    return (time.process_time_ns() - t0) / n / 1e3


def _with_histograms() -> LatencyStats:
    stats = LatencyStats(stages=STAGES)
    stats.track_histogram([b * 1e3 for b in BUCKETS])
    return stats


def scrape_ms(rounds: int = 200) -> float:
    from prometheus_client import CollectorRegistry, generate_latest

    fake = SimpleNamespace(counters=Counters(), stats=_with_histograms(), outbox=SimpleNamespace(camera_state="up"),
                           queue_depths=lambda: {"inference": 0, "snapshots": 0},
                           publisher=SimpleNamespace(connected=True, spool_stats=lambda: None), describer=None)
    per_frame_us(fake.stats, 1000)
    reg = CollectorRegistry()
    reg.register(DaemonCollector(fake, {"line": "l", "camera": "c"}))  # type: ignore[arg-type]
    t0 = time.process_time_ns()
    for _ in range(rounds):
        generate_latest(reg)
    return (time.process_time_ns() - t0) / rounds / 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="linecam bench prometheus", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=200_000, help="frames per round (5 rounds; the median counts)")
    ap.add_argument("--out", type=Path, default=RESULTS / "prometheus_cost.json")
    ap.add_argument("--bench-results", type=Path, default=RESULTS / "bench.json",
                    help="the latency suite's results: the daemon's CPU per frame to compare with")
    args = ap.parse_args(argv)
    rounds = [(per_frame_us(LatencyStats(stages=STAGES), args.frames), per_frame_us(_with_histograms(), args.frames))
              for _ in range(5)]
    base = sorted(r[0] for r in rounds)[2]
    with_prom = sorted(r[1] for r in rounds)[2]
    extra = with_prom - base
    cpu_ms = daemon_cpu_ms(args.bench_results)
    result = {
        "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": platform.processor() or platform.machine(),
        "command": "linecam bench prometheus",
        "stats_add_5_stages_us": round(base, 3),
        "stats_add_5_stages_with_prometheus_us": round(with_prom, 3),
        "extra_cpu_per_frame_us": round(extra, 3),
        "daemon_cpu_ms_per_frame": cpu_ms,
        "share_of_daemon_cpu_per_frame": round(extra / (cpu_ms * 1e3), 5) if cpu_ms else None,
        "scrape_cpu_ms": round(scrape_ms(), 3),
        "note": f"CPU time (process_time), median of 5 rounds of {args.frames} frames, one LatencyStats.add_all "
                f"per frame (histogram buckets counted under its lock); the daemon's CPU per frame is "
                f"headline.daemon_cpu_ms_per_frame of {args.bench_results}",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
