"""The benchmark machinery (``linecam bench``): statistics, windows, schema, files, plots,
README block. Never the speed: a ``--quick`` run on the tiny test model measures nothing."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from click.testing import CliRunner

from bundles import make_tiny_bundle
from linecam.bench.machine import machine_info
from linecam.bench.pipeline import PipelineSetting, _analyse
from linecam.bench.readme import END, START, replace_block
from linecam.bench.report import headline_rows, load_results, readme_block, render_markdown
from linecam.bench.resources import ResourceMonitor
from linecam.bench.schema import validate_results
from linecam.bench.suite import TARGETS, Durations, headline
from linecam.errors import LinecamError

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# -- a whole quick run, once for the module ----------------------------------------------------
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    bundle = make_tiny_bundle(tmp / "bundle", size=64, image_threshold=0.3, pixel_threshold=0.5)
    out = tmp / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "linecam", "bench", "--quick", "--bundle", str(bundle),
         "--workdir", str(tmp / "work"), "--out", str(out), "--no-unpaced"],
        capture_output=True, text=True, timeout=240, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, json.loads((out / "bench.json").read_text()), proc


def test_quick_run_writes_schema_valid_results(quick_run):
    out, r, _ = quick_run
    validate_results(r)  # raises on any missing / mistyped field
    assert r["quick"] is True and r["command"].startswith("linecam bench --quick")
    assert set(r["modes"]) == {"model", "naive", "pipeline", "e2e", "e2e_more", "vlm"}
    assert r["modes"]["e2e_more"] == []  # --quick runs the 80 % e2e run only
    m = r["machine"]
    assert m["cpu_logical"] == os.cpu_count() and m["libraries"]["onnxruntime"]
    assert r["workload"]["bundle"]["name"] == "tiny-darkness"


def test_quick_run_numbers_are_consistent(quick_run):
    _, r, _ = quick_run
    h, modes = r["headline"], r["modes"]
    runs = [*modes["pipeline"]["sweep"], *modes["pipeline"]["search"]]
    assert all(r["paired_ceiling_fps"] > 0 for r in runs)  # the ceiling re-measured before each daemon run
    ceiling = max(modes["model"]["ceiling_fps"], modes["model"]["ceiling_after"]["throughput_fps"],
                  *(r["paired_ceiling_fps"] for r in runs))
    assert h["ceiling_fps"] == pytest.approx(ceiling)
    best = max(modes["pipeline"]["sweep"], key=lambda x: x["throughput_fps"])
    assert h["pipeline_vs_paired_ceiling"] == pytest.approx(best["throughput_fps"] / best["paired_ceiling_fps"])
    assert h["pipeline_fps"] == pytest.approx(max(s["throughput_fps"] for s in modes["pipeline"]["sweep"]))
    assert h["pipeline_vs_ceiling"] == pytest.approx(h["pipeline_fps"] / ceiling)
    assert h["naive_vs_ceiling"] == pytest.approx(modes["naive"]["throughput_fps"] / ceiling)
    e = modes["e2e"]
    assert h["dropped_at_80pct"] == e["dropped"]
    assert h["e2e_minus_inference_p99_ms"] == pytest.approx(
        e["e2e"]["latency_ms"]["e2e"]["p99"] - e["latency_ms"]["inference"]["p99"])
    # the subscriber process got every verdict the daemon published, in order of its clock
    assert e["e2e"]["verdicts_received"] == e["e2e"]["verdicts_published"] > 0 and e["e2e"]["lost"] == 0
    lat = e["latency_ms"]
    e2e = e["e2e"]["latency_ms"]["e2e"]
    # receipt is after the verdict was built, which is after 'total' was taken: e2e dominates total
    assert e2e["n"] == lat["total"]["n"] > 0
    for q in ("min", "p50", "p90", "p99", "max"):
        assert e2e[q] >= lat["total"][q] >= lat["inference"][q] > 0
    assert e["e2e"]["latency_ms"]["publish_to_receive"]["min"] > 0
    # the daemon's own counters agree: every frame got exactly one verdict
    c = e["daemon_counters"]
    assert c["frames"] == e["e2e"]["verdicts_published"] == c.get("ok", 0) + c.get("ng", 0) + c.get("skipped", 0)
    # CPU time per frame, by the daemon's threads: the inference worker is always there
    assert e["cpu_ms_per_frame"]["inference workers"] > 0
    assert all(v >= 0 for v in e["cpu_ms_per_frame"].values())
    assert modes["model"]["ceiling"][0]["cpu_ms_per_call"] > 0
    daemon_cpu = sum(v for k, v in e["cpu_ms_per_frame"].items() if not k.startswith("bench"))
    assert h["daemon_cpu_ms_per_frame"] == pytest.approx(daemon_cpu)
    assert h["cpu_bound_limit"] == pytest.approx(modes["model"]["ceiling"][0]["cpu_ms_per_call"] / daemon_cpu)
    assert modes["vlm"]["available"] is False and modes["vlm"]["tokens_per_s"] is None
    for res in [modes["naive"]["resources"], e["resources"], *(x["resources"] for x in modes["model"]["ceiling"])]:
        assert res["rss_mb_max"] > 10 and res["cpu_percent_process"] > 0


def test_quick_run_writes_markdown_and_plots(quick_run):
    out, r, proc = quick_run
    md = (out / "bench.md").read_text()
    assert "quick run" in md and "## Headline" in md and "## e2e" in md and "Not measured: no VLM bundle given" in md
    for name in ("latency_cdf.png", "throughput_vs_offered.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000
        w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert w > 500 and h > 300
    assert "daemon pipeline throughput" in proc.stdout


# -- the counting, on verdicts with known times -------------------------------------------------
def _verdict(fid: int, ready_ms: float, done_ms: float, verdict: str = "OK", inference: float = 5.0) -> dict:
    ms = 1_000_000
    lat = {"queue": 0.5, "preprocess": 1.0, "inference": inference, "postprocess": 0.5,
           "total": done_ms - ready_ms}
    return {"frame_id": fid, "verdict": verdict, "frame_mono_ns": int(ready_ms * ms), "mono_ns": int(done_ms * ms),
            "latency_ms": {"total": lat["total"]} if verdict == "SKIPPED" else lat}


def test_window_counting_throughput_drops_and_percentiles():
    # frames every 10 ms from t=0; warm-up ends at 100 ms, stop at 1100 ms (a 1.0 s window)
    verdicts = []
    for i in range(120):
        ready = 10.0 * i
        if i in (3, 50, 51):
            verdicts.append(_verdict(i, ready, ready + 0.1, "SKIPPED"))
        else:
            verdicts.append(_verdict(i, ready, ready + 1.0 + (i % 10), inference=float(i % 10 + 1)))
    marks = {"start": 0, "warm": 100 * 10**6, "stop": 1100 * 10**6}
    run = _analyse(verdicts, None, marks, {"frames": 120}, {"cpu_percent_process": 1.0}, PipelineSetting(1, 1),
                   100.0, 0.1, 1.0)
    r = run.result
    assert r["seconds"] == pytest.approx(1.0)
    assert r["frames_ready"] == 100  # frames 10..109 became ready in [100, 1100) ms
    assert r["offered_fps"] == pytest.approx(100.0)
    # completed in the window: frames whose done time (ready + 1 + i%10 ms) is in [100, 1100), minus drops
    done = [i for i in range(120) if i not in (3, 50, 51) and 100 <= 10 * i + 1 + i % 10 < 1100]
    assert r["processed"] == len(done) and r["throughput_fps"] == pytest.approx(len(done))
    assert r["dropped"] == 2 and r["dropped_during_warmup"] == 1
    measured = [i for i in range(10, 120) if i not in (50, 51)]
    inf = np.array([float(i % 10 + 1) for i in measured])
    got = r["latency_ms"]["inference"]
    assert got["n"] == len(measured)
    assert got["p50"] == pytest.approx(np.percentile(inf, 50))
    assert got["p99"] == pytest.approx(np.percentile(inf, 99)) and got["max"] == 10.0 and got["min"] == 1.0


def test_cpu_per_frame_by_thread_role():
    from linecam.bench.pipeline import cpu_ms_per_frame

    before = {1: ("inference workers", 1.0), 2: ("snapshots", 0.5), 3: ("other (native)", 9.0)}
    after = {1: ("inference workers", 2.0), 2: ("snapshots", 0.6), 4: ("other (native)", 0.2),
             5: ("inference workers", 0.5)}
    # tid 3 ended (left out, never negative); tids 4 and 5 started in the window (counted from zero)
    got = cpu_ms_per_frame(before, after, frames=100)
    assert got == {"inference workers": pytest.approx(15.0), "other (native)": pytest.approx(2.0),
                   "snapshots": pytest.approx(1.0)}


def test_e2e_from_subscriber_columns():
    verdicts = [_verdict(i, 10.0 * i, 10.0 * i + 4.0) for i in range(30)]
    ms = 1_000_000
    received = {  # receipt 6 ms after frame ready, 2 ms after the verdict was built
        "frame_id": list(range(30)), "verdict": ["OK"] * 30,
        "frame_mono_ns": [v["frame_mono_ns"] for v in verdicts], "mono_ns": [v["mono_ns"] for v in verdicts],
        "received_ns": [v["frame_mono_ns"] + 6 * ms for v in verdicts], "inference_ms": [5.0] * 30,
    }
    marks = {"start": 0, "warm": 50 * ms, "stop": 400 * ms}
    r = _analyse(verdicts, received, marks, {}, {}, PipelineSetting(1, 1), 100.0, 0.05, 0.35).result
    e = r["e2e"]
    assert e["lost"] == 0 and e["verdicts_received"] == 30
    assert e["latency_ms"]["e2e"]["n"] == 25  # frames ready after the warm-up
    assert e["latency_ms"]["e2e"]["p99"] == pytest.approx(6.0)
    assert e["latency_ms"]["publish_to_receive"]["max"] == pytest.approx(2.0)
    received2 = {k: v[:-3] for k, v in received.items()}  # three never arrived
    assert _analyse(verdicts, received2, marks, {}, {}, PipelineSetting(1, 1), 100.0, 0.05,
                    0.35).result["e2e"]["lost"] == 3


# -- headline, schema, report ---------------------------------------------------------------------
def _fake_results(tmp_path: Path) -> dict:
    summary = {"n": 10, "mean": 1.0, "min": 0.5, "p50": 1.0, "p90": 1.5, "p99": 2.0, "max": 2.5}
    res = {"seconds": 1.0, "samples": 5, "cpu_percent_process": 90.0, "cpu_percent_children": 5.0,
           "cpu_percent_other": 3.0, "rss_mb_max": 150.0, "children_rss_mb_max": 40.0}
    stages = {k: dict(summary) for k in ("queue", "preprocess", "inference", "postprocess", "total")}
    run = {"setting": {"workers": 1, "intra_op_threads": 1, "queue_size": 8, "snapshots": True,
                       "label": "1 worker x intra-op 1"},
           "offered_fps_target": 80.0, "warmup": {"seconds": 2, "verdicts": 10}, "seconds": 10.0, "frames_ready": 800,
           "offered_fps": 80.0, "processed": 800, "throughput_fps": 80.0, "dropped": 0, "dropped_during_warmup": 0,
           "ng": 200, "daemon_counters": {"frames": 1000}, "latency_ms": stages, "resources": res}
    e2e = copy.deepcopy(run)
    e2e["e2e"] = {"verdicts_published": 1000, "verdicts_received": 1000, "lost": 0,
                  "latency_ms": {"e2e": {**summary, "p99": 12.5}, "publish_to_receive": dict(summary)}}
    e2e["latency_ms"]["inference"]["p99"] = 10.0
    low = copy.deepcopy(e2e)
    low.update(offered_fraction=0.5, offered_fps_target=50.0, offered_fps=50.0, throughput_fps=50.0)
    low["e2e"]["latency_ms"]["e2e"]["p99"] = 11.0
    fast = copy.deepcopy(run)
    fast.update(offered_fps_target=110.0, offered_fps=110.0, throughput_fps=90.0, dropped=30, paired_ceiling_fps=95.0)
    e2e["paired_ceiling_fps"] = 98.0
    e2e["cpu_ms_per_frame"] = {"inference workers": 7.0, "mqtt network (paho)": 1.0, "bench (sampling)": 0.5}
    ceil = {"setting": {"streams": 1, "intra_op_threads": 1}, "label": "1 stream x intra-op 1",
            "warmup": {"seconds": 1, "calls": 10}, "seconds": 5.0, "calls": 500, "throughput_fps": 100.0,
            "cpu_ms_per_call": 6.0, "latency_ms": summary, "resources": res}
    r = {
        "schema_version": 1, "started_utc": "2026-01-01T00:00:00+00:00", "command": "python benchmarks/run.py",
        "quick": False, "seconds": 200.0,
        "machine": machine_info(None),
        "workload": {"bundle": {"name": "m", "path": str(tmp_path), "sha256": "ab" * 32, "input_shape": [1, 3, 8, 8],
                                "file": "onnx_fp32"},
                     "frames": {"count": 8, "width": 64, "height": 64, "defect_rate": 0.25, "seed": 7,
                                "format": "BMP"},
                     "durations_s": asdict(Durations())},
        "modes": {
            "model": {"ceiling": [ceil], "best": ceil["label"], "ceiling_fps": 100.0,
                      "ceiling_after": {**ceil, "throughput_fps": 96.0},
                      "bare_path": {"intra_op_threads": 1, "warmup": {}, "seconds": 5.0, "frames": 450, "ng": 100,
                                    "throughput_fps": 90.0,
                                    "latency_ms": {k: dict(summary) for k in
                                                   ("preprocess", "inference", "postprocess", "total")},
                                    "resources": res}},
            "naive": {"description": "naive", "warmup": {}, "seconds": 5.0, "frames": 300, "throughput_fps": 60.0,
                      "latency_ms": {"total": dict(summary)}, "resources": res},
            "pipeline": {"setting": run["setting"], "search": [], "sweep": [e2e, fast], "unpaced": None},
            "e2e": e2e,
            "e2e_more": [low],
            "vlm": {"available": False, "reason": "no VLM bundle given", "time_to_first_token_ms": None,
                    "tokens_per_s": None},
        },
        "targets": dict(TARGETS),
    }
    r["headline"] = headline(r)
    return r


def test_headline_ratios_targets_and_shortfalls(tmp_path):
    r = _fake_results(tmp_path)
    h = r["headline"]
    assert h["ceiling_fps"] == 100.0  # the highest of before (100), after (96) and the paired ones (95, 98)
    assert h["ceiling_min_fps"] == 95.0
    assert h["ceiling_steadiness"] == pytest.approx(0.95) and h["steady"] is True
    assert h["pipeline_vs_paired_ceiling"] == pytest.approx(90.0 / 95.0)  # the best run, against its own
    assert h["pipeline_fps"] == 90.0 and h["pipeline_vs_ceiling"] == pytest.approx(0.90)
    assert h["met"]["pipeline_vs_ceiling"] is False
    assert h["shortfall"]["pipeline_vs_ceiling"] == pytest.approx(0.05)
    assert h["e2e_minus_inference_p99_ms"] == pytest.approx(2.5)
    assert h["met"]["e2e_minus_inference_p99"] is True and h["shortfall"]["e2e_minus_inference_p99_ms"] == 0
    assert h["dropped_at_80pct"] == 0 and h["met"]["zero_drops_at_80pct"] is True
    assert h["naive_vs_ceiling"] == pytest.approx(0.6) and h["pipeline_vs_naive"] == pytest.approx(1.5)
    assert h["e2e_minus_inference_p99_ms_by_fraction"] == {"0.5": pytest.approx(1.0)}
    assert h["daemon_cpu_ms_per_frame"] == 8.0 and h["cpu_bound_limit"] == pytest.approx(0.75)  # bench thread left out
    # 0.95 of a ceiling that keeps the cores busy leaves 6.0 * (1/0.95 - 1) ms outside session.run
    assert h["cpu_budget_ms_per_frame"] == pytest.approx(6.0 / 19) and h["cpu_outside_run_ms_per_frame"] == 2.0
    # 80 fps (e2e run) and 50 fps dropped nothing, 110 fps dropped 30
    assert h["sustained_fps_zero_drops"] == 80.0 and h["sustained_vs_ceiling"] == pytest.approx(0.8)
    validate_results(r)
    rows = headline_rows(r)
    assert rows[0][3] == "**no** (short by 0.05)" and rows[1][3] == "**yes**"
    md = render_markdown(r)
    assert "| daemon pipeline throughput ÷ bare-model ceiling | 0.90 (90.0 ÷ 100.0 fps" in md
    assert "quick run" not in md
    assert "### The same at 50% of the ceiling (50.0 fps)" in md and "| the same at 50% of the ceiling" in md
    assert "| highest offered rate with zero drops (paced runs of this table's sweep) | 80.0 fps (0.80 of the ceiling)" in md
    assert "| 0.32 ms allowed, 2.00 ms spent |" in md


def test_unsteady_machine_is_flagged(tmp_path):
    r = _fake_results(tmp_path)
    r["modes"]["model"]["ceiling_after"]["throughput_fps"] = 60.0  # capacity moved under the run
    r["headline"] = headline(r)
    validate_results(r)
    assert r["headline"]["steady"] is False and r["headline"]["ceiling_steadiness"] == pytest.approx(0.6)
    assert "**Unsteady machine**: the bare-model ceiling ranged 60.0–100.0 fps" in render_markdown(r)
    assert "Unsteady machine" in readme_block(r)
    assert "Unsteady" not in render_markdown(_fake_results(tmp_path))


def test_headline_with_modes_not_run_is_null(tmp_path):
    r = _fake_results(tmp_path)
    for k in ("pipeline", "e2e", "naive"):
        del r["modes"][k]
    r["headline"] = headline(r)
    validate_results(r)
    assert r["headline"]["pipeline_vs_ceiling"] is None and r["headline"]["met"]["zero_drops_at_80pct"] is None
    assert "not run" in render_markdown(r)


@pytest.mark.parametrize("breakage", ["no_headline_key", "negative_fps", "bad_summary", "unknown_mode"])
def test_schema_rejects_broken_results(tmp_path, breakage):
    r = _fake_results(tmp_path)
    if breakage == "no_headline_key":
        del r["headline"]["dropped_at_80pct"]
    elif breakage == "negative_fps":
        r["modes"]["e2e"]["throughput_fps"] = -1.0
    elif breakage == "bad_summary":
        del r["modes"]["model"]["ceiling"][0]["latency_ms"]["p99"]
    else:
        r["modes"]["gpu_magic"] = {}
    with pytest.raises(jsonschema.ValidationError):
        validate_results(r)


# -- README block --------------------------------------------------------------------------------
def test_readme_block_replaced_between_markers_only(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nintro\n\n{START}\nold table\n{END}\n\n## after\ntext\n")
    r = _fake_results(tmp_path)
    block = readme_block(r)
    replace_block(readme, block)
    replace_block(readme, block)  # idempotent
    text = readme.read_text()
    assert text.startswith("# x\n\nintro\n\n" + START + "\n") and text.endswith(END + "\n\n## after\ntext\n")
    assert "old table" not in text and text.count("daemon pipeline throughput") == 1
    assert "`python benchmarks/run.py`" in text and "benchmarks/results/bench.json" in text


def test_readme_without_markers_or_file_fails_clearly(tmp_path):
    readme = tmp_path / "README.md"
    with pytest.raises(LinecamError, match="not found"):
        replace_block(readme, "x")
    assert not readme.exists()  # never created
    readme.write_text("# no markers\n")
    with pytest.raises(LinecamError, match="bench:start"):
        replace_block(readme, "x")
    assert readme.read_text() == "# no markers\n"


def test_bench_readme_command(tmp_path, quick_run):
    out, r, _ = quick_run
    readme = tmp_path / "README.md"
    readme.write_text(f"a\n{START}\n{END}\nb\n")
    script = [sys.executable, "-m", "linecam", "bench", "readme", "--readme", str(readme)]
    quick = subprocess.run([*script, "--results", str(out / "bench.json")], capture_output=True, text=True,
                           timeout=60)
    assert quick.returncode != 0 and "--quick run" in quick.stderr  # a quick run never lands in the README
    full = dict(r, quick=False)
    (tmp_path / "full.json").write_text(json.dumps(full))
    ok = subprocess.run([*script, "--results", str(tmp_path / "full.json")], capture_output=True, text=True,
                        timeout=60)
    assert ok.returncode == 0, ok.stderr
    text = readme.read_text()
    assert text.startswith(f"a\n{START}\n") and text.endswith(f"{END}\nb\n") and "tiny-darkness" in text
    assert load_results(tmp_path / "full.json")["quick"] is False
    missing = subprocess.run([*script, "--results", str(tmp_path / "full.json"), "--readme",
                              str(tmp_path / "nope.md")], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "not found" in missing.stderr and not (tmp_path / "nope.md").exists()


# -- plots, resources, CLI -------------------------------------------------------------------------
def test_plots_from_known_samples(tmp_path):
    from linecam.bench.plots import latency_series, write_plots

    rng = np.random.default_rng(0)
    raw = {"e2e_run": {k: rng.gamma(2.0, 1.0, 200) for k in ("queue", "preprocess", "inference", "postprocess",
                                                             "total", "e2e")},
           "ceiling_best": rng.gamma(2.0, 1.0, 300)}
    series = latency_series(raw)
    assert list(series) == ["daemon queue", "daemon preprocess", "daemon inference", "daemon postprocess",
                            "daemon total", "e2e (subscriber process)", "bare session.run"]
    paths = write_plots(_fake_results(tmp_path), raw, tmp_path / "plots")
    for p in paths.values():
        assert p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 10_000


def test_resource_monitor_sees_a_busy_thread():
    stop = threading.Event()

    def burn() -> None:
        x = 0
        while not stop.is_set():
            x += 1

    t = threading.Thread(target=burn)
    with ResourceMonitor(interval=0.05) as mon:
        t.start()
        time.sleep(0.6)
        stop.set()
        t.join()
    s = mon.summary()
    assert s["samples"] >= 5 and s["seconds"] >= 0.5
    assert s["cpu_percent_process"] > 15  # a spinning thread, even on shared cores
    assert s["rss_mb_max"] > 10 and s["cpu_percent_other"] >= 0


def test_cli_registered_and_rejects_half_a_setting(tmp_path):
    from linecam.cli import cli

    runner = CliRunner()
    assert "--quick" in runner.invoke(cli, ["bench", "--help"]).output
    res = runner.invoke(cli, ["bench", "--quick", "--workers", "2", "--bundle", str(tmp_path), "--no-plots"])
    assert res.exit_code != 0 and "--intra-op-threads together" in res.output


# -- vlm mode --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    pytest.importorskip("torch")
    from linecam.export.vlm.export import export_vlm
    from linecam.export.vlm.tiny import build_model_folder

    work = tmp_path_factory.mktemp("vlm")
    model = build_model_folder("qwen2_5_vl", work / "hf", size="tiny")
    export_vlm(model, work / "bundle", quantize=("int8",), agreement_prompts=1, agreement_tokens=4)
    return work / "bundle"


def _line_frames(n: int = 24):
    from linecam.camera.synthetic import SyntheticLineSource

    with SyntheticLineSource(width=160, height=160, fps=None, defect_rate=0.5, seed=3, frames=n) as src:
        return [src.read(timeout=1.0) for _ in range(n)]


def test_vlm_mode_times_descriptions_of_ng_frames(tmp_path, tiny_vlm):
    from linecam.bench.vlm import run_vlm
    from linecam.bundle import load_bundle

    # 0.775 splits this line roughly in half (mechanics, not accuracy): NG frames with regions occur
    expert = load_bundle(make_tiny_bundle(tmp_path / "expert", size=64, image_threshold=0.775, pixel_threshold=0.5))
    v = run_vlm(tiny_vlm, expert, _line_frames(), precision="int8", max_new_tokens=5, runs=3, threads=1)
    assert v["available"] is True, v["reason"]
    assert v["runs"] == 3 and v["new_tokens"] == 5 and v["bundle"]["decoder"] == "decoder_int8"
    ttft, tps, vision = v["time_to_first_token_ms"], v["tokens_per_s"], v["vision_ms"]
    assert ttft["n"] == tps["n"] == vision["n"] == 3
    assert 0 < vision["p50"] <= ttft["p50"] and tps["p50"] > 0
    # it lands in the results: schema, headline, markdown
    r = _fake_results(tmp_path)
    r["modes"]["vlm"] = v
    r["headline"] = headline(r)
    validate_results(r)
    assert r["headline"]["vlm_ttft_p50_ms"] == ttft["p50"] and r["headline"]["vlm_tokens_per_s_p50"] == tps["p50"]
    md = render_markdown(r)
    assert "| time to first token, ms | 3 |" in md and "| tokens/s (decode) | 3 |" in md
    assert any(row[0].startswith("compact VLM on an NG frame") for row in headline_rows(r))
    broken = copy.deepcopy(r)
    del broken["modes"]["vlm"]["vision_ms"]
    with pytest.raises(jsonschema.ValidationError):
        validate_results(broken)


def test_vlm_mode_says_why_when_it_measures_nothing(tmp_path, tiny_vlm):
    from linecam.bench.vlm import run_vlm
    from linecam.bundle import load_bundle

    v = run_vlm(None)
    assert v["available"] is False and "--vlm-bundle" in v["reason"] and v["tokens_per_s"] is None
    never_ng = load_bundle(make_tiny_bundle(tmp_path / "expert", size=64, image_threshold=1e6, pixel_threshold=0.5))
    v = run_vlm(tiny_vlm, never_ng, _line_frames(8), runs=2, max_new_tokens=3)
    assert v["available"] is False and "no bench frame NG" in v["reason"]
    r = _fake_results(tmp_path)
    r["modes"]["vlm"] = v
    r["headline"] = headline(r)
    validate_results(r)
    assert "Not measured: the region expert judged no bench frame NG" in render_markdown(r)


def test_real_photo_render_marks_rows_kept_from_a_previous_run():
    from linecam.bench.real_photo import render

    m = {"overall": {"image_auroc": 0.9, "pixel_auroc": 0.8, "aupro": 0.7}, "per_kind": {}, "by_strength": {"soft": 0.5, "strong": 0.6}}
    old = {"started": "2026-01-01T00:00:00Z", "data_version": 1}
    r = {"machine": "m", "crop": 128, "settings": "s", "categories": {
        "a": {"patchcore": m, "cnn": {"eval": {"fp32": m}, "distil": {}}},
        "b": {"patchcore": m, "cnn": {"eval": {"fp32": m}, "distil": {}, "previous_run": old}}}}
    rows: dict[str, str] = {}
    for line in render(r).splitlines():  # the first table's rows (later tables repeat the labels)
        if line.startswith("| "):
            rows.setdefault(line.split(" | ")[0], line)
    fp32 = next(v for k, v in rows.items() if k.startswith("| cnn teacher -> student FP32"))
    assert "previous run 2026-01-01T00:00:00Z, test data v1: b" in fp32
    assert fp32.endswith("| – | – |")  # no mean across two runs
    assert rows["| PatchCore reference (effnet-lite0, direct)"].endswith("| 0.900 | 0.800 |")


def test_real_photo_render_shows_the_reference_scored_like_the_students():
    """The reference's second row reads ``patchcore.students_rule`` (same maps, the students' image
    score), so a student's lead over plain PatchCore can be told apart from the score rule's."""
    from linecam.bench.real_photo import render

    def m(img: float) -> dict:
        return {"overall": {"image_auroc": img, "pixel_auroc": 0.8, "aupro": 0.7},
                "per_kind": {"dent": {"image_auroc": img, "pixel_auroc": 0.8, "aupro": 0.7}},
                "by_strength": {"soft": 0.5, "strong": 0.6}}

    r = {"machine": "m", "crop": 128, "settings": "s", "categories": {
        c: {"patchcore": {**m(0.6), "students_rule": {**m(img), "score_pool": 3}}} for c, img in (("a", 0.8), ("b", 0.9))}}
    lines = [ln for ln in render(r).splitlines() if ln.startswith("| same, scored like the students")]
    assert len(lines) == 2, render(r)  # the category table and the per-kind table
    assert lines[0].endswith("| 0.850 | 0.800 |") and "0.800 / 0.800 / 0.700 | 0.900 / 0.800 / 0.700" in lines[0]
    assert "| 0.850 (0.800) |" in lines[1]


def test_real_photo_results_say_which_defaults_the_run_used():
    """A results file says what "default settings" meant when it was measured (defaults change:
    the scratch teacher's steps went 1000 -> 3000); options given in --extra are not listed."""
    from linecam.bench.real_photo import distil_defaults, render

    d = distil_defaults(["--steps", "3000"])
    assert "steps" not in d and d["teacher_steps"] >= 1 and d["student"] in ("lite0", "s", "m", "l")
    assert "student" not in distil_defaults(["--student=m"])
    r = {"machine": "m", "crop": 128, "settings": "export-engine distil --size 128 --steps 3000",
         "defaults": {"teacher_steps": 1000}, "title": "Real-photo accuracy, 3000 steps", "categories": {}}
    text = render(r)
    assert text.startswith("# Real-photo accuracy, 3000 steps\n")
    assert "--steps 3000`; other options at their defaults then: `--teacher-steps 1000`" in text
    assert "defaults then" not in render({**r, "defaults": {}})


def test_teacher_steps_bench_trains_scores_and_reuses(tmp_path, monkeypatch):
    """``linecam bench teacher-steps`` end to end at toy size: one fit per (seed, steps, category),
    scored on that seed's own test set; a re-run reuses the bundles (no fit time), bad lists fail."""
    pytest.importorskip("torch")
    from linecam.bench import teacher_steps as ts

    monkeypatch.setattr(ts, "RESULTS", tmp_path / "results")
    json_out, md_out = tmp_path / "results" / "t.json", tmp_path / "results" / "t.md"
    args = ["--out", str(tmp_path / "w"), "--steps", "3", "--seeds", "0,1", "--categories", "brick", "--size", "64",
            "--threads", "1", "--results", "t"]
    ts.main(args)
    r = json.loads(json_out.read_text())
    assert [(row["seed"], row["encoder"], row["steps"]) for row in r["rows"]] == [(0, "none", 3), (1, "none", 3)]
    a, b = (row["per_category"]["brick"] for row in r["rows"])
    assert a["fit_seconds"] > 0 and 0 <= a["overall"]["image_auroc"] <= 1
    assert a["overall"] != b["overall"]  # the two seeds' test sets differ: a seed that changed nothing fails
    assert (tmp_path / "w" / "data-seed1" / "brick" / "defects.json").is_file()
    assert "| 1 | none | 3 | " in md_out.read_text()
    ts.main(args)
    again = json.loads(json_out.read_text())["rows"][0]["per_category"]["brick"]
    assert again["fit_seconds"] is None and again["overall"] == a["overall"]
    for bad in (["--steps", "0"], ["--seeds", "x"], ["--categories", "wood"], ["--encoders", "resnet18"],
                ["--results", "../x"]):
        with pytest.raises(SystemExit):
            ts.main(args + bad)
    # --encoders: the from-scratch bundles are reused, the encoder's are new fits of that encoder.
    ts.main(args[:-1] + ["e", "--seeds", "0", "--encoders", "none,efficientnet-lite0"])
    r = json.loads((tmp_path / "results" / "e.json").read_text())
    none, enc = (row["per_category"]["brick"] for row in r["rows"])
    assert [row["encoder"] for row in r["rows"]] == ["none", "efficientnet-lite0"]
    assert none["fit_seconds"] is None and enc["fit_seconds"] > 0
    manifest = json.loads((tmp_path / "w" / "seed0-brick-3-efficientnet-lite0" / "manifest.json").read_text())
    assert manifest["extra"]["encoder"] == "efficientnet-lite0"
    assert r["title"] == "encoder and training steps" and "| 0 | efficientnet-lite0 | 3 | " in \
        (tmp_path / "results" / "e.md").read_text()
    # --encoder-lr-scales: the frozen encoder's bundle is reused, the fine-tuned one is a new fit.
    ts.main(args[:-1] + ["f", "--seeds", "0", "--encoders", "efficientnet-lite0", "--encoder-lr-scales", "0,0.1"])
    r = json.loads((tmp_path / "results" / "f.json").read_text())
    assert [(row["encoder"], row["encoder_lr_scale"]) for row in r["rows"]] == [
        ("efficientnet-lite0", 0.0), ("efficientnet-lite0", 0.1)]
    frozen, tuned = (row["per_category"]["brick"] for row in r["rows"])
    assert frozen["fit_seconds"] is None and tuned["fit_seconds"] > 0
    manifest = json.loads((tmp_path / "w" / "seed0-brick-3-efficientnet-lite0-ft0.1" / "manifest.json").read_text())
    assert manifest["provenance"]["details"]["encoder_lr_scale"] == 0.1
    assert "| 0 | efficientnet-lite0 (fine-tuned, 0.1x lr) | 3 | " in (tmp_path / "results" / "f.md").read_text()
    with pytest.raises(SystemExit):
        ts.main(args + ["--encoder-lr-scales", "-1"])


def test_real_photo_combined_teacher_has_its_rows_and_a_partial_run_keeps_the_others(tmp_path, monkeypatch):
    """``--teachers combined --keep-previous``: the cnn/scratch rows stay (marked), combined is new."""
    from linecam.bench import real_photo

    m = {"overall": {"image_auroc": 0.9, "pixel_auroc": 0.8, "aupro": 0.7}, "per_kind": {}, "by_strength": {"soft": 0.5, "strong": 0.6}}
    prev = {"started": "2026-01-01T00:00:00Z", "data_version": 2, "categories": {"a": {
        t: {"eval": {"fp32": m, "int8": m}, "distil": {"gate_passed": True}} for t in ("cnn", "scratch", "combined")}}}
    monkeypatch.setattr(real_photo, "RESULTS", tmp_path)
    real_photo.outputs(0)[0].write_text(json.dumps(prev))
    results = {"categories": {"a": {}}}
    real_photo._keep_previous(results)
    assert set(results["categories"]["a"]) == {"cnn", "scratch", "combined"}
    results["categories"]["a"]["combined"] = {"eval": {"fp32": m, "int8": m},
                                              "distil": {"gate_passed": True, "seconds": 12.0, "gate": {"onnx_int8": {
                                                  "auroc_drop": 0.68, "auroc_drop_ci95": [-0.81, 2.17]}}}}
    results["categories"]["a"]["cnn"]["distil"].update(seconds=9.0, uncached={"seconds": 345.0})
    results["categories"]["a"]["patchcore"] = m
    text = real_photo.render(results)
    # A distil over a cached work dir has no first-run time; its re-run's seconds are not passed off as one.
    assert any(ln.startswith("| a | combined | – (cached re-run: 12) |") for ln in text.splitlines()), text
    # The gate's drop is shown with its interval, so a reader sees how much of it is the small set.
    assert any(ln.startswith("| a | combined |") and "| +0.68 (-0.81 to +2.17) |" in ln for ln in text.splitlines()), text
    assert any(ln.startswith("| a | cnn (previous run") and "| 345 |" in ln for ln in text.splitlines()), text
    combined = [ln for ln in text.splitlines() if ln.startswith("| combined teacher (cnn + scratch) -> student INT8")]
    assert combined and "previous run" not in combined[0] and combined[0].endswith("| 0.900 | 0.800 |")
    assert any(ln.startswith("| cnn teacher -> student INT8 (previous run 2026-01-01T00:00:00Z") for ln in text.splitlines())
    assert any(ln.startswith("| a | combined | ") for ln in text.splitlines())  # its distil row
    with pytest.raises(SystemExit):
        real_photo.main(["--teachers", "cnn,patchcore2"])


def test_readme_reproduce_line_drops_the_measuring_machines_folders():
    from linecam.bench.report import reproducible
    cmd = "linecam bench --demo-cache /tmp/a/demo --workdir /tmp/w --out=/tmp/r --workers 2 --mode model"
    assert reproducible(cmd) == "linecam bench --workers 2 --mode model"


def test_real_photo_seeds_summary_lists_each_seed_and_refuses_other_settings(tmp_path, monkeypatch):
    """``--seeds-summary``: each data seed's value per category in seed order, then the mean; rows
    missing from a seed are left out; a seed measured with other settings is refused."""
    from linecam.bench import real_photo, real_photo_seeds

    monkeypatch.setattr(real_photo, "RESULTS", tmp_path)

    def m(img: float) -> dict:
        return {"overall": {"image_auroc": img, "pixel_auroc": img - 0.1, "aupro": 0.5}}

    def run(seed: int, imgs: tuple[float, float], *, settings: str = "s", cnn: bool = True) -> None:
        cats = {}
        for c, img in zip(("a", "b"), imgs):
            cats[c] = {"patchcore": m(0.5), "scratch": {"eval": {"int8": m(img), "fp32": m(img)}, "distil": {}}}
            if cnn:
                cats[c]["cnn"] = {"eval": {"int8": m(img), "fp32": m(img)}, "distil": {}}
        real_photo.outputs(seed)[0].write_text(json.dumps(
            {"data_seed": seed, "settings": settings, "defaults": {}, "data_version": 2, "crop": 128, "categories": cats}))

    run(0, (0.9, 0.8))
    run(2, (0.7, 0.6), cnn=False)
    assert real_photo.outputs(2)[0].name == "real_photo_accuracy_seed2.json"
    text = real_photo_seeds.write(tmp_path)
    s = json.loads((tmp_path / "real_photo_seeds.json").read_text())
    assert s["data_seeds"] == [0, 2]
    labels = [r["label"] for r in s["rows"]]
    assert "scratch teacher -> student INT8" in labels and not any(lb.startswith("cnn") for lb in labels)
    row = next(r for r in s["rows"] if r["label"] == "scratch teacher -> student INT8")
    assert row["per_category"]["a"]["image_auroc"] == [0.9, 0.7]
    assert row["category_mean"]["image_auroc"] == pytest.approx([0.85, 0.65])
    assert row["mean"]["image_auroc"] == pytest.approx(0.75)
    assert "| scratch teacher -> student INT8 | 0.900 / 0.700 (**0.800**) | 0.800 / 0.600 (**0.700**) | " \
           "0.850 / 0.650 (**0.750**) |" in text
    run(1, (0.9, 0.9), settings="other")
    with pytest.raises(SystemExit, match="data seed 1 was measured with settings 'other'"):
        real_photo_seeds.write(tmp_path)
    with pytest.raises(SystemExit):
        real_photo.main(["--data-seed", "-1"])
