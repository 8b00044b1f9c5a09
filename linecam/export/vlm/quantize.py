"""Weight-only INT8 / INT4 decoders (ONNX Runtime ``MatMulNBits``), FP16 graphs, token agreement.

The decoder of a compact VLM is memory-bound while decoding: every token reads every
weight once. Weight-only quantization (``MatMulNBits``, blockwise symmetric, activations
stay float) cuts those bytes 4x / 8x and runs on ORT's CPU and CUDA providers.

Accuracy is reported as greedy-token agreement with the FP32 decoder on a fixed,
seeded prompt set (images + region prompts), two ways:

* ``teacher_forced``: fraction of steps where the quantized model's argmax equals FP32's
  when both are fed FP32's tokens (per-step agreement, insensitive to one early flip);
* ``exact_sequences`` / ``prefix``: free-running: share of identical sequences and the
  mean fraction of tokens before the first divergence.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from linecam.bundle import file_entry, write_manifest
from linecam.export.quantize import PROTOBUF_LIMIT, to_fp16
from linecam.runtime.vlm.bundle import VlmManifest, load_vlm_bundle

logger = logging.getLogger(__name__)

#: Weights per quantization block. 32 keeps INT4 error low on small hidden sizes.
BLOCK_SIZE = 32


#: Below this share of identical free-running sequences, a quantized decoder is called out.
MIN_EXACT = 0.5


def _quiet_quantizer() -> Any:
    """ORT's MatMulNBits quantizer, without its log flood: importing it calls
    ``logging.basicConfig(level=INFO)`` (a root handler at INFO for everything) and it logs a
    line per weight (1,600 lines for a small VLM). Undo the first, keep it to warnings."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    for h in root.handlers[:]:
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    return MatMulNBitsQuantizer


def quantize_weights(src: str | Path, dst: str | Path, bits: int, block_size: int = BLOCK_SIZE,
                     accuracy_level: int | None = 4) -> Path:
    """Weight-only quantize every MatMul with a constant weight to ``bits`` (4 or 8) via MatMulNBits.

    ``accuracy_level=4`` lets ORT's CPU kernel compute in int8 (its fastest path).
    """
    import onnx

    MatMulNBitsQuantizer = _quiet_quantizer()
    if bits not in (4, 8):
        raise ValueError("bits must be 4 or 8")
    model = onnx.load(str(src))
    q = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=True,
                             accuracy_level=accuracy_level, op_types_to_quantize=("MatMul",))
    q.process()
    dst = Path(dst)
    q.model.save_model_to_file(str(dst), use_external_data_format=q.model.model.ByteSize() > PROTOBUF_LIMIT)
    return dst


def prompt_set(n: int, seed: int = 1234) -> list[tuple[np.ndarray, str]]:
    """A fixed set of (image, prompt) pairs: seeded textured images with a bright blob, region prompts."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = int(rng.integers(96, 200)), int(rng.integers(96, 200))
        img = (rng.normal(128, 20, (h, w, 3))).clip(0, 255).astype(np.uint8)
        x, y = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
        img[y:y + 16, x:x + 16] = 255
        prompt = (f"Describe the defect in box x = {x} , y = {y} , w = 16 , h = 16 ; area 256 px ; "
                  f"score {1 + i / 10:.1f} .")
        out.append((img, prompt))
    return out


def token_agreement(bundle_dir: str | Path, precision: str, n_prompts: int = 4, n_tokens: int = 16,
                    reference: str = "fp32", graph: str = "plain") -> dict[str, Any]:
    """Greedy-token agreement of ``decoder_<precision>`` with ``decoder_<reference>`` (see module doc);
    ``graph="contrib"``: of a hybrid bundle's ``decoder_contrib_*`` pair."""
    from linecam.runtime.vlm.engine import VlmEngine

    ref = VlmEngine(bundle_dir, precision=reference, graph=graph)  # type: ignore[arg-type]
    q = VlmEngine(ref.bundle, precision=precision, graph=graph)  # type: ignore[arg-type]
    steps = agree = exact = 0
    prefix = []
    for img, prompt in prompt_set(n_prompts):
        enc = ref.encode(img, prompt)
        r = ref.generate_encoded(enc, max_new_tokens=n_tokens, stop_token_ids=[])
        free = q.generate_encoded(enc, max_new_tokens=n_tokens, stop_token_ids=[])
        forced = q.generate_encoded(enc, max_new_tokens=n_tokens, force_tokens=r.tokens)
        steps += len(r.tokens)
        agree += sum(a == b for a, b in zip(r.tokens, forced.tokens))
        exact += free.tokens == r.tokens
        k = next((i for i, (a, b) in enumerate(zip(r.tokens, free.tokens)) if a != b), len(r.tokens))
        prefix.append(k / len(r.tokens))
    return {"reference": reference, "prompts": n_prompts, "tokens_per_prompt": n_tokens,
            "teacher_forced": agree / steps, "exact_sequences": exact / n_prompts,
            "prefix": float(np.mean(prefix))}


def add_variants(out: str | Path, *, quantize: tuple[str, ...] = ("int8", "int4"), fp16: bool = False,
                 n_prompts: int = 4, n_tokens: int = 16) -> VlmManifest:
    """Add quantized / FP16 files to an exported bundle and record their token agreement."""
    out = Path(out)
    bundle = load_vlm_bundle(out)
    man = bundle.manifest
    files = dict(man.files)
    # Hybrid (Qwen3.5) bundles carry a contrib-op decoder beside the plain one: quantize both.
    graphs = ["decoder"] + (["decoder_contrib"] if bundle.has("decoder_contrib_fp32") else [])
    for prec in quantize:
        bits = {"int8": 8, "int4": 4}.get(prec)
        if bits is None:
            raise ValueError(f"unknown quantization {prec!r}: use int8 or int4")
        for kind in graphs:
            rel = f"{kind}_{prec}.onnx"
            quantize_weights(bundle.path(f"{kind}_fp32"), out / rel, bits)
            files[f"{kind}_{prec}"] = file_entry(out, rel, precision=prec)  # type: ignore[arg-type]
            if (out / f"{rel}.data").exists():
                files[f"{kind}_{prec}_data"] = file_entry(out, f"{rel}.data", precision=prec)  # type: ignore[arg-type]
    if fp16:
        # A hybrid (Qwen3.5) decoder keeps FP32 I/O: its conv / recurrent states stay FP32 across steps.
        for kind, keep in (("vision", True), ("decoder", bool(man.text.layer_types)), ("embedding", False)):
            rel = f"{kind}_fp16.onnx"
            # The shared converter (atomic, external data over 2 GB); the decoder's KV-cache inputs
            # make a zeros smoke run meaningless, token agreement is the VLM's check.
            to_fp16(bundle.path(f"{kind}_fp32"), out / rel, keep_io_types=keep, check=False)
            files[f"{kind}_fp16"] = file_entry(out, rel, precision="fp16")
    man = man.model_copy(update={"files": files})
    write_manifest(out, man)  # type: ignore[arg-type]  # same writer, VLM manifest model
    quality = dict(man.quality)
    for prec in quantize:
        if len(graphs) > 1:
            quality[f"decoder_contrib_{prec}"] = token_agreement(out, prec, n_prompts=n_prompts, n_tokens=n_tokens,
                                                                 graph="contrib")
        quality[f"decoder_{prec}"] = token_agreement(out, prec, n_prompts=n_prompts, n_tokens=n_tokens)
        logger.info("decoder_%s token agreement vs fp32: %s", prec, json.dumps(quality[f"decoder_{prec}"]))
        exact = float(quality[f"decoder_{prec}"].get("exact_sequences", 1.0))
        if exact < MIN_EXACT:
            logger.warning("decoder_%s reproduces only %.0f %% of the fp32 decoder's descriptions exactly (teacher-"
                           "forced token agreement %.0f %%): its descriptions will read differently; prefer "
                           "vlm.precision int8 or fp32, or leave %s out (--quantize)", prec, 100 * exact,
                           100 * float(quality[f"decoder_{prec}"].get("teacher_forced", 0.0)), prec)
    man = man.model_copy(update={"quality": quality})
    write_manifest(out, man)  # type: ignore[arg-type]
    return man
