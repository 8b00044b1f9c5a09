"""Line-scan throughput: web lines per second processed vs offered.

The daemon itself (``run_service``, in this process) runs in line-scan mode on the synthetic
line-scan web source at a sweep of offered line rates, publishing to a real mosquitto; a
subscriber in this process receives every verdict. For each rate:

* **offered lines/s**: web lines the source delivered / the time it took (first to last
  frame ready on the host);
* **processed lines/s**: web lines whose every tile was inspected (an OK/NG verdict, not
  SKIPPED) / the time from the first frame ready to the last verdict published;
* tiles skipped (queue full), latency frame-ready -> verdict (p50/p99), web defects found vs
  placed (random defects, every one must be found exactly once: a check, not a speed).

The last run is unpaced (the source as fast as it renders, drop_newest): the most lines/s this
pipeline processes on this machine, whatever is dropped.

    linecam bench linescan                   # -> benchmarks/results/linescan.{json,md}
    linecam bench linescan --quick           # a few seconds, checks the machinery
    linecam bench linescan --width 4096 --tile 256 --rates 10000 20000

Model: ``--bundle`` a fitted region expert (``export-engine fit``; its input size is the tile
size), which is what the README quotes; without it the torch-free "darkness" test bundle at
``--tile`` (0.2 ms per tile: the line-scan machinery alone, not a model). The per-tile model
cost is reported next to it (``model_ms_per_tile``): tiles/s needed = line rate x tiles per line.

    linecam bench linescan --bundle bundles/film-expert --overlap 48 --rates 1000 2000 3000 4000
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil


from linecam.broker import MosquittoBroker
from linecam.camera.synthetic_web import SyntheticWebSource
from linecam.config import parse_config
from linecam.events import subscribe
from linecam.runtime.service import run_service
from linecam.runtime.linescan import tile_columns

#: Results folder, relative to where the command runs (the checkout), as for `linecam bench`.
RESULTS = Path("benchmarks/results")


def tiny_bundle(root: Path, size: int) -> Path:
    from linecam.bench.darkness import make_tiny_bundle

    return make_tiny_bundle(root, size=size, image_threshold=0.3, pixel_threshold=0.5)


def model_ms_per_tile(bundle: Path, tile: int, n: int = 200) -> float:
    """Preprocess + ONNX Runtime (1 thread) for one tile, median ms: the bare per-tile cost."""
    from linecam.bundle import load_bundle
    from linecam.preprocess import Preprocessor
    from linecam.runtime.backends import make_runner

    b = load_bundle(bundle)
    runner = make_runner(b, "onnxruntime", None, 1)
    pre = Preprocessor(b.manifest.preprocess)
    img = np.full((tile, tile, 1), 200, np.uint8)
    times = []
    for i in range(n + 20):
        t0 = time.perf_counter()
        runner.run(pre(img, 8))
        if i >= 20:
            times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def one_run(args, bundle: Path, port: int, tmp: Path, rate: float | None, seconds: float) -> dict:
    lpf = args.lines_per_frame
    frames = max(8, int(round((rate or args.unpaced_rate_guess) * seconds / lpf)))
    cam = {"kind": "synthetic_web", "width": args.width, "lines_per_frame": lpf, "line_rate_hz": rate,
           "frames": frames, "mm_per_px_cross": 0.1, "mm_per_line": 0.1, "defect_rate": args.defect_rate,
           "defect_size_px": [8, args.overlap], "seed": 7}
    run_dir = tmp / f"run-{rate or 'max'}"
    cfg = parse_config({
        "line": "bench", "camera_id": "ls0", "camera": cam,
        "model": {"bundle": str(bundle), "intra_op_threads": 1},
        "mqtt": {"host": "127.0.0.1", "port": port},
        "runtime": {"queue_size": args.queue_size, "workers": args.workers, "metrics_interval_s": 1.0,
                    "drop_policy": "drop_newest" if rate is None else "drop_oldest"},
        "output": {"snapshots_dir": str(run_dir / "snaps"), "snapshots_max_files": 50},
        "spool": {"path": str(run_dir / "spool.db")},
        "linescan": {"enabled": True, "overlap_px": args.overlap, "mm_per_px_cross": 0.1, "mm_per_line": 0.1,
                     "web_map": {"dir": str(run_dir / "maps")}},
    }, run_dir / "x.yaml")
    verdicts: list[tuple] = []
    web_defects: list[dict] = []
    stop = threading.Event()

    def listen(sub) -> None:
        while not stop.is_set():
            ev = sub.poll(timeout=0.1)
            if ev is None:
                continue
            p = ev.payload
            if ev.type == "verdict" and "tile" in p:
                x, y, w, h = p["tile"]["bbox_px"]
                verdicts.append((p["verdict"], x, y, h, p["frame_mono_ns"], p["mono_ns"],
                                 p["latency_ms"].get("total", 0.0)))
            elif ev.type == "web_defect":
                web_defects.append(p)

    proc = psutil.Process()
    cpu0 = proc.cpu_times()
    with subscribe("127.0.0.1", port, prefix="linecam/bench/ls0", types=("verdict", "web_defect"),
                   validate=False) as sub:
        t = threading.Thread(target=listen, args=(sub,), daemon=True)
        t.start()
        t_wall = time.monotonic()
        summary = run_service(cfg)
        wall = time.monotonic() - t_wall
        n_tiles = summary.counters.get("tiles", 0)
        deadline = time.monotonic() + 15
        while len(verdicts) < n_tiles and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        stop.set()
        t.join()
    cpu1 = proc.cpu_times()
    lines = frames * lpf
    xs = tile_columns(args.width, args.tile, args.overlap)
    tiles_per_line = len(xs) / (args.tile - args.overlap)
    col_of = {x: i for i, x in enumerate(xs)}
    inspected = np.zeros((lines, len(xs)), bool)
    for v, x, y, h, *_ in verdicts:
        if v != "SKIPPED":
            inspected[y:y + h, col_of[x]] = True
    processed_lines = int(inspected.all(axis=1).sum())
    ready = np.array([v[4] for v in verdicts], np.int64)
    sent = np.array([v[5] for v in verdicts], np.int64)
    lat = np.array([v[6] for v in verdicts if v[0] != "SKIPPED"])
    # The first frame's lines were being scanned for one frame period before it was ready: both
    # windows start there (unpaced: no period).
    frame_period_ns = 0 if rate is None else lpf / rate * 1e9
    t0 = int(ready.min()) - frame_period_ns
    offered_s = (int(ready.max()) - t0) / 1e9
    processed_s = (int(sent.max()) - t0) / 1e9
    skipped = sum(v[0] == "SKIPPED" for v in verdicts)
    # every random defect placed on the web, found once (by position): the pipeline still works at speed
    truth = SyntheticWebSource(width=args.width, lines_per_frame=lpf, frames=frames, defect_rate=args.defect_rate,
                               defect_size_px=(8, args.overlap), seed=7, line_rate_hz=None).defects
    found = 0
    for d in truth:
        near = [w for w in web_defects if abs(w["down_mm"] - d.down_mm) < 3 and abs(w["cross_mm"] - d.cross_mm) < 3]
        found += len(near) == 1
    out = {
        "offered_line_rate_hz": rate,
        "frames": frames,
        "lines": lines,
        "tiles": n_tiles,
        "verdicts_received": len(verdicts),
        "tiles_skipped": int(skipped),
        "offered_lines_per_s": round(lines / offered_s, 1),
        "processed_lines_per_s": round(processed_lines / processed_s, 1),
        "processed_fraction": round(processed_lines / lines, 4),
        "tiles_per_s": round((n_tiles - skipped) / processed_s, 1),
        # what the inspected tiles amount to in web lines (with drops, rows are inspected in part)
        "capacity_lines_per_s": round((n_tiles - skipped) / processed_s / tiles_per_line, 1),
        "drain_lag_ms": round((int(sent.max()) - int(ready.max())) / 1e6, 1),
        "latency_ms": {"p50": round(float(np.percentile(lat, 50)), 2) if lat.size else None,
                       "p99": round(float(np.percentile(lat, 99)), 2) if lat.size else None,
                       "max": round(float(lat.max()), 2) if lat.size else None},
        "defects_placed": len(truth),
        "defects_found_once": found,
        "web_defects_reported": len(web_defects),
        "process_cpu_s": round((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system), 2),
        "wall_s": round(wall, 2),
    }
    out["keeps_up"] = bool(skipped == 0 and out["processed_fraction"] == 1.0)
    return out


def to_markdown(res: dict) -> str:
    c = res["config"]
    lines = [
        "# Line-scan throughput (lines/s processed vs offered)",
        "",
        f"{res['what']}",
        "",
        f"Web {c['width']} px wide, {c['lines_per_frame']} lines/frame, tiles {c['tile']}x{c['tile']} with "
        f"{c['overlap']} px overlap ({c['tiles_per_line']:.4f} tiles per web line), {c['workers']} worker(s) x "
        f"1 ONNX Runtime thread; bare model {res['model_ms_per_tile']:.3f} ms/tile. "
        f"Machine: {res['machine']['cpu']}, {res['machine']['logical_cpus']} logical CPUs "
        f"(load average at start {res['machine']['load_avg_at_start'][0]:.1f}).",
        "",
        "| offered line rate | offered lines/s | processed lines/s | processed | tiles/s | capacity lines/s "
        "| tiles skipped | latency p50 / p99 ms | defects found once / placed | keeps up |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["runs"]:
        rate = "unpaced" if r["offered_line_rate_hz"] is None else f"{r['offered_line_rate_hz']:,.0f}"
        lat = r["latency_ms"]
        lines.append(
            f"| {rate} | {r['offered_lines_per_s']:,.0f} | {r['processed_lines_per_s']:,.0f} | "
            f"{100 * r['processed_fraction']:.1f} % | {r['tiles_per_s']:,.0f} | {r['capacity_lines_per_s']:,.0f} | "
            f"{r['tiles_skipped']} | "
            f"{lat['p50']} / {lat['p99']} | {r['defects_found_once']} / {r['defects_placed']} | "
            f"{'yes' if r['keeps_up'] else 'no'} |")
    lines += ["", f"Highest offered rate kept up with: **{res['max_rate_kept_up']}** lines/s "
              "(no tile skipped, every line inspected). Unpaced: the source as fast as it renders; "
              "capacity lines/s is what this pipeline inspected (the rest was dropped as SKIPPED tiles). "
              "Defects are counted only where found exactly once at their position; where tiles were "
              "skipped some are missed by design.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="linecam bench linescan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=None,
                    help="a fitted region-expert bundle (its input size is the tile); default: the darkness bundle")
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--lines-per-frame", type=int, default=512)
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--overlap", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--queue-size", type=int, default=8,
                    help="runtime.queue_size (default: the config default; line-scan grows it to 2 frames of tiles)")
    ap.add_argument("--defect-rate", type=float, default=0.3, help="random defects per frame")
    ap.add_argument("--rates", type=float, nargs="*", default=[5000, 10000, 15000, 20000, 30000, 40000])
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--unpaced-rate-guess", type=float, default=100000.0,
                    help="sizes the unpaced run: lines = this x seconds")
    ap.add_argument("--quick", action="store_true", help="two short runs; writes to a temp folder")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.quick:
        args.rates, args.seconds, args.unpaced_rate_guess = [5000], 1.0, 20000.0
    with tempfile.TemporaryDirectory(prefix="linecam-lsbench-") as tmp_s:
        tmp = Path(tmp_s)
        if args.bundle is not None:
            from linecam.bundle import load_bundle

            manifest = load_bundle(args.bundle).manifest
            args.tile = int(manifest.preprocess.input_size[1])
            bundle, model_what = args.bundle, f"fitted region expert '{manifest.name}' ({args.tile}x{args.tile})"
        else:
            bundle, model_what = tiny_bundle(tmp / "bundle", args.tile), "tiny darkness bundle at the tile size"
        model_ms = model_ms_per_tile(bundle, args.tile)
        broker = MosquittoBroker().start()
        runs = []
        try:
            for rate in [*args.rates, None]:
                r = one_run(args, bundle, broker.port, tmp, rate, args.seconds)
                runs.append(r)
                print(f"offered {r['offered_lines_per_s']:>10,.0f} lines/s  processed "
                      f"{r['processed_lines_per_s']:>10,.0f} lines/s  ({100 * r['processed_fraction']:.1f} %, "
                      f"{r['tiles_skipped']} tiles skipped, p99 {r['latency_ms']['p99']} ms, defects "
                      f"{r['defects_found_once']}/{r['defects_placed']})", flush=True)
        finally:
            broker.close()
    xs = tile_columns(args.width, args.tile, args.overlap)
    kept = [r["offered_line_rate_hz"] for r in runs if r["offered_line_rate_hz"] is not None and r["keeps_up"]]
    res = {
        "benchmark": "linescan",
        "what": "linecam's daemon (run_service, in-process) in line-scan mode on the synthetic line-scan web "
                f"(random dark defects), {model_what} (ONNX Runtime CPU), real mosquitto "
                "on loopback, spool and snapshots on; a subscriber in the same process receives every verdict",
        "machine": {"cpu": platform.processor() or platform.machine(), "logical_cpus": os.cpu_count(),
                    "python": platform.python_version(), "platform": platform.platform(),
                    "load_avg_at_start": list(os.getloadavg())},
        "config": {"width": args.width, "lines_per_frame": args.lines_per_frame, "tile": args.tile,
                   "overlap": args.overlap, "workers": args.workers, "queue_size": args.queue_size,
                   "seconds_per_run": args.seconds, "defect_rate_per_frame": args.defect_rate,
                   "tiles_per_line": len(xs) / (args.tile - args.overlap)},
        "model_ms_per_tile": round(model_ms, 4),
        "runs": runs,
        "max_rate_kept_up": max(kept) if kept else None,
        "definitions": {
            "offered_lines_per_s": "lines the source delivered / (last frame ready - t0), t0 = first frame "
                                   "ready - one frame period (when its first line was scanned)",
            "processed_lines_per_s": "web lines whose every tile got an OK/NG verdict / (last verdict published "
                                     "- t0)",
            "capacity_lines_per_s": "inspected tiles per second / tiles per web line: the line rate the "
                                    "inspected tiles amount to (with drops, rows are inspected in part)",
            "keeps_up": "no tile skipped and every line processed",
        },
    }
    out = args.out or (Path(tempfile.gettempdir()) / "linescan_quick.json" if args.quick
                       else RESULTS / "linescan.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    out.with_suffix(".md").write_text(to_markdown(res))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
