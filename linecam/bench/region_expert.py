"""Region expert speed: the DINOv2 memory-bank teacher vs the distilled students on ONNX Runtime CPU.

All in one run, interleaved (teacher, student FP32, student INT8, ... round after round) so
that load from other jobs on a shared machine hits every model alike; the ratios are taken
per round and their median reported, next to the median ms/image of each model.

* **teacher**: DINOv2 at ViT-S/14 dimensions (hidden 384, 12 layers, 6 heads, patch 14) with
  random weights (speed does not depend on weight values) in torch on the CPU, 224x224 input
  (16x16 patches), with a coreset memory bank of ``--bank`` features and cosine 1-NN per patch,
  upsampling and blur: what ``export-engine distil --teacher dinov2`` runs per image;
* **students** ``s`` and ``m`` at the same input: the ONNX FP32 graph ``export-engine``
  writes, and its INT8 (symmetric Q/DQ, ``linecam.export.quantize``) on ONNX Runtime CPU with
  the same thread count.

Accuracy at these speeds (the "<= 0.5 point AUROC loss" target) is not measured here but by
the accuracy gate of every export; ``--bundle`` copies a bundle's gate figures into the table.

    linecam bench region-expert               # -> benchmarks/results/region_expert.{json,md}
    linecam bench region-expert --quick       # a few seconds, checks the machinery
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


#: Results folder, relative to where the command runs (the checkout), as for `linecam bench`.
RESULTS = Path("benchmarks/results")


def _ort_session(path: Path, threads: int):
    from linecam.runtime.session import make_session

    return make_session(path, intra_op_threads=threads)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="linecam bench region-expert", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--bank", type=int, default=8192, help="memory-bank features (coreset of good patches)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--students", default="s,m")
    ap.add_argument("--threads", default=f"1,{os.cpu_count() or 1}",
                    help="comma list of thread counts (torch and ONNX Runtime alike); 1 is the daemon's "
                         "default per inference worker (model.intra_op_threads)")
    ap.add_argument("--bundle", type=Path, default=None, help="a distilled bundle whose gate figures to report")
    ap.add_argument("--quick", action="store_true", help="tiny teacher, 3 rounds: checks the machinery only")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    import onnxruntime as ort
    import torch
    from transformers import Dinov2Config, Dinov2Model

    from linecam.bench.machine import cpu_model

    from linecam.export.onnx_export import INPUT_NAME, export_onnx
    from linecam.export.quantize import calibration_batch, to_int8
    from linecam.export.student import Student
    from linecam.export.teachers import Dinov2Teacher
    from linecam.preprocess import PreprocessSpec

    thread_counts = sorted({int(t) for t in str(args.threads).split(",") if t.strip()})
    torch.manual_seed(0)
    size = args.size
    if args.quick:
        cfg = Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                           patch_size=14, image_size=size)
        args.rounds, args.bank, teacher_name = 3, 512, "DINOv2 tiny (quick check)"
    else:
        cfg = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                           patch_size=14, image_size=518)  # facebook/dinov2-small's config
        teacher_name = "DINOv2 ViT-S/14 (random weights)"
    spec = PreprocessSpec(input_size=(size, size))
    teacher = Dinov2Teacher(Dinov2Model(cfg), spec, batch_size=1)
    teacher.bank = torch.nn.functional.normalize(torch.randn(args.bank, cfg.hidden_size), dim=1)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, size, size)).astype(np.float32)
    sizes = [s for s in args.students.split(",") if s]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        calib = calibration_batch(rng.standard_normal((32, 3, size, size)).astype(np.float32), spec)  # one for all
        for s in sizes:
            st = Student(s).eval()
            fp32 = export_onnx(st, Path(tmp) / f"{s}.onnx", (size, size))
            files[s] = (fp32, to_int8(fp32, Path(tmp) / f"{s}_int8.onnx", calib).path)
        for threads in thread_counts:
            torch.set_num_threads(threads)
            models: dict[str, callable] = {"teacher": lambda: teacher.maps(x)}
            for s, (fp32, int8) in files.items():
                for prec, path in (("fp32", fp32), ("int8", int8)):
                    sess = _ort_session(path, threads)
                    models[f"student_{s}_{prec}"] = (lambda sess=sess: sess.run(None, {INPUT_NAME: x}))
            for fn in models.values():  # warm-up: first runs allocate, JIT and tune
                fn()
                fn()
            times: dict[str, list[float]] = {k: [] for k in models}
            for _ in range(args.rounds):
                for name, fn in models.items():
                    reps = 1 if name == "teacher" else 10
                    t0 = time.perf_counter()
                    for _ in range(reps):
                        fn()
                    times[name].append((time.perf_counter() - t0) * 1000 / reps)
            rows = []
            for s in sizes:
                f, q = np.asarray(times[f"student_{s}_fp32"]), np.asarray(times[f"student_{s}_int8"])
                t = np.asarray(times["teacher"])
                rows.append({"student": s, "teacher_over_fp32": float(np.median(t / f)),
                             "teacher_over_int8": float(np.median(t / q)), "fp32_over_int8": float(np.median(f / q))})
            runs.append({"threads": threads, "ms_per_image_median": {k: float(np.median(v)) for k, v in times.items()},
                         "ms_per_image_all": times, "ratios": rows})
    gate = None
    if args.bundle is not None:
        gate = json.loads((args.bundle / "gate.json").read_text())
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": thread_counts,
        "device": "ONNX Runtime and torch on the CPU",
        "quick": args.quick,
        "teacher": teacher_name,
        "input": [size, size],
        "bank": args.bank,
        "rounds": args.rounds,
        "runs": runs,
        "gate": gate,
        "gate_bundle": args.bundle.resolve().name if args.bundle else None,  # a name: paths are machine-local
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "region_expert_quick" if args.quick else "region_expert"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(table(result))
    print(table(result))
    return 0


def table(r: dict) -> str:
    lines = [f"Measured {r['date']} on {r['cpu']} ({r['cores']} cores, {r['device']}), {r['input'][0]}x{r['input'][1]} "
             f"input, torch {r['versions']['torch']}, ONNX Runtime {r['versions']['onnxruntime']}; median of "
             f"{r['rounds']} interleaved rounds (teacher, then each student, round after round); ratios are the "
             f"median of the per-round ratios. Teacher: {r['teacher']} + a {r['bank']}-feature memory bank "
             "(torch, cosine 1-NN, upsample, blur).", ""]
    names = list(r["runs"][0]["ms_per_image_median"])
    lines += ["| model | " + " | ".join(f"ms / image, {run['threads']} thread(s)" for run in r["runs"]) + " |",
              "| --- |" + " --- |" * len(r["runs"])]
    for k in names:
        label = "teacher (DINOv2 + bank)" if k == "teacher" else "student `{}` {} (ONNX Runtime CPU)".format(
            *k.split("_")[1:3]).replace("fp32", "FP32").replace("int8", "INT8")
        lines.append(f"| {label} | " + " | ".join(f"{run['ms_per_image_median'][k]:.2f}" for run in r["runs"]) + " |")
    lines += ["", "| threads | student | teacher ÷ student FP32 | teacher ÷ student INT8 | FP32 ÷ INT8 | "
              "≥ 20× (INT8) | ≥ 2× |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for run in r["runs"]:
        for row in run["ratios"]:
            lines.append(f"| {run['threads']} | `{row['student']}` | {row['teacher_over_fp32']:.1f}× | "
                         f"{row['teacher_over_int8']:.1f}× | {row['fp32_over_int8']:.2f}× | "
                         f"{'yes' if row['teacher_over_int8'] >= 20 else 'no'} | "
                         f"{'yes' if row['fp32_over_int8'] >= 2 else 'no'} |")
    g = r.get("gate")
    if g:
        lines += ["", f"Accuracy gate of `{r.get('gate_bundle')}` (FP32 reference image AUROC "
                      f"{100 * g['reference_auroc']:.2f} on {g['n_images']} held-out images, "
                      f"{g['n_defective']} defective):", "",
                  "| model | AUROC drop (points) | map Pearson | passed |", "| --- | --- | --- | --- |"]
        for name, c in g["candidates"].items():
            lines.append(f"| {name} | {c['auroc_drop']:+.2f} | {c['pearson']:.4f} | "
                         f"{g['verdicts'][name]['passed']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
