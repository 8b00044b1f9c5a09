"""``linecam demo``: the whole path on one machine, with real parts.

1. fit the demo region expert on good parts from the simulated line (first run only;
   cached under the work dir, keyed by the fit settings and linecam's version);
2. start a private mosquitto on a free loopback port;
3. start ``linecam run`` as a separate process (as systemd would) on the synthetic line
   or on the GenICam virtual camera (viky.cti through harvesters);
4. subscribe like a plant client would and print every event as it arrives;
5. summarise: frames, OK/NG, confusion against the injected defects, latency per stage.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from linecam import __version__
from linecam.errors import LinecamError

#: Settings of the demo expert; part of the cache key ("thresholds" 2: fitted on held-out images and
#: jittered copies of them, as distil fits its own; a bundle cached before is refitted).
DEMO_FIT = {"n_good": 160, "part_size": 320, "input_size": [256, 256], "seed": 0, "thresholds": 2}
DEMO_LINE = {"width": 320, "height": 320, "defect_rate": 0.25, "seed": 7}


def _fit_key() -> str:
    blob = json.dumps({"fit": DEMO_FIT, "linecam": __version__}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def ensure_demo_bundle(workdir: Path, console: Console | None = None) -> Path:
    """Return the demo bundle's folder, fitting it if no valid cached one exists."""
    from linecam.bundle import load_bundle
    from linecam.errors import BundleError

    bundle = workdir / "bundle"
    key_file = workdir / "bundle.key"
    if key_file.is_file() and key_file.read_text().strip() == _fit_key():
        try:
            extra = load_bundle(bundle).manifest.extra
            # A scratch expert without map_scale was fitted before issue 21: its scores saturate
            # (every defect publishes 1 / threshold), so it is refitted.
            if extra.get("expert") != "scratch" or extra.get("map_scale"):
                return bundle
        except BundleError:
            pass  # stale or damaged: refit
    try:
        from linecam.camera.synthetic import write_good_images
        from linecam.export.scratch import fit_scratch_expert
    except ImportError as e:
        raise LinecamError(f"fitting the demo expert needs the export extra ({e.name} missing): "
                           f"pip install 'linecam[export]' (torch==2.13.0)") from None
    if console:
        console.print("[bold]Fitting the demo region expert[/] on good parts from the simulated line "
                      "(first run only; trained from scratch with synthetic anomalies)…")
    images = workdir / "good-images"
    write_good_images(images, DEMO_FIT["n_good"], DEMO_FIT["part_size"], DEMO_FIT["part_size"], DEMO_FIT["seed"])
    key_file.unlink(missing_ok=True)
    fit_scratch_expert(images, bundle, input_size=tuple(DEMO_FIT["input_size"]), seed=DEMO_FIT["seed"],
                       name="demo-scratch-expert")
    key_file.write_text(_fit_key() + "\n")
    return bundle


def demo_config(bundle: Path, port: int, camera: str, frames: int, fps: float, snapshots: Path) -> dict[str, Any]:
    if camera == "viky":
        cam: dict[str, Any] = {"kind": "genicam", "cti": "viky", "serial": "0",
                               "features": {"AcquisitionFrameRate": float(fps)}}
    else:
        cam = {"kind": "synthetic", "fps": fps, "frames": frames, **DEMO_LINE}
    return {
        "line": "demo", "camera_id": camera,
        "camera": cam,
        "model": {"bundle": str(bundle.resolve())},
        "mqtt": {"host": "127.0.0.1", "port": port},
        "runtime": {"queue_size": 32, "metrics_interval_s": 2.0},
        "output": {"snapshots_dir": str(snapshots.resolve()), "snapshots_max_files": 200},
        "spool": {"path": str(snapshots.resolve().parent / f"spool-demo-{camera}.db")},  # the demo's own work dir
    }


def synthetic_truth(frames: int) -> dict[int, bool]:
    """Which frames of the demo line carry a defect (the source is deterministic)."""
    from linecam.camera.synthetic import SyntheticLineSource

    src = SyntheticLineSource(fps=None, frames=frames, **DEMO_LINE)
    truth: dict[int, bool] = {}
    with src:
        for _ in range(frames):
            f = src.read(timeout=1.0)
            if f is not None:
                truth[f.frame_id] = bool(f.truth)
    return truth


def _fmt_line(ev_type: str, p: dict[str, Any], e2e_ms: float | None) -> str:
    if ev_type == "verdict":
        colour = {"OK": "green", "NG": "bold red", "SKIPPED": "yellow"}[p["verdict"]]
        score = "" if p.get("score") is None else f"score {p['score']:.2f}"
        lat = p.get("latency_ms", {})
        e2e = f"  e2e {e2e_ms:6.1f} ms" if e2e_ms is not None else ""
        return (f"frame {p['frame_id']:5d}  [{colour}]{p['verdict']:<7}[/]  {score:<11}  "
                f"infer {lat.get('inference', float('nan')):5.1f} ms{e2e}  regions {p.get('n_regions', 0)}")
    if ev_type == "defect":
        regs = ", ".join(f"{r['bbox']}" for r in p["regions"][:3]) or "none above pixel threshold"
        return f"            [red]defect[/]   regions {regs}  snapshot {p.get('snapshot')}"
    if ev_type == "status":
        return f"[dim]status: online={p['online']} state={p['state']} camera={p['camera_state']}[/]"
    return ""


def run_demo(camera: str = "synthetic", frames: int = 120, fps: float = 15.0, workdir: Path = Path(".cache/demo"),
             as_json: bool = False, view_port: int | None = None) -> dict[str, Any]:
    from linecam.broker import MosquittoBroker
    from linecam.events import subscribe

    console = Console(stderr=False, highlight=False, soft_wrap=True)  # long snapshot paths stay on one line
    workdir.mkdir(parents=True, exist_ok=True)
    bundle = ensure_demo_bundle(workdir, console)
    truth = synthetic_truth(frames) if camera == "synthetic" else {}

    with MosquittoBroker() as broker:
        cfg_path = workdir / f"line-{camera}.yaml"
        cfg_path.write_text(yaml.safe_dump(demo_config(bundle, broker.port, camera, frames, fps,
                                                       workdir / "snapshots"), sort_keys=False))
        console.print(f"[bold]mosquitto[/] on 127.0.0.1:{broker.port}   [bold]config[/] {cfg_path}   "
                      f"[bold]camera[/] {camera}")
        station = None
        if view_port is not None:  # linecam demo --view: record + view beside the line (linecam.station.beside)
            from linecam.station.beside import StationBeside

            station = StationBeside(broker.port, workdir, view_port).start()
            console.print(f"[bold]linecam view[/] on {station.url}   [bold]record[/] {station.db}")
        log_path = workdir / "daemon.log"
        received: dict[str, list[dict[str, Any]]] = {"verdict": [], "defect": []}
        e2e: list[float] = []
        with subscribe("127.0.0.1", broker.port, prefix=f"linecam/demo/{camera}", timeout=None,
                       types=("verdict", "defect", "status")) as sub, open(log_path, "w") as log:
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            proc = subprocess.Popen([sys.executable, "-m", "linecam", "run", "--config", str(cfg_path)],
                                    stdout=log, stderr=subprocess.STDOUT, env=env)
            t0 = time.monotonic()
            idle_since = time.monotonic()
            try:
                while True:
                    ev = sub.poll(timeout=0.5)
                    if ev is None:
                        # The daemon exits by itself at the end of the synthetic run.
                        if proc.poll() is not None and time.monotonic() - idle_since > 2.0:
                            break
                        if time.monotonic() - idle_since > 60:
                            raise LinecamError(f"no events for 60 s; see {log_path}")
                        continue
                    idle_since = time.monotonic()
                    p = ev.payload
                    if ev.type in received:
                        received[ev.type].append(p)
                    lat = None
                    if ev.type == "verdict":
                        # Same host, same monotonic clock: frame ready -> received here.
                        lat = (ev.received_mono_ns - p["frame_mono_ns"]) / 1e6
                        e2e.append(lat)
                    if as_json:
                        print(json.dumps(p), flush=True)
                    else:
                        line = _fmt_line(ev.type, p, lat)
                        if line:
                            console.print(line)
                    if camera == "viky" and len(received["verdict"]) >= frames and proc.poll() is None:
                        proc.send_signal(signal.SIGTERM)
            except KeyboardInterrupt:
                proc.send_signal(signal.SIGTERM)
            finally:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        if proc.returncode not in (0, -signal.SIGTERM):
            tail = log_path.read_text().strip().splitlines()[-5:]
            raise LinecamError(f"the daemon exited with {proc.returncode}: " + " | ".join(tail))
        if station is not None:
            station.linger(console)

    summary = _summary(received, truth, e2e, time.monotonic() - t0)
    _print_summary(console, summary, workdir)
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _summary(received: dict[str, list[dict]], truth: dict[int, bool], e2e: list[float], seconds: float) -> dict:
    from linecam.runtime.stats import percentile_summary

    verdicts = received["verdict"]
    counts = {v: sum(1 for p in verdicts if p["verdict"] == v) for v in ("OK", "NG", "SKIPPED")}
    out: dict[str, Any] = {"frames": len(verdicts), "counts": counts, "defect_events": len(received["defect"]),
                           "seconds": round(seconds, 1)}
    if truth:
        conf = {"true_ng": 0, "missed": 0, "false_ng": 0, "true_ok": 0}
        for p in verdicts:
            t = truth.get(p["frame_id"])
            if t is None or p["verdict"] == "SKIPPED":
                continue
            ng = p["verdict"] == "NG"
            conf["true_ng" if t and ng else "missed" if t else "false_ng" if ng else "true_ok"] += 1
        out["confusion"] = conf
    stages: dict[str, list[float]] = {}
    for p in verdicts:
        for k, v in p.get("latency_ms", {}).items():
            stages.setdefault(k, []).append(v)
    if e2e:
        stages["frame→subscriber"] = e2e
    out["latency_ms"] = {k: {q: round(v, 2) for q, v in percentile_summary(vals).items() if q in ("p50", "p99")}
                         for k, vals in stages.items() if vals}
    return out


def _print_summary(console: Console, s: dict, workdir: Path) -> None:
    c = s["counts"]
    console.print(f"\n[bold]Summary[/]: {s['frames']} verdicts in {s['seconds']} s — OK {c['OK']}, "
                  f"NG {c['NG']}, SKIPPED {c['SKIPPED']}; {s['defect_events']} defect events")
    if "confusion" in s:
        k = s["confusion"]
        console.print(f"against the injected defects: caught {k['true_ng']}, missed {k['missed']}, "
                      f"false NG {k['false_ng']}, correct OK {k['true_ok']}")
    t = Table(title="latency per stage (ms)")
    t.add_column("stage")
    t.add_column("p50", justify="right")
    t.add_column("p99", justify="right")
    for stage, q in s["latency_ms"].items():
        t.add_row(stage, f"{q['p50']:.2f}", f"{q['p99']:.2f}")
    console.print(t)
    console.print(f"snapshots of NG frames: {workdir / 'snapshots'}   summary: {workdir / 'summary.json'}")
