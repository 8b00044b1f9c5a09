"""Region expert engines: the distilled student's ms/frame on TensorRT, ONNX Runtime CUDA, torch eager and the CPU.

One run on one machine, single stream, batch 1, a ``1x3xHxW`` input (256x256 by default); for
every backend and precision (issue 4):

* **tensorrt** FP32 / FP16 / INT8: engines built, verified against ONNX Runtime and registered by
  :func:`linecam.export.trt.build_bundle_engine` (what ``export-engine trt`` runs; an engine the
  bundle already holds for this device is used as it is), run by the daemon's runner,
  ``make_runner(bundle, "tensorrt", precision)`` (``--cuda-graph``: with CUDA-graph replay);
* **onnxruntime-cuda** FP32 / FP16 / INT8: the bundle's ONNX files on ONNX Runtime's CUDA provider,
  ``make_runner(bundle, "onnxruntime-cuda", precision)``;
* **torch-cuda** FP32 / FP16 (``.half()``): the :class:`~linecam.export.student.Student` module in
  eager mode, ``torch.cuda.synchronize()`` after each call; no INT8 row: the INT8 model is a Q/DQ
  ONNX, which only ONNX Runtime and TensorRT run (torch eager has no INT8 path for it);
* **onnxruntime** (CPU) FP32 / FP16 / INT8 (``make_runner(bundle, "onnxruntime", ...)``, the
  daemon's default backend; FP16 runs there with casts around the ops ORT CPU has no FP16 kernel
  for) and **torch-cpu** FP32.

A call is timed host to host, as the daemon's worker sees it: a preprocessed float32 array in,
``runner.run(x)`` (copy-in, inference, copy-out, synchronisation), the anomaly map and score back in
host memory. Warm-up for ``--warmup-s`` seconds, then ``--calls`` timed calls;
p50/p90/p99/max by :func:`linecam.runtime.stats.percentile_summary`. A backend that cannot run on
this machine (no GPU, no TensorRT, no onnxruntime-gpu ...) is recorded as skipped with the reason,
one that fails as failed with its error: no number is ever estimated.

The model: a random-weight student (speed does not depend on weight values) written as a distilled
bundle (FP32 ONNX by ``export_onnx``, FP16 by ``quantize.to_fp16``, symmetric Q/DQ INT8 by
``quantize.to_int8`` calibrated on synthetic images), or ``--bundle DIR``, a bundle from
``export-engine distil``, copied to a temporary folder first (engines are built into the copy; the
bundle itself is not changed; the torch rows then time a random-weight student of its size).

Targets: student FP16 p99 <= 1 ms at 256x256 on an H100-class GPU (TensorRT); INT8 no slower than
FP16 on TensorRT (else FP16 stays the default, and the results say so).

    python benchmarks/engine_bench.py                 # -> benchmarks/results/engines-<gpu, or cpu>.{json,md}
    python benchmarks/engine_bench.py --bundle B      # an existing distilled bundle
    python benchmarks/engine_bench.py --quick         # a few calls per row: checks the machinery
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from linecam.errors import BundleError, LinecamError  # noqa: E402
from linecam.runtime.device import DeviceFacts, first_line, probe_device  # noqa: E402
from linecam.runtime.stats import percentile_summary  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
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


class BenchError(LinecamError):
    """Bad command-line input: printed as one ``error:`` line, exit status 2."""

    exit_code = 2


# --------------------------------------------------------------------------- machine


def torch_info() -> dict[str, Any]:
    """torch's version and whether it can use a CUDA device (never raises)."""
    try:
        import torch
    except Exception as e:  # ImportError, or a broken install
        return {"version": None, "cuda": None, "cuda_available": False, "error": first_line(e)}
    cuda = getattr(torch.version, "cuda", None)
    try:
        available = bool(torch.cuda.is_available())
    except Exception:  # a CUDA build on a machine whose driver is broken
        available = False
    return {"version": torch.__version__, "cuda": cuda, "cuda_available": available, "error": None}


def gpu_blockers(facts: DeviceFacts, torch: dict[str, Any]) -> dict[str, str | None]:
    """Backend -> why it cannot run on this machine (one line; every missing piece, ``; ``-joined),
    or None when nothing is missing. Pure: decided from the probed facts, tested without a GPU."""
    no_gpu = f"no CUDA device ({facts.gpu_error or 'none found'})" if facts.gpu is None else None
    trt: list[str] = []
    if facts.tensorrt is None:
        trt.append(f"tensorrt not installed ({facts.tensorrt_error or 'No module named tensorrt'})")
    if no_gpu:
        trt.append(no_gpu)
    if not (facts.cuda_python or torch.get("cuda_available")):
        trt.append(f"no cuda-python for device buffers ({facts.cuda_python_error or 'not installed'})")
    ort_cuda: list[str] = []
    if "CUDAExecutionProvider" not in facts.ort_providers:
        ort_cuda.append("onnxruntime has no CUDAExecutionProvider (onnxruntime-gpu not installed)")
    if no_gpu:
        ort_cuda.append(no_gpu)
    tc: list[str] = []
    if torch.get("version") is None:
        tc.append(f"torch not installed ({torch.get('error') or 'No module named torch'})")
    elif not torch.get("cuda_available"):
        tc.append(f"torch {torch['version']} has no CUDA" if not torch.get("cuda") else
                  f"torch {torch['version']} (CUDA {torch['cuda']}) sees no CUDA device")
        if no_gpu:
            tc.append(no_gpu)
    tcpu = [f"torch not installed ({torch.get('error') or 'No module named torch'})"] if torch.get("version") is None \
        else []
    return {"tensorrt": "; ".join(trt) or None, "onnxruntime-cuda": "; ".join(ort_cuda) or None,
            "torch-cuda": "; ".join(tc) or None, "onnxruntime": None, "torch-cpu": "; ".join(tcpu) or None}


def device_slug(facts: DeviceFacts) -> str:
    """``h100-80gb-hbm3`` from "NVIDIA H100 80GB HBM3"; ``cpu`` without a GPU."""
    from linecam.export.trt_plan import slug

    return "cpu" if facts.gpu is None else slug(facts.gpu, 40)


def versions(facts: DeviceFacts, torch: dict[str, Any], libs: dict[str, str | None]) -> dict[str, Any]:
    import onnxruntime as ort

    from linecam import __version__

    return {"linecam": __version__, "tensorrt": facts.tensorrt, "onnxruntime": ort.__version__,
            "onnxruntime_package": "onnxruntime-gpu" if libs.get("onnxruntime-gpu") else "onnxruntime",
            "onnxruntime_providers": list(facts.ort_providers), "torch": torch.get("version"),
            "torch_cuda": torch.get("cuda"), "cuda_runtime": facts.cuda_runtime, "cuda_driver": facts.cuda_driver,
            "nvidia_driver": facts.driver, "cuda_python": facts.cuda_python, "numpy": np.__version__,
            "python": sys.version.split()[0]}


# --------------------------------------------------------------------------- the model


def synthetic_images(folder: Path, n: int, size: int, seed: int = 0) -> Path:
    """``n`` smooth random RGB textures, every other one with a dark blob (scores differ)."""
    import cv2

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        low = rng.uniform(90, 200, (max(2, size // 16), max(2, size // 16), 3)).astype(np.float32)
        img = cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC)
        img += rng.normal(0, 6, img.shape).astype(np.float32)
        if i % 2:
            r = int(rng.integers(size // 16 + 1, size // 6 + 2))
            cy, cx = (int(v) for v in rng.integers(r, size - r, 2))
            cv2.circle(img, (cx, cy), r, (20.0, 20.0, 20.0), -1)
        cv2.imwrite(str(folder / f"synthetic_{i:03d}.png"), np.clip(img, 0, 255).astype(np.uint8))
    return folder


def random_student_bundle(root: Path, size: int, student: str, *, n_images: int, seed: int = 0,
                          log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write a distilled-student bundle with random weights at ``root``: FP32, FP16 and INT8 ONNX,
    as ``export-engine distil`` names and registers them; verification / calibration images in
    ``root.parent / "images"``. Returns what it made (for the results)."""
    import torch

    from linecam.bundle import Thresholds, file_entry, new_provenance, write_manifest
    from linecam.bench.machine import library_versions
    from linecam.export import quantize
    from linecam.export.distil import FP16_FILE, FP32_FILE, INT8_FILE, student_manifest
    from linecam.export.gate import run_expert
    from linecam.export.onnx_export import export_onnx
    from linecam.export.student import Student
    from linecam.preprocess import PreprocessSpec, Preprocessor, read_image

    spec = PreprocessSpec(input_size=(size, size))
    images = synthetic_images(root.parent / "images", n_images, size, seed)
    pre = Preprocessor(spec)
    x = np.concatenate([pre(*read_image(p), copy=True) for p in sorted(images.glob("*.png"))])
    torch.manual_seed(seed)
    model = Student(student).eval()
    with torch.no_grad():
        # Activations of O(1) through the depth, as in a trained network (torch's default init shrinks
        # them layer by layer), and the head centred on these images: else ReLU clamps the map to zeros.
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        model.head.bias -= model.raw(torch.from_numpy(x)).median()
    log(f"random-weight student '{student}' at {size}x{size}: exporting FP32, FP16 and INT8 ONNX")
    root.mkdir(parents=True, exist_ok=True)
    fp32 = export_onnx(model, root / FP32_FILE, (size, size), seed=seed)
    quantize.to_fp16(fp32, root / FP16_FILE)
    q = quantize.to_int8(fp32, root / INT8_FILE, quantize.calibration_batch(x, spec))
    # Thresholds from the FP32 model on the synthetic images: TensorRT's verification measures
    # its tolerances against them (a random model has no meaningful ones of its own).
    maps, scores = run_expert(fp32, x, threads=1)
    pixel = float(np.quantile(maps, 0.99))
    thresholds = Thresholds(image=float(np.median(scores)) or 1.0, pixel=pixel if pixel > 0 else 1.0,
                            method="manual", details={"note": "random-weight benchmark model: median score and "
                                                              "99th-percentile pixel of the FP32 model on the "
                                                              "synthetic images"})
    files = {"onnx_fp32": file_entry(root, FP32_FILE), "onnx_fp16": file_entry(root, FP16_FILE, precision="fp16"),
             "onnx_int8": file_entry(root, INT8_FILE, precision="int8")}
    manifest = student_manifest(
        f"engine-bench-student-{student}-{size}", spec, student, model.score_pool, thresholds, files,
        new_provenance(tool_versions={k: v for k, v in library_versions().items() if v},
                       details={"purpose": "benchmarks/engine_bench.py: random weights, speed only",
                                "images": str(images.resolve()),
                                "holdout_files": sorted(p.name for p in images.glob("*.png"))}),
        random_weights=True)
    write_manifest(root, manifest)
    return {"source": "random-weight student", "student": student, "bundle": None, "images": str(images),
            "int8": {k: v for k, v in q.to_dict().items() if k != "path"}}


def open_bundle(path: Path, work: Path, size: int | None, log: Callable[[str], None] = print) -> tuple[Any, dict]:
    """Copy ``path`` to ``work`` and load it; an FP16 ONNX missing from it is cast from FP32 in the
    copy (as ``export-engine trt`` does). Raises one-line errors for anything unusable."""
    from linecam.bundle import file_entry, load_bundle, write_manifest

    src = load_bundle(path)  # the bundle's own one-line errors: missing manifest, bad hash ...
    files = src.manifest.files
    if not any(e.backend == "onnxruntime" and e.precision == "fp32" for e in files.values()):
        have = ", ".join(f"{r} ({e.backend}/{e.precision})" for r, e in files.items()) or "none"
        raise BundleError(f"bundle {path} has no FP32 ONNX model (it has: {have}): the benchmark needs the "
                          f"bundle's FP32 ONNX (re-export it with export-engine distil)")
    shape = src.manifest.input.shape
    if len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in shape[2:]):
        raise BundleError(f"bundle {path} declares input shape {shape}: the benchmark needs a fixed [1, 3, H, W]")
    if size is not None and tuple(shape[2:]) != (size, size):
        raise BenchError(f"--size {size} does not match the bundle's input {shape[2]}x{shape[3]}: drop --size "
                         f"with --bundle")
    dst = work / "bundle"
    shutil.copytree(path, dst, symlinks=False)
    bundle = load_bundle(dst)
    info: dict[str, Any] = {"source": "bundle", "bundle": str(Path(path).resolve()),
                            "student": bundle.manifest.extra.get("student_size"), "fp16_derived": False}
    if not any(e.backend == "onnxruntime" and e.precision == "fp16" for e in bundle.manifest.files.values()):
        from linecam.export.quantize import to_fp16

        fp32 = bundle.path(bundle.pick("onnxruntime", "fp32"))
        log("the bundle has no FP16 ONNX: casting its FP32 model to FP16 in the copy (inputs/outputs stay FP32)")
        to_fp16(fp32, dst / "model_fp16.onnx")
        new = dict(bundle.manifest.files)
        new["onnx_fp16"] = file_entry(dst, "model_fp16.onnx", precision="fp16")
        write_manifest(dst, bundle.manifest.model_copy(update={"files": new}))
        bundle = load_bundle(dst)
        info["fp16_derived"] = True
    return bundle, info


# --------------------------------------------------------------------------- timing


def time_calls(fn: Callable[[], Any], warmup_s: float, calls: int, min_warmup: int = 3) -> tuple[np.ndarray, int]:
    """Warm up for ``warmup_s`` seconds (at least ``min_warmup`` calls), then time ``calls`` calls (ms each)."""
    n, end = 0, time.perf_counter() + warmup_s
    while n < min_warmup or time.perf_counter() < end:
        fn()
        n += 1
    ms = np.empty(calls, np.float64)
    for i in range(calls):
        t0 = time.perf_counter_ns()
        fn()
        ms[i] = (time.perf_counter_ns() - t0) / 1e6
    return ms, n


def _engine_role(bundle: Any, precision: str, facts: DeviceFacts) -> str | None:
    """The bundle's TensorRT engine of ``precision`` built for this device, if any (the
    daemon's own pick, :func:`linecam.runtime.backends.select._pick_engine`)."""
    from linecam.runtime.backends.select import _pick_engine

    return _pick_engine(bundle, precision, facts)[0]


def trt_engine(bundle: Any, precision: str, facts: DeviceFacts, args: argparse.Namespace, images: Path | None,
               log: Callable[[str], None]) -> tuple[Any, dict[str, Any]]:
    """(bundle reloaded, engine facts): the engine of ``precision`` for this device, built if missing."""
    from linecam.bundle import load_bundle
    from linecam.export.trt import TrtBuildOptions, build_bundle_engine

    role = _engine_role(bundle, precision, facts)
    if role is not None:
        log(f"using the bundle's {precision} engine '{role}'")
        return bundle, {"role": role, "built_here": False}
    opts = TrtBuildOptions(precision=precision, opt_level=args.opt_level, images=images)  # type: ignore[arg-type]
    res = build_bundle_engine(bundle.root, opts, facts=facts, echo=lambda s: log(f"  trt: {s}"))
    info = {"role": res.role, "built_here": True, "build_seconds": round(res.seconds, 1),
            "engine_mb": round(res.engine.stat().st_size / 1e6, 2), "opt_level": args.opt_level,
            "verification": res.verification.summary() if res.verification is not None else None}
    return load_bundle(bundle.root), info


def torch_call(size_name: str, score_pool: int, x: np.ndarray, device: str, half: bool,
               threads: int) -> Callable[[], Any]:
    """The Student module (random weights) in eager mode: numpy in, map and score back in numpy."""
    import torch

    from linecam.export.student import Student

    torch.manual_seed(0)
    dev = torch.device(device)
    dtype = torch.float16 if half else torch.float32
    model = Student(size_name, score_pool=score_pool).eval().to(dev, dtype)
    if dev.type == "cpu":
        torch.set_num_threads(threads)
    else:
        torch.backends.cudnn.benchmark = True  # autotuned kernels, as TensorRT's builder picks its own

    def call() -> tuple[np.ndarray, float]:
        with torch.inference_mode():
            t = torch.from_numpy(x).to(dev, dtype)
            amap, score = model(t)
            out = amap[0, 0].float().cpu().numpy(), float(score[0])
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return out

    return call


def measure_row(backend: str, precision: str, ctx: dict[str, Any], args: argparse.Namespace,
                log: Callable[[str], None]) -> dict[str, Any]:
    """One (backend, precision) row: measured, skipped (cannot run here) or failed (tried, raised)."""
    from linecam.runtime.backends import make_runner

    row: dict[str, Any] = {"backend": backend, "precision": precision,
                           "runs_on": "GPU" if backend in GPU_BACKENDS else "CPU", "status": None, "reason": None,
                           "ms": None, "warmup_calls": None, "model": None}
    if (backend, precision) in NOT_APPLICABLE:
        return {**row, "status": "not applicable", "reason": NOT_APPLICABLE[(backend, precision)]}
    if (backend, precision) in NOT_TIMED:
        return {**row, "status": "skipped", "reason": NOT_TIMED[(backend, precision)]}
    if backend not in ctx["selected"]:
        return {**row, "status": "skipped", "reason": f"not selected (--backends {args.backends})"}
    blocker = ctx["blockers"][backend]
    if blocker:
        return {**row, "status": "skipped", "reason": blocker}
    if backend.startswith("torch") and ctx["student"] is None:
        return {**row, "status": "skipped", "reason": "the bundle is not a distilled student (manifest extra."
                                                      "student_size missing): torch eager needs its architecture"}
    if backend in ("onnxruntime", "onnxruntime-cuda", "tensorrt") and not any(
            e.backend == "onnxruntime" and e.precision == precision for e in ctx["bundle"].manifest.files.values()):
        return {**row, "status": "skipped", "reason": f"the bundle has no {precision} ONNX model"}
    runner = None
    try:
        if backend == "tensorrt":
            ctx["bundle"], row["engine"] = trt_engine(ctx["bundle"], precision, ctx["facts"], args, ctx["images"],
                                                      log)
        if backend.startswith("torch"):
            fn = torch_call(ctx["student"], ctx["score_pool"], ctx["x"], "cuda" if backend == "torch-cuda" else "cpu",
                            precision == "fp16", args.threads)
            row["model"] = f"Student('{ctx['student']}') eager, random weights" + (", .half()" if precision == "fp16"
                                                                                   else "")
        else:
            runner = make_runner(ctx["bundle"], backend, precision, intra_op_threads=args.threads, workers=1,
                                 cuda_graph=args.cuda_graph, facts=ctx["facts"])
            row["model"] = runner.role
            fn = (lambda r=runner, x=ctx["x"]: r.run(x))
        log(f"timing {LABELS[backend]} {precision.upper()} ({row['model']}): {args.warmup_s:g} s warm-up, "
            f"{args.calls} calls")
        ms, warm = time_calls(fn, args.warmup_s, args.calls)
    except Exception as e:  # anything a backend raises on this machine is recorded, never hidden
        log(f"  {LABELS[backend]} {precision.upper()} failed: {first_line(e)}")
        return {**row, "status": "failed", "reason": f"{type(e).__name__}: {first_line(e)}"}
    finally:
        if runner is not None:
            runner.close()
    summary = percentile_summary(ms, (50, 90, 99))
    log(f"  p50 {summary['p50']:.3f} ms, p99 {summary['p99']:.3f} ms")
    return {**row, "status": "measured", "ms": summary, "warmup_calls": warm}


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


# --------------------------------------------------------------------------- main


def _check_args(args: argparse.Namespace) -> None:
    if args.bundle is not None:
        if not args.bundle.exists():
            raise BundleError(f"--bundle {args.bundle} does not exist: give the folder export-engine distil wrote")
        if not args.bundle.is_dir():
            raise BundleError(f"--bundle {args.bundle} is not a folder: give the bundle folder (with manifest.json)")
    if args.images is not None and not args.images.is_dir():
        raise BenchError(f"--images {args.images} is not a folder of images")
    if args.size is not None and (args.size % 8 or args.size < 32):
        raise BenchError(f"--size {args.size}: the student needs a multiple of 8, at least 32 (e.g. 256)")
    if args.calls < 1 or args.warmup_s < 0 or args.threads < 0:
        raise BenchError("--calls must be >= 1, --warmup-s >= 0 and --threads >= 0")
    unknown = [b for b in args.backends.split(",") if b.strip() and b.strip() not in BACKENDS]
    if unknown or not args.backends.strip(","):
        raise BenchError(f"--backends {args.backends!r}: choose from {', '.join(BACKENDS)}")
    if args.bundle is None and args.student not in ("s", "m", "l"):
        raise BenchError(f"--student {args.student!r}: choose from s, m, l")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=None,
                    help="a distilled student bundle (export-engine distil); default: a random-weight student")
    ap.add_argument("--student", default="s", help="student size of the random-weight model: s, m or l")
    ap.add_argument("--size", type=int, default=None, help=f"input HxW (default {TARGET_SIZE}; --bundle: its own)")
    ap.add_argument("--calls", type=int, default=500, help="timed calls per row")
    ap.add_argument("--warmup-s", type=float, default=2.0, help="warm-up seconds per row before timing")
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads of the CPU backends (ONNX Runtime, torch); 1 is the daemon's default "
                         "per inference worker (model.intra_op_threads)")
    ap.add_argument("--backends", default=",".join(BACKENDS),
                    help="comma list of the backends to time (the others are recorded as not selected)")
    ap.add_argument("--cuda-graph", action="store_true", help="TensorRT replays a CUDA graph (model.cuda_graph)")
    ap.add_argument("--opt-level", type=int, default=3, choices=range(6), metavar="0-5",
                    help="TensorRT builder optimization level for engines built here")
    ap.add_argument("--images", type=Path, default=None,
                    help="verification images for TensorRT builds (default: the bundle's held-out images, or the "
                         "synthetic ones of the random-weight model)")
    ap.add_argument("--quick", action="store_true", help="5 calls per row, 0.1 s warm-up: checks the machinery only")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    raw = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(raw)
    if args.quick:
        args.calls, args.warmup_s = 5, 0.1
    try:
        return _run(args, raw)
    except LinecamError as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return int(getattr(e, "exit_code", 1)) or 1


def _run(args: argparse.Namespace, raw: list[str]) -> int:
    _check_args(args)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    from linecam.bench.machine import machine_info

    machine = machine_info()  # before the run: its load average is the one at the start
    tinfo = torch_info()
    with tempfile.TemporaryDirectory(prefix="linecam-engine-bench-") as tmp:
        work = Path(tmp)
        # Bad input first, so that it is the one line printed.
        if args.bundle is not None:
            bundle, model = open_bundle(args.bundle, work, args.size, log)
            images = args.images
        elif tinfo["version"] is None:
            raise BenchError(f"the random-weight student needs torch ({tinfo['error']}): pip install "
                             f"'linecam[export]', or pass --bundle DIR")
        facts = probe_device()
        blockers = gpu_blockers(facts, tinfo)
        log(f"device: {facts.describe()}")
        for b in GPU_BACKENDS:
            if blockers[b]:
                log(f"{LABELS[b]}: skipped ({blockers[b]})")
        if args.bundle is None:
            from linecam.bundle import load_bundle

            model = random_student_bundle(work / "bundle", args.size or TARGET_SIZE, args.student,
                                          n_images=8 if args.quick else 32, log=log)
            bundle = load_bundle(work / "bundle")
            images = args.images or Path(model["images"])
        h, w = (int(d) for d in bundle.manifest.input.shape[2:])
        x = np.random.default_rng(0).standard_normal((1, 3, h, w)).astype(np.float32)
        model["files"] = {role: {"path": e.path, "backend": e.backend, "precision": e.precision, "sha256": e.sha256}
                          for role, e in bundle.manifest.files.items()}
        extra = bundle.manifest.extra
        ctx = {"facts": facts, "blockers": blockers, "bundle": bundle, "x": x, "images": images,
               "selected": {b.strip() for b in args.backends.split(",") if b.strip()},
               "student": extra.get("student_size") if extra.get("expert", "student") == "student" else None,
               "score_pool": int(extra.get("score_pool", 3))}
        rows = [measure_row(b, p, ctx, args, log) for b in BACKENDS for p in PRECISIONS]
        engines = {role: {"path": e.path, "target": e.target} for role, e in ctx["bundle"].manifest.files.items()
                   if e.backend == "tensorrt"}
    model["engines"] = engines
    slug = device_slug(facts)
    result = {
        "kind": "engine_bench",
        "date": time.strftime("%Y-%m-%d"),
        "quick": args.quick,
        "command": shlex.join(["python", "benchmarks/engine_bench.py", *raw]),
        "device": {"name": facts.gpu or f"CPU only ({machine['cpu_model']})", "slug": slug, "gpu": facts.gpu,
                   "compute_capability": facts.compute_capability, "described": facts.describe(),
                   "facts": asdict(facts)},
        "cpu": {"model": machine["cpu_model"], "cores": machine["cpu_logical"]},
        "machine": machine,
        "versions": versions(facts, tinfo, machine["libraries"]),
        "input": [1, 3, h, w],
        "model": model,
        "timing": {"warmup_s": args.warmup_s, "calls": args.calls, "threads": args.threads, "backends": args.backends,
                   "cuda_graph": args.cuda_graph, "clock": "time.perf_counter_ns around one call",
                   "call": "runner.run(x) from linecam.runtime.backends.make_runner (torch rows: the Student "
                           "module, numpy in and out)"},
        "targets": {"fp16_p99_ms": TARGET_P99_MS, "size": TARGET_SIZE, "device": "H100-class GPU",
                    "int8": "no slower than FP16 on TensorRT"},
        "rows": rows,
        "headline": headline(rows, facts, h),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"engines-{slug}" + ("-quick" if args.quick else "")
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (args.out / f"{stem}.md").write_text(table(result))
    print(table(result))
    log(f"wrote {args.out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
