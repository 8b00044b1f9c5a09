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

    linecam bench engines                 # -> benchmarks/results/engines-<gpu, or cpu>.{json,md}
    linecam bench engines --bundle B      # an existing distilled bundle
    linecam bench engines --quick         # a few calls per row: checks the machinery
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from linecam.errors import BundleError, LinecamError
from linecam.runtime.device import DeviceFacts, first_line, probe_device
from linecam.runtime.stats import percentile_summary

from .engines_model import BenchError, open_bundle, random_student_bundle
from .engines_report import (BACKENDS, GPU_BACKENDS, LABELS, NOT_APPLICABLE, NOT_TIMED, PRECISIONS, TARGET_P99_MS,
                             TARGET_SIZE, headline, table)

#: Results folder, relative to where the command runs (the checkout), as for `linecam bench`.
RESULTS = Path("benchmarks/results")
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

    from linecam.export.student import make_student

    torch.manual_seed(0)
    dev = torch.device(device)
    dtype = torch.float16 if half else torch.float32
    model = make_student(size_name, score_pool).eval().to(dev, dtype)
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
    if args.bundle is None and args.student not in ("s", "m", "l", "lite0"):
        raise BenchError(f"--student {args.student!r}: choose from s, m, l, lite0")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="linecam bench engines", description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, default=None,
                    help="a distilled student bundle (export-engine distil); default: a random-weight student")
    ap.add_argument("--student", default="s", help="student of the random-weight model: s, m, l or lite0 (ImageNet encoder, random head)")
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
        "command": shlex.join(["linecam", "bench", "engines", *raw]),
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
