"""Text expert speed: the CLIP-based text-prompted expert at FP32 / INT8 and its distilled student.

Interleaved on ONNX Runtime CPU as ``linecam bench region-expert`` does (every model once per
round, the median over rounds), so that other load on a shared machine hits them alike:

* **text expert** at CLIP ViT-B/16 dimensions (vision 768 wide, 12 layers, patch 16, 224 px;
  projection 512) with random weights (speed does not depend on weight values), two window
  scales, a generic abnormal ensemble and two named prompts (three outputs), and a
  ``--bank``-row good-patch memory bank (few-shot): the graph ``export-engine text-expert``
  writes, exported by the same code; INT8 is its Q/DQ from ``linecam.export.quantize``;
* **student** ``s`` at 224 px, FP32 and INT8: what ``export-engine distil --teacher
  text-expert`` puts on the line (its speed does not depend on the teacher).

    linecam bench text-expert              # -> benchmarks/results/text_expert.{json,md}
    linecam bench text-expert --quick      # tiny CLIP, seconds: checks the machinery
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

RESULTS = Path("benchmarks/results")


def _expert(quick: bool, bank: int):
    """A random-weight TextExpert (no folder, no tokenizer: random prompt rows, same graph shape)."""
    import torch
    import torch.nn.functional as F
    from transformers import CLIPConfig, CLIPModel

    from linecam.export.text_expert import ClipFolder, PromptEmbeddings, TextExpert

    if quick:
        vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                      image_size=64, patch_size=8)
        proj, name = 24, "CLIP tiny (quick check)"
    else:
        vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      image_size=224, patch_size=16)
        proj, name = 512, "CLIP ViT-B/16 (random weights)"
    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4)  # unused
    cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=proj)
    cfg._attn_implementation = "eager"  # as load_clip asks for: plain MatMul/Softmax in ONNX
    model = CLIPModel(cfg).eval()
    clip = ClipFolder(model, None, "clip", vision["image_size"], vision["patch_size"], (0.5,) * 3, (0.5,) * 3,
                      "(random)", None)
    rows = F.normalize(torch.randn(4, proj), dim=1)
    prompts = PromptEmbeddings(rows[0], rows[1:], ["scratch", "dent"])
    size = (vision["image_size"],) * 2
    expert = TextExpert(clip, prompts, size, bank=F.normalize(torch.randn(bank, proj), dim=1))
    return expert, size, name


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="linecam bench text-expert", description=__doc__.splitlines()[0])
    ap.add_argument("--bank", type=int, default=2048, help="good-patch memory-bank rows (few-shot)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", default=f"1,{os.cpu_count() or 1}", help="comma list of ONNX Runtime thread counts")
    ap.add_argument("--quick", action="store_true", help="tiny CLIP, 3 rounds: checks the machinery only")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    import onnxruntime as ort
    import torch

    from linecam.bench.machine import cpu_model
    from linecam.export.onnx_export import INPUT_NAME, export_onnx
    from linecam.export.quantize import calibration_batch, to_int8
    from linecam.export.student import Student
    from linecam.export.text_expert import PROMPT_MAPS
    from linecam.preprocess import PreprocessSpec
    from linecam.runtime.session import make_session

    if args.quick:
        args.rounds, args.bank = 3, 64
    expert, size, name = _expert(args.quick, args.bank)
    thread_counts = sorted({int(t) for t in str(args.threads).split(",") if t.strip()})
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, *size)).astype(np.float32)
    spec = PreprocessSpec(input_size=size)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        calib = calibration_batch(rng.standard_normal((32, 3, *size)).astype(np.float32), spec)
        with warnings.catch_warnings():  # transformers' input-size check, fixed at this static size
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
            fp32 = export_onnx(expert, Path(tmp) / "text.onnx", size, check_inputs=1, extra_outputs=(PROMPT_MAPS,))
        files = {"text_fp32": fp32, "text_int8": to_int8(fp32, Path(tmp) / "text_int8.onnx", calib).path}
        st = export_onnx(Student("s").eval(), Path(tmp) / "s.onnx", size)
        files.update(student_s_fp32=st, student_s_int8=to_int8(st, Path(tmp) / "s_int8.onnx", calib).path)
        export_s = time.perf_counter() - t0
        sizes_mb = {k: round(Path(p).stat().st_size / 1e6, 1) for k, p in files.items()}
        for threads in thread_counts:
            sessions = {k: make_session(p, intra_op_threads=threads) for k, p in files.items()}
            for sess in sessions.values():  # warm-up: first runs allocate and tune
                sess.run(None, {INPUT_NAME: x})
                sess.run(None, {INPUT_NAME: x})
            times: dict[str, list[float]] = {k: [] for k in sessions}
            for _ in range(args.rounds):
                for k, sess in sessions.items():
                    reps = 10 if k.startswith("student") else 1
                    t = time.perf_counter()
                    for _ in range(reps):
                        sess.run(None, {INPUT_NAME: x})
                    times[k].append((time.perf_counter() - t) * 1000 / reps)
            runs.append({"threads": threads, "ms_per_frame_median": {k: float(np.median(v)) for k, v in times.items()},
                         "ms_per_frame_all": times})
    result = {
        "date": time.strftime("%Y-%m-%d"), "cpu": cpu_model(), "cores": os.cpu_count(),
        "device": "ONNX Runtime on the CPU", "quick": args.quick, "expert": name, "input": list(size),
        "bank": args.bank, "scales": list(expert.scales), "rounds": args.rounds, "threads": thread_counts,
        "runs": runs, "file_mb": sizes_mb, "export_seconds": round(export_s, 1),
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__},
        # other jobs' load: the figures are only comparable between runs at similar load
        "load_average_1_5_15": [round(v, 2) for v in os.getloadavg()],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "text_expert_quick" if args.quick else "text_expert"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(table(result))
    print(table(result))
    return 0


LABELS = {"text_fp32": "text expert FP32", "text_int8": "text expert INT8 (Q/DQ)",
          "student_s_fp32": "distilled student `s` FP32", "student_s_int8": "distilled student `s` INT8"}


def table(r: dict) -> str:
    load = r.get("load_average_1_5_15")
    shared = f"load average {load[0]:.1f} at the end" if load else "a machine shared with other jobs"
    lines = [f"Measured {r['date']} on {r['cpu']} ({r['cores']} cores, {r['device']}; {shared}), "
             f"{r['input'][0]}x{r['input'][1]} input, ONNX Runtime {r['versions']['onnxruntime']}; median of "
             f"{r['rounds']} interleaved rounds. Text expert: {r['expert']}, window scales "
             f"{', '.join(map(str, r['scales']))}, a {r['bank']}-row good-patch bank, 3 prompt maps.", ""]
    lines += ["| model | file MB | " + " | ".join(f"ms / frame, {run['threads']} thread(s)" for run in r["runs"]) + " |",
              "| --- | --- |" + " --- |" * len(r["runs"])]
    for k in r["runs"][0]["ms_per_frame_median"]:
        lines.append(f"| {LABELS.get(k, k)} | {r['file_mb'][k]} | "
                     + " | ".join(f"{run['ms_per_frame_median'][k]:.2f}" for run in r["runs"]) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
