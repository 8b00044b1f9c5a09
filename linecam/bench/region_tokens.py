"""What region-token injection costs per NG frame on this machine (``linecam bench region-tokens``).

    linecam bench region-tokens                         # tiny VLM (hidden 32), random projector, K=8
    linecam bench region-tokens --size smolvlm-256m     # SmolVLM-256M dimensions (export takes minutes)
    linecam bench region-tokens --bundle B --expert E   # a distilled bundle with its projector

One run, the same NG frames (generated: a dark defect on a bright plate, localised by the
darkness region expert) and the same region-grounded prompt for both modes, as the
daemon's description worker runs them: *prompt-only* (encode + greedy decoding) and
*injection* (map crop + region features + projector on ONNX Runtime + K placeholder rows
+ the same decoding). Decoding is exactly ``--new-tokens`` tokens (stop tokens off), and
the modes alternate frame by frame, so the difference is the injection's own cost:
features, projector and the K extra prefill rows. Medians over the frames; the ratio is
from this one run. Writes ``benchmarks/results/region_tokens.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path("benchmarks/results")


def _frames(n: int, side: int, seed: int) -> list[np.ndarray]:
    import cv2

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = np.clip(rng.normal(200, 4, (side, side, 3)), 0, 255).astype(np.uint8)
        c = tuple(int(v) for v in rng.uniform(20, side - 20, 2))
        cv2.ellipse(img, c, (int(rng.uniform(4, 12)), int(rng.uniform(3, 8))), rng.uniform(0, 180), 0, 360,
                    (40, 40, 40), -1)
        out.append(img)
    return out


def _bundle(size: str, k: int, work: Path) -> Path:
    from linecam.export.vlm import export_vlm
    from linecam.export.vlm.projector import RegionProjectorNet, export_projector
    from linecam.export.vlm.tiny import build_model_folder
    from linecam.runtime.vlm.bundle import load_vlm_bundle

    family = "qwen2_5_vl" if size == "tiny" else "idefics3"
    hf = build_model_folder(family, work / "hf", size=size)  # type: ignore[arg-type]
    export_vlm(hf, work / "bundle", quantize=(), agreement_prompts=1)
    text = load_vlm_bundle(work / "bundle").manifest.text
    export_projector(RegionProjectorNet(k, text.hidden_size), work / "bundle", placeholder=text.pad_token_id or 0)
    return work / "bundle"


def measure(bundle: Path, expert: Path, frames: list[np.ndarray], new_tokens: int, threads: int) -> dict[str, Any]:
    from linecam.bundle import load_bundle
    from linecam.runtime.backends import make_runner
    from linecam.runtime.inspector import Inspector, Thresholds
    from linecam.runtime.vlm.engine import VlmEngine
    from linecam.runtime.vlm.prompt import RegionPromptBuilder
    from linecam.runtime.vlm.region_tokens import RegionProjector, inject, map_crop, region_features

    eb = load_bundle(expert)
    inspector = Inspector(eb, make_runner(eb, "onnxruntime", None), Thresholds.of(eb))
    engine = VlmEngine(bundle, intra_op_threads=threads)
    proj = RegionProjector(engine.bundle, "fp32", intra_op_threads=1)
    builder = RegionPromptBuilder()
    rows: dict[str, list[float]] = {k: [] for k in ("prompt_total", "inject_total", "features", "projector",
                                                    "prompt_ttft", "inject_ttft")}
    used = 0
    for i, frame in enumerate(frames):
        ins = inspector.inspect(frame)
        if ins.verdict != "NG" or not ins.regions:
            continue
        amap, geo = np.array(ins.anomaly_map, copy=True), ins.geometry
        g = builder.build(frame, ins.regions, threshold=Thresholds.of(eb).image)
        order = ("prompt", "inject") if i % 2 == 0 else ("inject", "prompt")
        for mode in order:
            t0 = time.perf_counter()
            enc = engine.encode(g.image, g.prompt)
            if mode == "inject":
                tf = time.perf_counter()
                top = max(g.regions, key=lambda r: r["score"])
                f = region_features(g.regions, (frame.shape[1], frame.shape[0]), map_crop(amap, top["bbox"], geo))
                t1 = time.perf_counter()
                r = proj.rows(f)
                t2 = time.perf_counter()
                enc = inject(enc, r, proj.info.placeholder_id, proj.image_token_id)
                rows["features"].append((t1 - tf) * 1e3)
                rows["projector"].append((t2 - t1) * 1e3)
            gen = engine.generate_encoded(enc, max_new_tokens=new_tokens, stop_token_ids=[], t_start=t0)
            rows[f"{mode}_total"].append(gen.timings_ms["total"])
            rows[f"{mode}_ttft"].append(gen.timings_ms["ttft"])
        used += 1
    med = {k: round(statistics.median(v), 3) for k, v in rows.items() if v}
    return {"ng_frames": used, "new_tokens": new_tokens, "k": proj.info.k, "hidden": engine.manifest.text.hidden_size,
            "median_ms": med, "inject_extra_ms": round(med["inject_total"] - med["prompt_total"], 3),
            "ratio_total": round(med["inject_total"] / med["prompt_total"], 4)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="linecam bench region-tokens", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="tiny", choices=["tiny", "smolvlm-256m"])
    ap.add_argument("--bundle", type=Path, default=None, help="A VLM bundle with a region projector")
    ap.add_argument("--expert", type=Path, default=None, help="Region expert bundle (default: the darkness bundle)")
    ap.add_argument("--k", type=int, default=8, help="Region tokens of the random projector (no --bundle)")
    ap.add_argument("--frames", type=int, default=30)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads of the VLM")
    ap.add_argument("--out", type=Path, default=RESULTS / "region_tokens")
    args = ap.parse_args(argv)

    from linecam.bench.darkness import make_tiny_bundle
    from linecam.bench.machine import machine_info

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        expert = args.expert or make_tiny_bundle(work / "expert", size=64, image_threshold=0.3, pixel_threshold=0.45)
        bundle = args.bundle or _bundle(args.size, args.k, work)
        res = measure(bundle, expert, _frames(args.frames, 128, seed=0), args.new_tokens, args.threads)
    res.update({"command": " ".join(["linecam bench region-tokens", *(sys.argv[1:] if argv is None else argv)]),
                "size": "given bundle" if args.bundle else args.size, "threads": args.threads,
                "cpu_count": os.cpu_count(), "machine": machine_info()})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    m = res["median_ms"]
    md = [f"# Region-token injection cost per NG frame ({res['size']}, K={res['k']}, hidden {res['hidden']})", "",
          f"`{res['command']}` - {res['ng_frames']} NG frames, {res['new_tokens']} new tokens each, "
          f"{args.threads} VLM thread(s), {os.cpu_count()} cores (shared machine: read the ratio).", "",
          "| | prompt-only | injection |", "| --- | ---: | ---: |",
          f"| description, total (ms, median) | {m['prompt_total']:.2f} | {m['inject_total']:.2f} |",
          f"| time to first token (ms, median) | {m['prompt_ttft']:.2f} | {m['inject_ttft']:.2f} |",
          f"| region features (ms, median) | - | {m['features']:.3f} |",
          f"| projector on ONNX Runtime (ms, median) | - | {m['projector']:.3f} |", "",
          f"Injection adds {res['inject_extra_ms']:.2f} ms per NG frame "
          f"(ratio {res['ratio_total']:.3f} of the prompt-only description time, this run).", ""]
    args.out.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
