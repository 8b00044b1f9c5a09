"""PNG plots of one run (matplotlib, Agg backend: no display needed).

* ``latency_cdf.png``: per-stage latency CDF of the 80 % run (left) and its tail as
  1 − CDF on a log axis (right), with bare ``session.run`` for comparison;
* ``throughput_vs_offered.png``: daemon throughput and drops against the offered
  rate, with the ceiling, the bare path and the naive loop as horizontal lines.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from linecam.errors import LinecamError

logger = logging.getLogger(__name__)

CDF_NAME = "latency_cdf.png"
THROUGHPUT_NAME = "throughput_vs_offered.png"


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise LinecamError("plots need matplotlib: pip install 'linecam[plots]' (or pass --no-plots)") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def latency_series(raw: dict[str, Any]) -> dict[str, np.ndarray]:
    """The samples (ms) drawn in the CDF plot, by legend label."""
    series: dict[str, np.ndarray] = {}
    run = raw.get("e2e_run") or {}
    for k in ("queue", "preprocess", "inference", "postprocess", "total"):
        if k in run:
            series[f"daemon {k}"] = run[k]
    if "e2e" in run:
        series["e2e (subscriber process)"] = run["e2e"]
    if raw.get("ceiling_best") is not None:
        series["bare session.run"] = raw["ceiling_best"]
    return {k: np.asarray(v, dtype=np.float64) for k, v in series.items() if len(v)}


def plot_latency_cdf(raw: dict[str, Any], path: Path, title: str = "") -> Path:
    plt = _pyplot()
    series = latency_series(raw)
    fig, (ax, tail) = plt.subplots(1, 2, figsize=(12, 4.8))
    for label, s in series.items():
        x = np.sort(np.clip(s, 1e-3, None))
        p = np.arange(1, x.size + 1) / x.size
        style = "--" if label.startswith("bare") else "-"
        ax.plot(x, p, style, label=f"{label} (n={x.size})")
        tail.plot(x, np.clip(1 - p + 1.0 / x.size, 1e-5, 1), style, label=label)
    for a in (ax, tail):
        a.set_xscale("log")
        a.set_xlabel("latency (ms, log)")
        a.grid(True, which="both", alpha=0.3)
    ax.set_ylabel("fraction of frames ≤ x")
    ax.set_title("per-stage latency CDF")
    tail.set_yscale("log")
    tail.set_ylabel("fraction of frames > x (log)")
    tail.set_title("tail (1 − CDF); p99 at 0.01")
    tail.axhline(0.01, color="grey", lw=0.8, ls=":")
    if series:
        ax.legend(fontsize=8, loc="lower right")
    else:
        ax.text(0.5, 0.5, "no latency samples (e2e mode not run)", ha="center", transform=ax.transAxes)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_throughput(results: dict[str, Any], path: Path, title: str = "") -> Path:
    plt = _pyplot()
    modes = results["modes"]
    fig, ax = plt.subplots(figsize=(11, 5.2))
    pl = modes.get("pipeline") or {}
    runs = list(pl.get("sweep") or [])
    if not runs and modes.get("e2e"):
        runs = [modes["e2e"]]
    xs = np.array([r["offered_fps"] for r in runs])
    ys = np.array([r["throughput_fps"] for r in runs])
    drops = np.array([r["dropped"] for r in runs])
    hi = max([*xs, *ys, 1.0])
    before = (modes.get("model") or {}).get("ceiling_fps")
    ceiling = (results.get("headline") or {}).get("ceiling_fps") or before
    if ceiling:
        hi = max(hi, ceiling * 1.3)
        ax.axhline(ceiling, color="black", lw=1.2, label=f"bare-model ceiling {ceiling:.1f} fps")
        ax.axhline(0.95 * ceiling, color="black", lw=0.8, ls=":", label="0.95 × ceiling (target)")
    if before:
        if ceiling and abs(before - ceiling) > 1e-9:
            ax.axhline(before, color="grey", lw=0.8, ls="--",
                       label=f"ceiling measured before the daemon runs {before:.1f} fps (sets the offered rates)")
        ax.axvline(0.8 * before, color="grey", lw=0.8, ls="-.", label="80 % of ceiling (zero-drop target)")
    bare = (modes.get("model") or {}).get("bare_path")
    if bare:
        ax.axhline(bare["throughput_fps"], color="tab:green", ls="--",
                   label=f"bare path (pre+run+post) {bare['throughput_fps']:.1f} fps")
    if modes.get("naive"):
        n = modes["naive"]["throughput_fps"]
        ax.axhline(n, color="tab:red", ls="--", label=f"naive loop {n:.1f} fps")
    ax.plot([0, hi], [0, hi], color="lightgrey", lw=1, label="throughput = offered")
    if runs:
        order = np.argsort(xs)
        label = (pl.get("setting") or {}).get("label", "")
        ax.plot(xs[order], ys[order], "o-", color="tab:blue", label=f"daemon ({label})")
        for x, y, dr in zip(xs, ys, drops):
            if dr:
                ax.annotate(f"{dr} dropped", (x, y), textcoords="offset points", xytext=(4, -12), fontsize=7,
                            color="tab:orange")
    unp = pl.get("unpaced")
    if unp:
        ax.plot([min(unp["offered_fps"], hi)], [unp["throughput_fps"]], "x", color="tab:purple", ms=9,
                label=f"unpaced replay (offered {unp['offered_fps']:.0f} fps, drawn at the edge)")
    ax.set_xlim(0, hi)
    ax.set_ylim(0, hi)
    ax.set_xlabel("offered frame rate (fps)")
    ax.set_ylabel("verdicts with a model result per second")
    ax.set_title("throughput vs offered rate")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def write_plots(results: dict[str, Any], raw: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    m = results["machine"]
    title = (f"{results['workload']['bundle']['name']} on {m['cpu_model']} ({m['cpu_logical']} cores), "
             f"{results['started_utc']}{' — QUICK RUN' if results['quick'] else ''}")
    return {"latency_cdf": plot_latency_cdf(raw, out_dir / CDF_NAME, title),
            "throughput": plot_throughput(results, out_dir / THROUGHPUT_NAME, title)}
