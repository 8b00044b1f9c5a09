"""``vlm`` mode: time to first token and tokens/s of the compact VLM on the line's NG frames.

What the daemon's description worker does, minus the threads: the bench's own frames (the
simulated line) go through the region expert with the daemon's preprocessing, runner and
postprocessor; the NG frames with regions get the daemon's region-grounded prompt
(:class:`~linecam.runtime.vlm.prompt.RegionPromptBuilder`) and :meth:`VlmEngine.generate`
runs on it. Each description is generated to a fixed length (stop tokens off), so tokens/s
compares across runs and bundles. TTFT is the engine's own: call -> first token (image
crop preprocessing, vision encoder, embedding, prefill); tokens/s is the decode after it.

Without ``--vlm-bundle`` the bench builds a reference model once (:func:`ensure_reference_vlm`:
SmolVLM-256M's dimensions, random weights, speed only); with ``--quick`` it measures only a
given bundle. ``linecam bench vlm-compare`` compares the runtime with transformers' ``generate``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from linecam.runtime.stats import percentile_summary

logger = logging.getLogger(__name__)


def _unavailable(reason: str) -> dict[str, Any]:
    return {"available": False, "reason": reason, "time_to_first_token_ms": None, "tokens_per_s": None}


def ng_frames_with_regions(expert: Any, frames: Sequence[Any], limit: int) -> tuple[list[tuple[Any, list]], float]:
    """Up to ``limit`` (frame, regions) pairs the region expert judges NG, as the daemon would;
    and the image threshold (region scores are divided by it in the prompt)."""
    from linecam.config import ThresholdsConfig
    from linecam.runtime.backends import make_runner
    from linecam.runtime.inspector import Inspector, Thresholds

    man = expert.manifest
    # The daemon's default thresholds section: the bundle's thresholds, its min_region_area_px.
    inspector = Inspector(expert, make_runner(expert, "onnxruntime", None, 1), Thresholds.of(expert, ThresholdsConfig()))
    out: list[tuple[Any, list]] = []
    try:
        for f in frames:
            ins = inspector.inspect(f.image, f.bit_depth)
            if ins.verdict == "NG" and ins.regions:
                out.append((f, ins.regions))
            if len(out) >= limit:
                break
    finally:
        inspector.close()
    return out, man.thresholds.image


def run_vlm(vlm_bundle: Path | None, expert: Any = None, frames: Sequence[Any] = (), *, precision: str = "int8",
            max_new_tokens: int = 32, runs: int = 8, threads: int = 0, device: str = "auto") -> dict[str, Any]:
    """Measure the VLM on NG frames; ``{"available": False, "reason": ...}`` when it cannot."""
    if vlm_bundle is None:
        return _unavailable("no VLM bundle given: pass --vlm-bundle DIR (a bundle from `export-engine vlm`); "
                            "nothing was measured")
    if max_new_tokens < 2 or runs < 1:
        raise ValueError("vlm mode needs max_new_tokens >= 2 (tokens/s is measured after the first) and runs >= 1")
    from linecam.runtime.vlm.engine import VlmEngine
    from linecam.runtime.vlm.prompt import RegionPromptBuilder

    work, threshold = ng_frames_with_regions(expert, frames, limit=runs) if expert is not None else ([], 1.0)
    if not work:
        return _unavailable("the region expert judged no bench frame NG with a region: nothing to describe")
    engine = VlmEngine(vlm_bundle, precision=precision, device=device,  # type: ignore[arg-type]
                       intra_op_threads=threads)
    builder = RegionPromptBuilder()
    prompts = [builder.build(f.image, regions, threshold=threshold, bit_depth=f.bit_depth) for f, regions in work]
    t0 = time.perf_counter()
    engine.generate(prompts[0].image, prompts[0].prompt, max_new_tokens=2, stop_token_ids=[])  # warm-up
    warmup_s = time.perf_counter() - t0
    ttft, vision, tps, prompt_tokens = [], [], [], []
    for i in range(runs):
        g = prompts[i % len(prompts)]
        gen = engine.generate(g.image, g.prompt, max_new_tokens=max_new_tokens, stop_token_ids=[])
        ttft.append(gen.timings_ms["ttft"])
        vision.append(gen.timings_ms.get("vision", 0.0))
        tps.append(gen.tokens_per_s)
        prompt_tokens.append(gen.prompt_tokens)
    man = engine.manifest
    return {
        "available": True,
        "reason": f"{runs} descriptions of {len(work)} NG frame(s) of the bench line, {max_new_tokens} new tokens each "
                  f"(stop tokens off), {engine.providers[0]}",
        "bundle": {"name": man.name, "family": man.family, "path": str(vlm_bundle), "decoder": engine.roles["decoder"]},
        "precision": precision,
        "provider": engine.providers[0],
        "runs": runs,
        "new_tokens": max_new_tokens,
        "prompt_tokens_median": float(np.median(prompt_tokens)),
        "warmup_s": round(warmup_s, 3),
        "time_to_first_token_ms": percentile_summary(np.asarray(ttft)),
        "vision_ms": percentile_summary(np.asarray(vision)),
        "tokens_per_s": percentile_summary(np.asarray(tps)),
    }


#: The reference VLM the bench builds when given none: SmolVLM-256M's real dimensions (Idefics3),
#: random weights (speed does not depend on weight values), INT8 weight-only decoder.
REFERENCE = {"name": "bench-reference-smolvlm-256m-random", "family": "idefics3", "size": "smolvlm-256m", "seed": 0}


def ensure_reference_vlm(folder: Path, precision: str = "int8", say: Any = lambda s: None) -> Path:
    """The reference VLM bundle in ``folder`` with a decoder at ``precision`` (built once, reused
    while its recipe is unchanged). Needs torch and transformers (the ``export`` extra), like the
    demo expert's first fit."""
    import json

    from linecam.errors import LinecamError

    bundle, stamp = folder / "bundle", folder / "recipe.json"
    quantize = [precision] if precision in ("int8", "int4") else []
    recipe = json.dumps({**REFERENCE, "quantize": quantize, "fp16": precision == "fp16"}, sort_keys=True)
    if (bundle / "manifest.json").is_file() and stamp.is_file() and stamp.read_text() == recipe:
        return bundle
    try:
        from linecam.export.vlm import export_vlm
        from linecam.export.vlm.tiny import build_model_folder
    except ImportError as e:
        raise LinecamError(f"the vlm mode builds its reference VLM with torch + transformers ({e}): install the "
                           "export extra, pass --vlm-bundle DIR, or leave vlm out (--mode ...)") from None
    say(f"vlm: building the reference VLM ({REFERENCE['family']} at {REFERENCE['size']} dimensions, random weights) "
        f"into {folder} (once; a few minutes)")
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    model = build_model_folder(REFERENCE["family"], folder / "model", size=REFERENCE["size"],  # type: ignore[arg-type]
                               seed=REFERENCE["seed"])
    export_vlm(model, bundle, name=str(REFERENCE["name"]), quantize=tuple(quantize), fp16=precision == "fp16",
               agreement_prompts=1, agreement_tokens=4)
    shutil.rmtree(model, ignore_errors=True)  # the bundle is all the bench needs
    stamp.write_text(recipe)
    return bundle
