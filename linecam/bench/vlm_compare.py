"""VLM speed on this machine: linecam's ONNX Runtime VLM (FP32 / INT8 / INT4) vs Hugging Face ``generate``.

    linecam bench vlm-compare                      # SmolVLM-256M dimensions, random weights
    linecam bench vlm-compare --family qwen3_5 --size qwen3.5-0.8b   # Qwen3.5-0.8B dimensions (hybrid)
    linecam bench vlm-compare --size tiny --new-tokens 8 --repeats 1   # seconds: checks the machinery

One run, same inputs for every engine: one image (one 512x512 tile -> 64 image tokens)
and a region-grounded prompt, greedy decoding of exactly ``--new-tokens`` tokens (stop
tokens off, so random weights cannot end a run early). Reported per engine (median of
``--repeats`` after one warm-up): time to first token (image preprocessing excluded,
vision encoder + prefill included, for both sides) and decode tokens/s after the first
token. Writes ``benchmarks/results/vlm_bench.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

#: Results folder, relative to where the command runs (the checkout), as for `linecam bench`.
RESULTS = Path("benchmarks/results")



def _hf_run(model, kw: dict, n_new: int) -> tuple[float, float, list[int]]:
    """(ttft_ms, decode tokens/s, tokens) of one ``generate`` call, timed by a streamer."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    class _Clock(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value) -> None:  # first call: the prompt; then one call per new token
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    clock = _Clock()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**kw, do_sample=False, max_new_tokens=n_new, min_new_tokens=n_new,
                             eos_token_id=None, streamer=clock)
    t_end = time.perf_counter()
    gen = clock.times[1:]
    ttft = (gen[0] - t0) * 1e3
    tps = (len(gen) - 1) / (t_end - gen[0]) if len(gen) > 1 else 0.0
    return ttft, tps, out[0, kw["input_ids"].shape[1]:].tolist()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="linecam bench vlm-compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="idefics3", choices=["idefics3", "qwen3_5"])
    ap.add_argument("--size", default=None, choices=["smolvlm-256m", "qwen3.5-0.8b", "tiny"],
                    help="default: the family's compact size (smolvlm-256m / qwen3.5-0.8b)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for both sides (0: all cores)")
    ap.add_argument("--work", type=Path, default=None, help="Folder for the model + bundle (default: temp)")
    ap.add_argument("--out", type=Path, default=None,
                    help="results stem (default: benchmarks/results/vlm_bench, _qwen3_5 for that family)")
    args = ap.parse_args(argv)
    qwen = args.family == "qwen3_5"
    args.size = args.size or ("qwen3.5-0.8b" if qwen else "smolvlm-256m")
    args.out = args.out or RESULTS / ("vlm_bench_qwen3_5" if qwen else "vlm_bench")

    import numpy as np
    import onnxruntime as ort
    import torch
    import transformers

    from linecam.export.vlm import export_vlm
    from linecam.export.vlm.tiny import build_model_folder
    from linecam.runtime.vlm.engine import VlmEngine
    from linecam.runtime.vlm.prompt import RegionPromptBuilder
    from linecam.runtime.postprocess import Region

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="vlm_bench_"))
    model_dir, bundle_dir = work / "model", work / "bundle"
    export_s = None
    if not (bundle_dir / "manifest.json").is_file():
        t = time.perf_counter()
        build_model_folder(args.family, model_dir, size=args.size, seed=0)
        export_vlm(model_dir, bundle_dir, quantize=("int8", "int4"), agreement_prompts=4, agreement_tokens=16)
        export_s = time.perf_counter() - t

    # The same inputs for every engine: a synthetic part with one bright defect, grounded prompt.
    rng = np.random.default_rng(0)
    frame = rng.normal(120, 15, (480, 640, 3)).clip(0, 255).astype(np.uint8)
    frame[200:240, 300:360] = 250
    region = Region(bbox=(300, 200, 60, 40), area=2400, centroid=(330.0, 220.0), max_score=2.0)
    builder = RegionPromptBuilder()
    grounded = builder.build(frame, [region], threshold=1.0)

    from linecam.export.vlm.export import load_hf_model

    engines: dict[str, VlmEngine] = {}
    variants = [(p, "auto") for p in ("fp32", "int8", "int4")]
    if qwen:  # the hybrid bundle's two decoders side by side: contrib ops (the CPU default) and plain ops
        variants += [(p, "plain") for p in ("fp32", "int8", "int4")]
    for p, graph in variants:
        e = VlmEngine(bundle_dir, precision=p, intra_op_threads=threads, graph=graph)  # type: ignore[arg-type]
        if engines:  # one vision + embedding session for all (only the decoder differs): less memory
            first = next(iter(engines.values()))
            e.vision, e.embedding = first.vision, first.embedding
        engines[p if graph == "auto" else f"{p}_{graph}"] = e
    enc = engines["fp32"].encode(grounded.image, grounded.prompt)
    model, _ = load_hf_model(model_dir)
    model.config._attn_implementation = "sdpa"  # transformers' default attention: the fair baseline
    (model.model.language_model if qwen else model.model.text_model).config._attn_implementation = "sdpa"
    ids = torch.from_numpy(enc.input_ids)
    pv = torch.from_numpy(enc.vision_feeds["pixel_values"])
    kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pv if qwen else pv[None]}
    if qwen:
        kw.update(image_grid_thw=torch.tensor(enc.grids), mm_token_type_ids=(ids == model.config.image_token_id).int())

    def run_ort(eng):
        g = eng.generate_encoded(enc, max_new_tokens=args.new_tokens, stop_token_ids=[])
        return g.timings_ms["ttft"], g.tokens_per_s, g.tokens, g.timings_ms["vision"]

    runners = {f"linecam_ort_{p}": (lambda e=e: run_ort(e)) for p, e in engines.items()}
    runners["hf_generate_fp32"] = lambda: (*_hf_run(model, kw, args.new_tokens), None)
    # Round-robin (one warm-up round, then --repeats rounds): on a shared machine, load
    # changes over minutes; interleaving spreads it over all engines alike.
    raw: dict[str, list] = {k: [] for k in runners}
    for rnd in range(args.repeats + 1):
        for k, fn in runners.items():
            r = fn()
            if rnd:
                raw[k].append(r)
            print(rnd, k, f"ttft {r[0]:.0f} ms, {r[1]:.2f} tok/s", flush=True)
    results: dict[str, dict] = {}
    for k, runs in raw.items():
        results[k] = {"ttft_ms": statistics.median(r[0] for r in runs),
                      "tokens_per_s": statistics.median(r[1] for r in runs),
                      "tokens_per_s_runs": [round(r[1], 3) for r in runs],
                      "ttft_ms_runs": [round(r[0], 1) for r in runs], "tokens": runs[-1][2]}
        if runs[-1][3] is not None:
            results[k]["vision_ms"] = statistics.median(r[3] for r in runs)

    base = results["hf_generate_fp32"]["tokens_per_s"]
    for r in results.values():
        r["speedup_tokens_per_s_vs_hf"] = r["tokens_per_s"] / base if base else None
        r["ttft_speedup_vs_hf"] = results["hf_generate_fp32"]["ttft_ms"] / r["ttft_ms"] if r["ttft_ms"] else None
    ref = results["hf_generate_fp32"]["tokens"]
    for k in [k for k in results if k.startswith("linecam_ort_fp32")]:
        results[k]["same_tokens_as_hf"] = results[k]["tokens"] == ref
    for k, e in engines.items():
        results[f"linecam_ort_{k}"]["decoder"] = e.roles["decoder"]

    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    t = manifest["text"]
    doc = {
        "what": "VLM time-to-first-token and decode tokens/s, linecam ORT runtime vs HF generate (PyTorch)",
        "architecture": (f"Qwen3.5 hybrid: 3 of 4 layers Gated-DeltaNet ({args.size} dimensions), random weights"
                         if qwen else f"Idefics3 / SmolVLM ({args.size} dimensions), random weights"),
        "dims": {"text_layers": t["num_layers"], "hidden": t["hidden_size"], "kv_heads": t["num_kv_heads"],
                 "vocab": t["vocab_size"], "vision": manifest["vision"]},
        "inputs": {"prompt_tokens": enc.n_tokens, "image_tokens": int((enc.input_ids == t["image_token_id"]).sum()),
                   "new_tokens": args.new_tokens, "repeats": args.repeats, "prompt": grounded.prompt,
                   "order": "round-robin over engines, 1 warm-up round"},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "threads": threads, "python": platform.python_version(), "onnxruntime": ort.__version__,
                    "torch": torch.__version__, "transformers": transformers.__version__,
                    "load_avg_1m_at_end": os.getloadavg()[0],
                    "note": "shared machine: other jobs may run concurrently"},
        "export_s": export_s,
        "token_agreement_vs_fp32": manifest.get("quality", {}),
        "results": {k: {kk: vv for kk, vv in v.items() if kk != "tokens"} for k, v in results.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [f"# VLM benchmark ({doc['architecture']})", "",
             f"{doc['inputs']['prompt_tokens']} prompt tokens ({doc['inputs']['image_tokens']} image), "
             f"{args.new_tokens} new tokens, greedy, median of {args.repeats} round-robin rounds; {threads} CPU "
             f"threads ({doc['machine']['cores']} cores, shared machine, load average "
             f"{doc['machine']['load_avg_1m_at_end']:.1f} at the end). TTFT = vision encoder + prefill "
             f"(image preprocessing excluded); tokens/s = decode after the first token.", "",
             "| engine | TTFT ms | tokens/s | tokens/s vs HF | TTFT vs HF |", "| --- | ---: | ---: | ---: | ---: |"]
    for k, v in results.items():
        lines.append(f"| {k} | {v['ttft_ms']:.0f} | {v['tokens_per_s']:.1f} | "
                     f"{v['speedup_tokens_per_s_vs_hf']:.2f}x | {v['ttft_speedup_vs_hf']:.2f}x |")
    lines += ["", "Token agreement with the FP32 decoder (4 fixed prompts x 16 tokens):", ""]
    for role, q in doc["token_agreement_vs_fp32"].items():
        lines.append(f"- {role}: teacher-forced {q['teacher_forced']:.3f}, exact sequences "
                     f"{q['exact_sequences']:.2f}, prefix {q['prefix']:.3f}")
    for k in [k for k in results if k.startswith("linecam_ort_fp32")]:
        lines.append(f"\n{k} ({results[k]['decoder']}) tokens identical to HF generate: "
                     f"{results[k]['same_tokens_as_hf']}")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
