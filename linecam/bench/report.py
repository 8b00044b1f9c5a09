"""Results → files: ``bench.json`` (schema-checked), ``bench.md`` and the README table."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .schema import validate_results

logger = logging.getLogger(__name__)

JSON_NAME = "bench.json"
MARKDOWN_NAME = "bench.md"


def _f(x: Any, nd: int = 2) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


def _met(flag: bool | None) -> str:
    return "not run" if flag is None else ("**yes**" if flag else "**no**")


def _machine_line(r: dict[str, Any]) -> str:
    m = r["machine"]
    gpus = ", ".join(g["name"] for g in m["gpus"]) or "none"
    libs = m["libraries"]
    lib = ", ".join(f"{k} {v}" for k, v in libs.items() if v and k in ("onnxruntime", "numpy",
                                                                        "opencv-python-headless", "paho-mqtt"))
    load = "/".join(f"{x:g}" for x in m["load_average_at_start"]) or "n/a"
    return (f"{m['cpu_model']}, {m['cpu_logical']} logical cores ({m['cpu_usable']} usable), {m['memory_gb']} GB, "
            f"GPU: {gpus}; Python {m['python']}, {lib}, mosquitto {m.get('mosquitto') or '?'}; "
            f"load average at start {load}")


def headline_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(measure, value, target, met) rows shared by bench.md and the README."""
    h, t = r["headline"], r["targets"]
    sf = h["shortfall"]
    rows = []
    ratio = h["pipeline_vs_ceiling"]
    met = h["met"]["pipeline_vs_ceiling"]
    rows.append((
        "daemon pipeline throughput ÷ bare-model ceiling",
        f"{_f(ratio)} ({_f(h['pipeline_fps'], 1)} ÷ {_f(h['ceiling_fps'], 1)} fps, the highest ceiling of the run"
        + (f"; it ranged {_f(h['ceiling_min_fps'], 1)}–{_f(h['ceiling_fps'], 1)}"
           if h.get("ceiling_min_fps") is not None and h["ceiling_min_fps"] != h["ceiling_fps"] else "")
        + (f"; {_f(h['pipeline_vs_paired_ceiling'])} of the ceiling measured just before that daemon run"
           if h.get("pipeline_vs_paired_ceiling") is not None else "") + ")",
        f"≥ {t['pipeline_vs_ceiling_min']}",
        _met(met) + ("" if met in (None, True) else f" (short by {_f(sf['pipeline_vs_ceiling'])})"),
    ))
    gap = h["e2e_minus_inference_p99_ms"]
    met = h["met"]["e2e_minus_inference_p99"]
    rows.append((
        "end-to-end p99 − inference p99 (frame ready → subscriber process)",
        f"{_f(gap)} ms ({_f(h['e2e_p99_ms'])} − {_f(h['inference_p99_ms'])})",
        f"≤ {t['e2e_minus_inference_p99_ms_max']:g} ms",
        _met(met) + ("" if met in (None, True) else f" (over by {_f(sf['e2e_minus_inference_p99_ms'])} ms)"),
    ))
    for frac, g in (h.get("e2e_minus_inference_p99_ms_by_fraction") or {}).items():
        rows.append((f"the same at {float(frac):.0%} of the ceiling (transport and scheduling, little queueing)",
                     f"{_f(g)} ms", "", ""))
    drops = h["dropped_at_80pct"]
    met = h["met"]["zero_drops_at_80pct"]
    rows.append((
        f"dropped frames at 80 % of the ceiling ({_f(h['offered_fps_at_80pct'], 1)} fps offered)",
        "–" if drops is None else str(drops),
        str(t["dropped_at_80pct_max"]),
        _met(met),
    ))
    if h.get("sustained_fps_zero_drops") is not None:
        rows.append(("highest offered rate with zero drops (paced runs of this table's sweep)",
                     f"{_f(h['sustained_fps_zero_drops'], 1)} fps ({_f(h['sustained_vs_ceiling'])} of the ceiling)",
                     "", ""))
    rows.append(("naive loop (read → preprocess → run → publish) ÷ ceiling",
                 f"{_f(h['naive_vs_ceiling'])} ({_f(h['naive_fps'], 1)} fps)", "shown beside", ""))
    rows.append(("daemon pipeline ÷ naive loop", _f(h["pipeline_vs_naive"]), "", ""))
    rows.append(("bare path (preprocess + run + postprocess, one thread) ÷ ceiling",
                 f"{_f(h['bare_path_vs_ceiling'])} ({_f(h['bare_path_fps'], 1)} fps)", "", ""))
    if h.get("vlm_ttft_p50_ms") is not None:
        rows.append(("compact VLM on an NG frame: time to first token p50, decode tokens/s p50 (see bench.md)",
                     f"{_f(h['vlm_ttft_p50_ms'], 0)} ms, {_f(h['vlm_tokens_per_s_p50'], 1)} tokens/s", "", ""))
    if h.get("cpu_bound_limit") is not None:
        rows.append(("CPU per frame: bare `session.run` ÷ daemon, all threads (the most a CPU-bound daemon can "
                     "reach of a ceiling that keeps every core busy)",
                     f"{_f(h['cpu_bound_limit'])} ({_f(h['bare_cpu_ms_per_call'])} ÷ "
                     f"{_f(h['daemon_cpu_ms_per_frame'])} ms)", "", ""))
    if h.get("cpu_budget_ms_per_frame") is not None and h.get("cpu_outside_run_ms_per_frame") is not None:
        rows.append((f"CPU the daemon may spend per frame outside `session.run` to reach "
                     f"{t['pipeline_vs_ceiling_min']} of that ceiling, against what it spends (see where it goes "
                     "in bench.md)",
                     f"{_f(h['cpu_budget_ms_per_frame'])} ms allowed, {_f(h['cpu_outside_run_ms_per_frame'])} ms "
                     "spent", "", ""))
    return rows


def steadiness_note(r: dict[str, Any]) -> str | None:
    """A warning line when the machine's capacity moved during the run (shared cores)."""
    h = r["headline"]
    if h.get("steady") is not False:
        return None
    return (f"**Unsteady machine**: the bare-model ceiling ranged {_f(h['ceiling_min_fps'], 1)}–"
            f"{_f(h['ceiling_fps'], 1)} fps during this run (lowest ÷ highest {_f(h['ceiling_steadiness'])}): other "
            "work on the shared cores came and went, so ratios against the ceiling are uncertain by about that "
            "much; the per-run paired ratios and the CPU-per-frame figures are the steadier evidence. "
            "Re-run on an otherwise idle machine for a clean table.")


def _table(header: list[str], rows: list[list[str]] | list[tuple[str, ...]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def _stage_rows(lat: dict[str, dict[str, Any]]) -> list[list[str]]:
    return [[k, str(v["n"]), _f(v["p50"]), _f(v["p90"]), _f(v["p99"]), _f(v["max"])] for k, v in lat.items()]


def _res(res: dict[str, Any] | None) -> str:
    if not res:
        return "–"
    return (f"{_f(res['cpu_percent_process'], 0)} / {_f(res['cpu_percent_children'], 0)} / "
            f"{_f(res['cpu_percent_other'], 0)} %, {_f(res['rss_mb_max'], 0)} MB")


def daemon_cpu_ms(r: dict[str, Any]) -> float | None:
    """CPU ms per frame of the daemon's threads (the bench's own sampling thread left out)."""
    per = r.get("cpu_ms_per_frame")
    if not per:
        return None
    return sum(v for k, v in per.items() if not k.startswith("bench"))


def _run_row(r: dict[str, Any]) -> list[str]:
    target = "unpaced" if r["offered_fps_target"] is None else _f(r["offered_fps_target"], 1)
    return [r["setting"]["label"], target, _f(r["offered_fps"], 1), _f(r["throughput_fps"], 1),
            str(r["dropped"]), str(r["dropped_during_warmup"]), _f(r["latency_ms"]["total"]["p50"]),
            _f(r["latency_ms"]["total"]["p99"]), _f(daemon_cpu_ms(r)), _f(r.get("paired_ceiling_fps"), 1),
            _f(r["throughput_fps"] / r["paired_ceiling_fps"]) if r.get("paired_ceiling_fps") else "–",
            _res(r["resources"])]


RUN_HEADER = ["daemon setting", "offered target fps", "offered fps", "throughput fps", "dropped",
              "dropped in warm-up", "total p50 ms", "total p99 ms", "daemon CPU ms/frame",
              "ceiling just before, fps", "throughput ÷ it", "CPU bench/children/other, RSS"]


def _cpu_section(r: dict[str, Any]) -> list[str]:
    """Where the CPU goes per frame in the 80 % run, against the bare model."""
    e = r["modes"].get("e2e")
    if not e or not e.get("cpu_ms_per_frame"):
        return []
    rows = [[k, _f(v)] for k, v in e["cpu_ms_per_frame"].items() if not k.startswith("bench")]
    rows.append(["**daemon, all threads**", f"**{_f(daemon_cpu_ms(e))}**"])
    mo = r["modes"].get("model")
    if mo:
        best = next(c for c in mo["ceiling"] if c["label"] == mo["best"])
        rows.append([f"bare session.run ({best['label']}), per call", _f(best.get("cpu_ms_per_call"))])
        rows.append(["bare path (pre + run + post), per frame", _f(mo["bare_path"].get("cpu_ms_per_frame"))])
    if r["modes"].get("naive"):
        rows.append(["naive loop, per frame", _f(r["modes"]["naive"].get("cpu_ms_per_frame"))])
    return ["### Where the CPU goes (80 % run, CPU time per frame by thread)", "",
            "CPU time, not wall time: it holds even when other processes share the cores. "
            "'other (native)' is threads Python did not start (ONNX Runtime's or OpenCV's pools).", "",
            _table(["thread", "CPU ms / frame"], rows), ""]


def render_markdown(r: dict[str, Any]) -> str:
    w = r["workload"]
    b, fr, d = w["bundle"], w["frames"], w["durations_s"]
    modes = r["modes"]
    parts = [
        f"# linecam benchmark{' (quick run: machinery check, not a measurement)' if r['quick'] else ''}",
        "",
        f"Run {r['started_utc']} in {r['seconds']} s with `{r['command']}`.",
        "",
        f"**Machine**: {_machine_line(r)}.",
        "",
        f"**Model**: `{b['name']}` ({b['file']}, input {'x'.join(map(str, b['input_shape']))}), sha256 "
        f"`{b['sha256'][:12]}…`. **Frames**: {fr['count']} simulated-line parts, {fr['width']}x{fr['height']} "
        f"{fr['format']}, {fr['defect_rate']:.0%} defective, looped by the replay source.",
        "",
        "## Headline (ratios within this one run)",
        "",
        *((note, "") if (note := steadiness_note(r)) else ()),
        _table(["measure", "value", "target", "met"], headline_rows(r)),
        "",
    ]
    if "model" in modes:
        mo = modes["model"]
        parts += ["## model: the backend alone (ceiling)", "",
                  f"Already-preprocessed input → `session.run`, warm-up {d['warmup_s']} s, then {d['model_s']} s per "
                  f"setting. Ceiling = best setting: **{mo['best']}, {_f(mo['ceiling_fps'], 1)} fps**.", "",
                  _table(["setting", "calls", "fps", "p50 ms", "p90 ms", "p99 ms", "max ms",
                          "CPU bench/children/other, RSS"],
                         [[c["label"] + suffix, str(c["calls"]), _f(c["throughput_fps"], 1),
                           _f(c["latency_ms"]["p50"]), _f(c["latency_ms"]["p90"]), _f(c["latency_ms"]["p99"]),
                           _f(c["latency_ms"]["max"]), _res(c["resources"])]
                          for c, suffix in [*((c, "") for c in mo["ceiling"]),
                                            *(((mo["ceiling_after"], " (again, after the daemon runs)"),)
                                              if mo.get("ceiling_after") else ())]]), "",
                  f"Bare path (frames in memory → preprocess → run → postprocess, one thread, intra-op "
                  f"{mo['bare_path']['intra_op_threads'] or 'default'}): {mo['bare_path']['frames']} frames, "
                  f"**{_f(mo['bare_path']['throughput_fps'], 1)} fps**.", "",
                  _table(["stage", "n", "p50 ms", "p90 ms", "p99 ms", "max ms"],
                         _stage_rows(mo["bare_path"]["latency_ms"])), ""]
    if "naive" in modes:
        nv = modes["naive"]
        parts += ["## naive loop (baseline)", "",
                  f"{nv['description']}: {nv['frames']} frames in {nv['seconds']} s, "
                  f"**{_f(nv['throughput_fps'], 1)} fps**; CPU/RSS {_res(nv['resources'])}.", "",
                  _table(["stage", "n", "p50 ms", "p90 ms", "p99 ms", "max ms"], _stage_rows(nv["latency_ms"])), ""]
    if "pipeline" in modes:
        pl = modes["pipeline"]
        parts += ["## pipeline: the daemon in-process on the replay source", "",
                  f"`run_service` unchanged, publishing to a real mosquitto; warm-up {d['pipeline_warmup_s']} s, "
                  f"then {d['pipeline_s']} s per point ({d['e2e_s']} s for the 80 % point, which is the e2e run). "
                  f"Chosen setting: **{pl['setting']['label']}**, queue {pl['setting']['queue_size']}, snapshots "
                  f"{'on' if pl['setting']['snapshots'] else 'off'}, durable spool "
                  f"{'on' if pl['setting'].get('spool', True) else 'off'}.", ""]
        if pl["search"]:
            parts += ["Settings search (offered 1.1 × ceiling):", "", _table(RUN_HEADER, [_run_row(x) for x in
                                                                                       pl["search"]]), ""]
        parts += ["Offered-rate sweep:", "", _table(RUN_HEADER, [_run_row(x) for x in pl["sweep"]]), ""]
        if pl["unpaced"] is not None:
            parts += ["Unpaced replay (as fast as the source reads: a many-fold overload; every dropped frame "
                      "still gets a SKIPPED verdict):", "", _table(RUN_HEADER, [_run_row(pl["unpaced"])]), ""]
    if "e2e" in modes:
        e = modes["e2e"]
        lat = dict(e["latency_ms"])
        lat.update({f"{k} (subscriber process)": v for k, v in e["e2e"]["latency_ms"].items()})
        parts += ["## e2e: frame ready → verdict received by a separate subscriber process", "",
                  f"Offered {_f(e['offered_fps'], 1)} fps (80 % of the ceiling) for {e['seconds']} s after "
                  f"{e['warmup']['seconds']} s warm-up: {e['processed']} verdicts, {e['dropped']} dropped "
                  f"({e['dropped_during_warmup']} in warm-up), {e['e2e']['verdicts_received']} of "
                  f"{e['e2e']['verdicts_published']} received, {e['e2e']['lost']} lost. Same host: the frame's "
                  "`time.monotonic_ns()` travels in the verdict (`frame_mono_ns`) and the subscriber stamps "
                  "receipt with the same clock. CPU bench/children/other, RSS: " + _res(e["resources"]) + ".", "",
                  _table(["stage", "n", "p50 ms", "p90 ms", "p99 ms", "max ms"], _stage_rows(lat)), ""]
        for m in modes.get("e2e_more") or []:
            gap = m["e2e"]["latency_ms"]["e2e"]["p99"]
            inf = m["latency_ms"]["inference"]["p99"]
            lat = dict(m["latency_ms"])
            lat.update({f"{k} (subscriber process)": v for k, v in m["e2e"]["latency_ms"].items()})
            parts += [f"### The same at {m['offered_fraction']:.0%} of the ceiling ({_f(m['offered_fps'], 1)} fps)", "",
                      f"{m['processed']} verdicts, {m['dropped']} dropped, {m['e2e']['lost']} lost; e2e p99 − "
                      f"inference p99 = {_f(None if gap is None or inf is None else gap - inf)} ms. CPU "
                      f"bench/children/other, RSS: {_res(m['resources'])}.", "",
                      _table(["stage", "n", "p50 ms", "p90 ms", "p99 ms", "max ms"], _stage_rows(lat)), ""]
        parts += _cpu_section(r)
    if "vlm" in modes:
        v = modes["vlm"]
        parts += ["## vlm: the compact VLM on NG frames", ""]
        if not v.get("available"):
            parts += [f"Not measured: {v['reason']}.", ""]
        else:
            b = v["bundle"]
            what = (f"`{b['name']}` ({b['family']}, decoder `{b['decoder']}`"
                    + ("; the bench's reference model: real dimensions, random weights, speed only" if b.get("reference")
                       else "") + ")")
            parts += [f"{what}: {v['reason']}; median prompt {v['prompt_tokens_median']:.0f} tokens; warm-up "
                      f"{_f(v['warmup_s'])} s. TTFT = call → first token (crop preprocessing, vision encoder, "
                      "embedding, prefill); tokens/s = decode after the first token.", "",
                      _table(["measure", "n", "p50", "p90", "p99", "max"],
                             [[label, str(v[key]["n"]), _f(v[key]["p50"]), _f(v[key]["p90"]), _f(v[key]["p99"]),
                               _f(v[key]["max"])]
                              for label, key in (("time to first token, ms", "time_to_first_token_ms"),
                                                 ("of which vision encoder, ms", "vision_ms"),
                                                 ("tokens/s (decode)", "tokens_per_s"))]), ""]
    parts += ["Plots: `latency_cdf.png` (per-stage latency CDF and tail), `throughput_vs_offered.png`.", "",
              "How to read this and what each setting means: `benchmarks/README.md`.", ""]
    return "\n".join(parts)


def readme_block(r: dict[str, Any], results_path: str = "benchmarks/results/bench.json") -> str:
    """The text placed between the README's ``bench:start`` / ``bench:end`` markers."""
    m = r["machine"]
    gpus = ", ".join(g["name"] for g in m["gpus"]) or "no GPU"
    b = r["workload"]["bundle"]
    return "\n".join([
        f"Measured {r['started_utc'][:10]} on {m['cpu_model']} ({m['cpu_logical']} cores, {gpus}), "
        f"model `{b['name']}` on ONNX Runtime {m['libraries'].get('onnxruntime')} (CPU), "
        f"generated from [`{results_path}`]({results_path}):",
        "",
        *((note, "") if (note := steadiness_note(r)) else ()),
        _table(["measure", "value", "target", "met"], headline_rows(r)),
        "",
        f"Reproduce with `{reproducible(r['command'])}` (about {max(1, round(r['seconds'] / 60))} min); per-stage tables and "
        "plots: [`benchmarks/results/bench.md`](benchmarks/results/bench.md).",
    ])


def write_results(r: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Validate and write ``bench.json`` and ``bench.md`` into ``out_dir``."""
    validate_results(r)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / JSON_NAME, "markdown": out_dir / MARKDOWN_NAME}
    paths["json"].write_text(json.dumps(r, indent=1, allow_nan=False) + "\n")
    paths["markdown"].write_text(render_markdown(r))
    return paths


def load_results(path: Path) -> dict[str, Any]:
    r = json.loads(path.read_text())
    validate_results(r)
    return r


#: Options that name where a run kept its files: they default to the checkout's own folders.
_PATH_OPTIONS = ("--demo-cache", "--workdir", "--out")


def reproducible(command: str) -> str:
    """The recorded command without the options that point at the measuring machine's folders
    (a run from a scratch copy records /tmp paths a reader does not have)."""
    words, out = command.split(), []
    skip = False
    for w in words:
        if skip:
            skip = False
        elif w in _PATH_OPTIONS:
            skip = True
        elif not w.startswith(tuple(o + "=" for o in _PATH_OPTIONS)):
            out.append(w)
    return " ".join(out)
