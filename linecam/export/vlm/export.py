"""``export-engine vlm``: a local Hugging Face VLM folder -> a linecam VLM bundle.

Writes ``vision.onnx`` (encoder + projector), ``embedding.onnx``, ``decoder.onnx``
(``inputs_embeds`` + flat KV cache), optional weight-only INT8 / INT4 decoders, the
tokenizer / chat-template files and a ``kind: vlm`` manifest. Every graph is checked
against torch on the export inputs; a mismatch removes nothing silently, it raises.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from linecam.bundle import file_entry, new_provenance, write_manifest
from linecam.errors import BundleError
from linecam.export.vlm.graphs import DecoderGraph, EmbeddingGraph, Idefics3VisionGraph, QwenVisionGraph
from linecam.runtime.vlm import rope
from linecam.runtime.vlm.bundle import (
    Idefics3VisionSpec,
    PromptSpec,
    Qwen3VisionSpec,
    QwenVisionSpec,
    TextSpec,
    VlmManifest,
)

logger = logging.getLogger(__name__)

OPSET = 17
#: Largest |onnxruntime - torch| accepted on graph outputs at export (FP32).
PARITY_ATOL = 1e-3
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "preprocessor_config.json", "processor_config.json",
                   "generation_config.json")
_SENTINEL = "\u0001PROMPT\u0001"

DEFAULT_FORMATS = {
    "qwen2_5_vl": ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                   "<|im_start|>user\n{image}{prompt}<|im_end|>\n<|im_start|>assistant\n"),
    "idefics3": "<|im_start|>User:{image}{prompt}<end_of_utterance>\nAssistant:",
    "qwen3_5": "<|im_start|>user\n{image}{prompt}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
    "qwen3_vl": "<|im_start|>user\n{image}{prompt}<|im_end|>\n<|im_start|>assistant\n",
}
#: transformers class of each family (loaded by name: transformers is imported lazily).
MODEL_CLASSES = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "idefics3": "Idefics3ForConditionalGeneration",
                 "qwen3_5": "Qwen3_5ForConditionalGeneration", "qwen3_vl": "Qwen3VLForConditionalGeneration"}
#: How a hybrid bundle's two decoder graphs are written and where each runs (the manifest's extra).
LINEAR_ATTENTION_OPS = {
    "decoder_<precision>": "plain ONNX ops (Loop over the sequence, Concat+Conv+Slice): TensorRT, any provider",
    "decoder_contrib_<precision>": "com.microsoft CausalConvWithState + LinearAttention (onnxruntime >= 1.31 CPU / "
                                   "CUDA kernels): the runtime's choice on CPU, where it is faster",
}
#: Families whose prompt marks the image with Qwen's vision tokens.
QWEN_STYLE = ("qwen2_5_vl", "qwen3_5", "qwen3_vl")


@dataclass
class _Family:
    name: str
    text_model: torch.nn.Module
    lm_head: torch.nn.Module
    vision: torch.nn.Module
    vision_inputs: dict[str, torch.Tensor]
    vision_dynamic: dict[str, dict[int, str]]
    vision_spec: QwenVisionSpec | Qwen3VisionSpec | Idefics3VisionSpec
    positions: str
    image_token_id: int
    #: Hybrid decoders: per-layer "linear_attention" / "full_attention" (None: a flat KV cache).
    layer_types: list[str] | None = None
    #: Outputs of the vision graph (Qwen3-VL adds "deepstack_features").
    vision_outputs: tuple[str, ...] = ("image_features",)
    #: Writes and checks decoder.onnx ``(out, opset, export, check) -> max diffs``; None: the flat-KV
    #: decoder of :class:`DecoderGraph`.
    export_decoder: Callable[..., dict[str, float]] | None = None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _qwen(model: torch.nn.Module, folder: Path) -> _Family:
    cfg = model.config
    vc = cfg.vision_config
    pp = _read_json(folder / "preprocessor_config.json")
    size = pp.get("size") or {}
    spec = QwenVisionSpec(
        patch_size=vc.patch_size, temporal_patch_size=vc.temporal_patch_size, merge_size=vc.spatial_merge_size,
        window_size=vc.window_size, head_dim=vc.hidden_size // vc.num_heads,
        rope_theta=float((getattr(vc, "rope_parameters", None) or {}).get("rope_theta", 10000.0)),
        min_pixels=int(pp.get("min_pixels") or size.get("shortest_edge") or 56 * 56),
        max_pixels=int(pp.get("max_pixels") or size.get("longest_edge") or 28 * 28 * 1280),
        image_mean=list(pp.get("image_mean", [0.48145466, 0.4578275, 0.40821073])),
        image_std=list(pp.get("image_std", [0.26862954, 0.26130258, 0.27577711])))
    m = spec.merge_size
    grids = [(1, 4 * m, 6 * m)]  # a non-square grid: catches h/w mix-ups in the traced graph
    n = 24 * m * m
    host = rope.qwen_vision_inputs(grids, merge=m, window_size=spec.window_size, patch_size=spec.patch_size,
                                   head_dim=spec.head_dim, theta=spec.rope_theta)
    g = torch.Generator().manual_seed(0)
    inputs = {"pixel_values": torch.randn(n, vc.in_channels * spec.temporal_patch_size * spec.patch_size ** 2,
                                          generator=g)}
    inputs.update({k: torch.from_numpy(v) for k, v in host.feeds().items()})
    dyn = {"pixel_values": {0: "patches"}, "rotary_cos": {0: "patches"}, "rotary_sin": {0: "patches"},
           "window_index": {0: "merged"}, "reverse_index": {0: "merged"},
           "full_mask": {0: "patches", 1: "patches_k"}, "window_mask": {0: "patches", 1: "patches_k"},
           "image_features": {0: "merged"}}
    return _Family("qwen2_5_vl", model.model.language_model, model.lm_head, QwenVisionGraph(model.model.visual),
                   inputs, dyn, spec, "mrope", int(cfg.image_token_id))


def _idefics3(model: torch.nn.Module, folder: Path) -> _Family:
    cfg = model.config
    vc = cfg.vision_config
    pp = _read_json(folder / "preprocessor_config.json")
    spec = Idefics3VisionSpec(
        tile_size=int((pp.get("max_image_size") or {}).get("longest_edge", vc.image_size)),
        patch_size=vc.patch_size, scale_factor=cfg.scale_factor,
        longest_edge=int((pp.get("size") or {}).get("longest_edge", vc.image_size)),
        do_image_splitting=bool(pp.get("do_image_splitting", False)),
        image_mean=list(pp.get("image_mean", [0.5, 0.5, 0.5])), image_std=list(pp.get("image_std", [0.5, 0.5, 0.5])))
    if spec.tile_size != vc.image_size:
        raise BundleError(f"{folder}: processor tile size {spec.tile_size} != vision image_size {vc.image_size}; "
                          f"fix preprocessor_config.json max_image_size")
    g = torch.Generator().manual_seed(0)
    n_pos = (vc.image_size // vc.patch_size) ** 2
    inputs = {"pixel_values": torch.randn(2, vc.num_channels, vc.image_size, vc.image_size, generator=g),
              "patch_position_ids": torch.arange(n_pos).expand(2, n_pos).contiguous()}
    dyn = {"pixel_values": {0: "tiles"}, "patch_position_ids": {0: "tiles"}, "image_features": {0: "rows"}}
    return _Family("idefics3", model.model.text_model, model.lm_head, Idefics3VisionGraph(model.model),
                   inputs, dyn, spec, "rope", int(cfg.image_token_id))


def _qwen3(model: torch.nn.Module, folder: Path) -> _Family:
    from linecam.export.vlm import qwen3

    return qwen3.family(model, folder, _read_json(folder / "preprocessor_config.json"), _Family)


FAMILIES = {"qwen2_5_vl": _qwen, "idefics3": _idefics3, "qwen3_5": _qwen3, "qwen3_vl": _qwen3}


def _onnx_export(module: torch.nn.Module, args: tuple, path: Path, input_names: list[str],
                 output_names: list[str], dynamic_axes: dict[str, dict[int, str]], opset: int) -> None:
    # The TorchScript exporter (dynamo=False) traces these wrappers reliably; the dynamo
    # exporter still trips over transformers' masking utilities (see the VLM notes).
    # Over 2 GB the exporter scatters one external file per weight next to the graph: export into a
    # scratch folder and keep one <name>.data beside <name> (linecam.export.quantize's writer).
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as tmp:
        tmp_path = Path(tmp) / path.name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.no_grad():
                torch.onnx.export(module, args, str(tmp_path), input_names=input_names, output_names=output_names,
                                  dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False,
                                  do_constant_folding=True)
        Path(f"{path}.data").unlink(missing_ok=True)
        if len(os.listdir(tmp)) == 1:
            os.replace(tmp_path, path)
        else:  # (a proto over 2 GB cannot even be sized: save with its weights outside right away)
            import onnx

            onnx.save_model(onnx.load(str(tmp_path)), str(path), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=f"{path.name}.data", size_threshold=1024)
            os.chmod(f"{path}.data", 0o644)


def _check(path: Path, feeds: dict[str, np.ndarray], expect: list[np.ndarray], what: str,
           atol: float = PARITY_ATOL) -> float:
    from linecam.runtime.session import make_session

    sess = make_session(path, hint="the exported graph does not load: a bug in the export")
    outs = sess.run(None, feeds)
    worst = 0.0
    for o, e in zip(outs, expect):
        if o.shape != e.shape:
            raise BundleError(f"exported {what} graph gives shape {o.shape}, torch {e.shape}: the export is "
                              f"wrong; report it with your transformers/torch versions")
        worst = max(worst, float(np.abs(o.astype(np.float64) - e).max()) if o.size else 0.0)
    if worst > atol:
        raise BundleError(f"exported {what} graph differs from torch by {worst:.2e} (> {atol:g}): the export is "
                          f"wrong; report it with your transformers/torch versions")
    return worst


def _prompt_format(folder: Path, family: str) -> str:
    """Render the model's chat template once with sentinels; fall back to the family default."""
    try:
        from linecam.export.vlm.processor import load_hf_processor

        proc = load_hf_processor(folder)
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": _SENTINEL}]}]
        text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # no processor / no template: a tiny or custom model
        logger.info("no usable chat template in %s (%s); using the %s default", folder, type(e).__name__, family)
        return DEFAULT_FORMATS[family]
    placeholder = "<|vision_start|><|image_pad|><|vision_end|>" if family in QWEN_STYLE else "<image>"
    if placeholder not in text or _SENTINEL not in text:
        logger.warning("chat template of %s has no %r image placeholder; using the %s default",
                       folder, placeholder, family)
        return DEFAULT_FORMATS[family]
    return text.replace(placeholder, "{image}", 1).replace(_SENTINEL, "{prompt}")


def load_hf_model(folder: Path) -> tuple[torch.nn.Module, str]:
    """Load a local VLM folder (never the network) in FP32 with eager attention."""
    from transformers import AutoConfig

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise BundleError(f"{folder} has no config.json: give --model a local Hugging Face model folder")
    cfg = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    family = cfg.model_type
    if family not in FAMILIES:
        raise BundleError(f"{folder} is a '{family}' model; export-engine vlm supports: "
                          f"{', '.join(sorted(FAMILIES))}")
    import transformers

    cls = getattr(transformers, MODEL_CLASSES[family])
    model = cls.from_pretrained(str(folder), local_files_only=True, torch_dtype=torch.float32,
                                attn_implementation="eager").eval()
    return model, family


def export_vlm(model_dir: str | Path, out: str | Path, *, name: str | None = None,
               quantize: tuple[str, ...] = ("int8", "int4"), fp16: bool = False, opset: int = OPSET,
               agreement_prompts: int = 4, agreement_tokens: int = 16) -> Path:
    """Export ``model_dir`` to the bundle folder ``out``; returns the manifest path.

    ``quantize``: weight-only decoder variants to add ("int8", "int4"); their greedy-token
    agreement with FP32 on a fixed prompt set is measured and stored in the manifest.
    ``fp16``: also write FP16 vision / decoder graphs (for GPU).
    """
    model_dir, out = Path(model_dir), Path(out)
    model, family = load_hf_model(model_dir)
    fam = FAMILIES[family](model, model_dir)
    out.mkdir(parents=True, exist_ok=True)
    tcfg = model.config.text_config if hasattr(model.config, "text_config") else model.config
    checks: dict[str, float] = {}

    # 1. vision
    vnames = list(fam.vision_inputs)
    vpath = out / "vision.onnx"
    _onnx_export(fam.vision, tuple(fam.vision_inputs.values()), vpath, vnames, list(fam.vision_outputs),
                 fam.vision_dynamic, opset)
    with torch.no_grad():
        vref = fam.vision(*fam.vision_inputs.values())
    vref = [t.numpy() for t in (vref if isinstance(vref, tuple) else (vref,))]
    checks["vision"] = _check(vpath, {k: v.numpy() for k, v in fam.vision_inputs.items()}, vref, "vision")

    # 2. embedding
    emb = EmbeddingGraph(fam.text_model.embed_tokens)
    ids = torch.tensor([[1, 2, 3, 4, 5]], dtype=torch.int64)
    epath = out / "embedding.onnx"
    _onnx_export(emb, (ids,), epath, ["input_ids"], ["inputs_embeds"],
                 {"input_ids": {0: "batch", 1: "seq"}, "inputs_embeds": {0: "batch", 1: "seq"}}, opset)
    with torch.no_grad():
        checks["embedding"] = _check(epath, {"input_ids": ids.numpy()}, [emb(ids).numpy()], "embedding")

    # 3. decoder (traced with a non-empty past so the concat and mask paths are dynamic)
    if fam.export_decoder is not None:
        checks.update(fam.export_decoder(out, opset, _onnx_export, _check))
    else:
        checks.update(_export_kv_decoder(fam, tcfg, out, opset))
    logger.info("graphs exported; max |ORT - torch|: %s", {k: f"{v:.1e}" for k, v in checks.items()})
    _write_bundle(fam, family, model_dir, out, tcfg, checks, name, opset)
    if fp16 or quantize:
        from linecam.export.vlm.quantize import add_variants

        add_variants(out, quantize=quantize, fp16=fp16, n_prompts=agreement_prompts,
                     n_tokens=agreement_tokens)
    return out / "manifest.json"


def _export_kv_decoder(fam: _Family, tcfg: Any, out: Path, opset: int) -> dict[str, float]:
    n_layers = tcfg.num_hidden_layers
    n_kv = tcfg.num_key_value_heads
    head_dim = getattr(tcfg, "head_dim", None) or tcfg.hidden_size // tcfg.num_attention_heads
    checks: dict[str, float] = {}
    dec = DecoderGraph(fam.text_model, fam.lm_head).eval()
    s, p = 5, 3
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, s, tcfg.hidden_size, generator=g)
    mask = torch.ones(1, p + s, dtype=torch.int64)
    pos = torch.arange(p, p + s).view(1, s)
    if fam.positions == "mrope":
        pos = pos.view(1, 1, s).expand(3, 1, s).contiguous()
    past = [torch.randn(1, n_kv, p, head_dim, generator=g) for _ in range(2 * n_layers)]
    in_names = ["inputs_embeds", "attention_mask", "position_ids"]
    out_names = ["logits"]
    dyn: dict[str, dict[int, str]] = {"inputs_embeds": {0: "batch", 1: "seq"},
                                      "attention_mask": {0: "batch", 1: "total"},
                                      "position_ids": ({1: "batch", 2: "seq"} if fam.positions == "mrope"
                                                       else {0: "batch", 1: "seq"}),
                                      "logits": {0: "batch"}}
    for i in range(n_layers):
        for kv in ("key", "value"):
            in_names.append(f"past.{i}.{kv}")
            out_names.append(f"present.{i}.{kv}")
            dyn[f"past.{i}.{kv}"] = {0: "batch", 2: "past"}
            dyn[f"present.{i}.{kv}"] = {0: "batch", 2: "total"}
    dpath = out / "decoder.onnx"
    args = (x, mask, pos, *past)
    _onnx_export(dec, args, dpath, in_names, out_names, dyn, opset)
    with torch.no_grad():
        ref = [t.numpy() for t in dec(*args)]
    checks["decoder"] = _check(dpath, {n: a.numpy() for n, a in zip(in_names, args)}, ref, "decoder")
    # An empty past (the prefill case) must work too.
    args0 = (x, torch.ones(1, s, dtype=torch.int64), pos - p, *[t[:, :, :0] for t in past])
    with torch.no_grad():
        ref0 = [t.numpy() for t in dec(*args0)]
    checks["decoder_prefill"] = _check(dpath, {n: a.numpy() for n, a in zip(in_names, args0)}, ref0,
                                       "decoder (empty cache)")
    return checks


def _write_bundle(fam: _Family, family: str, model_dir: Path, out: Path, tcfg: Any,
                  checks: dict[str, float], name: str | None, opset: int) -> None:
    n_layers = tcfg.num_hidden_layers
    n_kv = tcfg.num_key_value_heads
    head_dim = getattr(tcfg, "head_dim", None) or tcfg.hidden_size // tcfg.num_attention_heads

    # 4. tokenizer, template, manifest
    if not (model_dir / "tokenizer.json").is_file():
        raise BundleError(f"{model_dir} has no tokenizer.json (the edge runtime reads only that format): "
                          f"save the tokenizer with a fast tokenizer (tokenizer.save_pretrained)")
    copied = []
    for fname in TOKENIZER_FILES:
        if (model_dir / fname).is_file():
            shutil.copyfile(model_dir / fname, out / fname)
            copied.append(fname)
    gen = _read_json(model_dir / "generation_config.json")
    eos = gen.get("eos_token_id", getattr(tcfg, "eos_token_id", None))
    eos_ids = [int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
    files = {"vision_fp32": file_entry(out, "vision.onnx"),
             "embedding_fp32": file_entry(out, "embedding.onnx"),
             "decoder_fp32": file_entry(out, "decoder.onnx"),
             "tokenizer": file_entry(out, "tokenizer.json")}
    if (out / "decoder_contrib.onnx").is_file():  # hybrid decoders: the contrib-op twin
        files["decoder_contrib_fp32"] = file_entry(out, "decoder_contrib.onnx")
    for kind in ("vision", "embedding", "decoder", "decoder_contrib"):  # over 2 GB: weights listed and hashed too
        if (out / f"{kind}.onnx.data").is_file():
            files[f"{kind}_fp32_data"] = file_entry(out, f"{kind}.onnx.data")
    for fname in copied:
        if fname not in ("tokenizer.json",):
            files[fname.split(".")[0]] = file_entry(out, fname)
    import transformers

    manifest = VlmManifest(
        name=name or model_dir.name, family=family,
        text=TextSpec(hidden_size=tcfg.hidden_size, num_layers=n_layers, num_kv_heads=n_kv, head_dim=head_dim,
                      vocab_size=tcfg.vocab_size, positions=fam.positions, image_token_id=fam.image_token_id,
                      eos_token_ids=eos_ids, pad_token_id=getattr(tcfg, "pad_token_id", None),
                      layer_types=fam.layer_types),
        vision=fam.vision_spec, prompt=PromptSpec(format=_prompt_format(model_dir, family)), files=files,
        provenance=new_provenance(tool_versions={"torch": torch.__version__,
                                                 "transformers": transformers.__version__},
                                  details={"source": str(model_dir), "opset": opset,
                                           "max_abs_diff": checks}),
        extra={"linear_attention_ops": LINEAR_ATTENTION_OPS} if fam.layer_types else {})
    write_manifest(out, manifest)
