"""The engine benchmark's headline (targets met or not) and its Markdown table."""

from __future__ import annotations

from typing import Any



from linecam.runtime.device import DeviceFacts

#: Row order: GPU backends first, then what a CPU-only machine runs.
BACKENDS: tuple[str, ...] = ("tensorrt", "onnxruntime-cuda", "torch-cuda", "onnxruntime", "torch-cpu")
GPU_BACKENDS: tuple[str, ...] = ("tensorrt", "onnxruntime-cuda", "torch-cuda")
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")
LABELS = {"tensorrt": "TensorRT", "onnxruntime-cuda": "ONNX Runtime CUDA", "torch-cuda": "torch eager (CUDA)",
          "onnxruntime": "ONNX Runtime CPU", "torch-cpu": "torch eager (CPU)"}
#: Issue 4's target: student FP16 p99 on TensorRT, at 256x256, on an H100-class GPU.
TARGET_P99_MS = 1.0
TARGET_SIZE = 256
H100_CLASS = ("H100", "H200", "GH200", "H800", "B100", "B200", "GB200")
#: Why a row can never exist (as opposed to a backend missing on this machine).
NOT_APPLICABLE = {
    ("torch-cuda", "int8"): "torch eager has no INT8 path for this model: the INT8 model is a Q/DQ ONNX, which "
                            "only ONNX Runtime and TensorRT run",
    ("torch-cpu", "int8"): "torch eager has no INT8 path for this model: the INT8 model is a Q/DQ ONNX, which "
                           "only ONNX Runtime and TensorRT run",
}
#: Rows left out by choice (recorded as skipped, with the reason).
NOT_TIMED = {
    ("torch-cpu", "fp16"): "not timed: torch FP16 is timed on CUDA only (half-precision convolutions on the CPU "
                           "are not a deployment path; ONNX Runtime CPU FP16 is the CPU's FP16 row)",
}



# --------------------------------------------------------------------------- headline


def _row(rows: list[dict], backend: str, precision: str) -> dict:
    return next(r for r in rows if r["backend"] == backend and r["precision"] == precision)


def _why_not(r: dict) -> str:
    return f"{r['status']}: {r['reason']}" if r["reason"] else r["status"]


def headline(rows: list[dict], facts: DeviceFacts, size: int) -> dict[str, Any]:
    """FP16 p99 on TensorRT vs the 1 ms target, INT8 vs FP16 on TensorRT, and ORT CPU INT8 vs FP32."""
    fp16, int8 = _row(rows, "tensorrt", "fp16"), _row(rows, "tensorrt", "int8")
    caveats = []
    if size != TARGET_SIZE:
        caveats.append(f"input is {size}x{size}, the target is for {TARGET_SIZE}x{TARGET_SIZE}")
    if facts.gpu is not None and not any(k in facts.gpu.upper() for k in H100_CLASS):
        caveats.append(f"measured on {facts.gpu}, the target is for an H100-class GPU")
    if fp16["status"] == "measured":
        p99 = fp16["ms"]["p99"]
        target = {"status": "met" if p99 <= TARGET_P99_MS else "not met", "p99_ms": p99,
                  "line": f"TensorRT FP16 p99 {p99:.3f} ms vs the {TARGET_P99_MS:g} ms target: "
                          + ("met" if p99 <= TARGET_P99_MS else f"not met (+{p99 - TARGET_P99_MS:.3f} ms)")}
    else:
        why = "no GPU" if facts.gpu is None else _why_not(fp16)
        target = {"status": "not measured", "p99_ms": None,
                  "line": f"TensorRT FP16 p99 vs the {TARGET_P99_MS:g} ms target: not measured ({why})"}
    target["caveats"] = caveats
    if fp16["status"] == "measured" and int8["status"] == "measured":
        r50 = int8["ms"]["p50"] / fp16["ms"]["p50"]
        r99 = int8["ms"]["p99"] / fp16["ms"]["p99"]
        slower = r50 > 1.0
        int8_line = (f"TensorRT INT8 / FP16 = {r50:.2f}x at p50 ({r99:.2f}x at p99): "
                     + (f"INT8 is SLOWER than FP16 ({(r50 - 1) * 100:.0f} % at p50): FP16 stays the default"
                        if slower else "INT8 is no slower than FP16"))
        int8_vs = {"status": "int8 slower" if slower else "int8 no slower", "ratio_p50": r50, "ratio_p99": r99,
                   "line": int8_line}
    else:
        missing = fp16 if fp16["status"] != "measured" else int8
        why = "no GPU" if facts.gpu is None else f"{missing['precision'].upper()} {_why_not(missing)}"
        int8_vs = {"status": "not measured", "ratio_p50": None, "ratio_p99": None,
                   "line": f"TensorRT INT8 vs FP16: not measured ({why})"}
    cpu32, cpu8 = _row(rows, "onnxruntime", "fp32"), _row(rows, "onnxruntime", "int8")
    if cpu32["status"] == "measured" and cpu8["status"] == "measured":
        r = cpu32["ms"]["p50"] / cpu8["ms"]["p50"]
        cpu = {"fp32_over_int8_p50": r, "line": f"ONNX Runtime CPU: FP32 p50 {cpu32['ms']['p50']:.3f} ms, INT8 p50 "
                                                 f"{cpu8['ms']['p50']:.3f} ms (INT8 {r:.2f}x as fast)"}
    else:
        cpu = {"fp32_over_int8_p50": None, "line": "ONNX Runtime CPU FP32 vs INT8: not measured"}
    return {"fp16_p99_target": target, "int8_vs_fp16": int8_vs, "cpu": cpu}


# --------------------------------------------------------------------------- report


def _f(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"


def table(r: dict) -> str:
    d, v, t = r["device"], r["versions"], r["timing"]
    ver = ", ".join(f"{k} {v[k]}" for k in ("tensorrt", "onnxruntime", "torch") if v.get(k)) or "?"
    cuda = f"; CUDA runtime {v['cuda_runtime']}, driver {v['nvidia_driver']}" if v.get("cuda_runtime") else ""
    lines = [f"# Region expert engines: student `{r['model'].get('student') or '?'}` on {d['name']}", "",
             f"Measured {r['date']} on **{d['name']}**, CPU {r['cpu']['model']} ({r['cpu']['cores']} cores, "
             f"{t['threads']} thread(s) for the CPU backends); {ver}{cuda}. Input "
             f"{'x'.join(str(s) for s in r['input'])} float32, batch 1, one stream; model: {r['model']['source']}"
             + (f" `{r['model']['bundle']}`" if r["model"].get("bundle") else "") + ". "
             f"Host to host per call (`runner.run(x)`: copy-in, inference, copy-out, sync), {t['warmup_s']:g} s "
             f"warm-up, then {t['calls']} calls per row" + (", TensorRT with CUDA graphs" if t["cuda_graph"] else "")
             + (" (**--quick: checks the machinery, not a measurement to quote**)" if r["quick"] else "") + ".", "",
             f"Command: `{r['command']}`", "", "## Headline", ""]
    h = r["headline"]
    lines += [f"* {h['fp16_p99_target']['line']}" + "".join(f" ({c})" for c in h["fp16_p99_target"]["caveats"]),
              f"* {h['int8_vs_fp16']['line']}", f"* {h['cpu']['line']}", "",
              "## ms / frame", "",
              "| backend | precision | runs on | p50 | p90 | p99 | max | calls | model / why not measured |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in r["rows"]:
        ms = row["ms"] or {}
        if row["status"] == "measured":
            note = f"`{row['model']}`"
            eng = row.get("engine")
            if eng and eng.get("built_here"):
                note += f", engine built here in {eng['build_seconds']} s"
        else:
            note = f"{row['status']}: {row['reason']}"
        lines.append(f"| {LABELS[row['backend']]} | {row['precision'].upper()} | {row['runs_on']} "
                     f"| {_f(ms.get('p50'))} | {_f(ms.get('p90'))} | {_f(ms.get('p99'))} | {_f(ms.get('max'))} "
                     f"| {ms.get('n') or '—'} | {note} |")
    lines += ["", "Percentiles: numpy's linear method over every timed call "
                  "(`linecam.runtime.stats.percentile_summary`). Skipped: the backend cannot run on this machine, or "
                  "was left out (the note says which); not applicable: the row cannot exist; failed: tried, and "
                  "the error is shown. No number here was estimated."]
    return "\n".join(lines) + "\n"
