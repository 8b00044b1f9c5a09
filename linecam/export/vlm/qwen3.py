"""``export-engine vlm`` for Qwen3.5 and Qwen3-VL: vision spec + graph, the hybrid decoder
(Qwen3.5) and the deepstack decoder (Qwen3-VL) exports.

Registered in :data:`linecam.export.vlm.export.FAMILIES`; the graphs are in
:mod:`linecam.export.vlm.hybrid`, the host-side vision inputs in
:mod:`linecam.runtime.vlm.qwen3`.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch

from linecam.export.vlm.hybrid import DeepstackDecoderGraph, HybridDecoderGraph, Qwen3VisionGraph, state_names
from linecam.runtime.vlm import qwen3 as host
from linecam.runtime.vlm.bundle import Qwen3VisionSpec

def vision_spec(model: torch.nn.Module, folder: Path, pp: dict) -> Qwen3VisionSpec:
    vc = model.config.vision_config
    size = pp.get("size") or {}
    return Qwen3VisionSpec(
        patch_size=vc.patch_size, temporal_patch_size=vc.temporal_patch_size, merge_size=vc.spatial_merge_size,
        head_dim=vc.hidden_size // vc.num_heads,
        rope_theta=float((getattr(vc, "rope_parameters", None) or {}).get("rope_theta", 10000.0)),
        num_grid_per_side=int(vc.num_position_embeddings ** 0.5),
        min_pixels=int(pp.get("min_pixels") or size.get("shortest_edge") or 56 * 56),
        max_pixels=int(pp.get("max_pixels") or size.get("longest_edge") or 28 * 28 * 1280),
        image_mean=list(pp.get("image_mean", [0.5, 0.5, 0.5])), image_std=list(pp.get("image_std", [0.5, 0.5, 0.5])))


def family(model: torch.nn.Module, folder: Path, pp: dict, family_cls: Any) -> Any:
    """The export plan (``export._Family``) of a Qwen3.5 or Qwen3-VL model."""
    name = model.config.model_type
    spec = vision_spec(model, folder, pp)
    graph, inputs, dyn = vision_inputs(model, spec)
    tcfg = model.config.text_config
    text_model = model.model.language_model
    if name == "qwen3_5":
        return family_cls(name, text_model, model.lm_head, graph, inputs, dyn, spec, "mrope",
                          int(model.config.image_token_id), list(tcfg.layer_types),
                          export_decoder=partial(export_hybrid_decoder, text_model, model.lm_head, tcfg))
    dyn["deepstack_features"] = {1: "merged"}
    return family_cls(name, text_model, model.lm_head, graph, inputs, dyn, spec, "mrope",
                      int(model.config.image_token_id), None, ("image_features", "deepstack_features"),
                      partial(export_deepstack_decoder, text_model, model.lm_head, tcfg,
                              len(model.config.vision_config.deepstack_visual_indexes)))


def vision_inputs(model: torch.nn.Module, spec: Qwen3VisionSpec) -> tuple[torch.nn.Module, dict, dict]:
    """The vision wrapper, example inputs (a non-square grid) and dynamic axes."""
    vc = model.config.vision_config
    m = spec.merge_size
    grid = (1, 4 * m, 6 * m)
    n = grid[1] * grid[2]
    g = torch.Generator().manual_seed(0)
    pv = torch.randn(n, vc.in_channels * spec.temporal_patch_size * spec.patch_size ** 2, generator=g).numpy()
    feeds = host.vision_feeds(pv, grid, side=spec.num_grid_per_side, merge=m, head_dim=spec.head_dim,
                              theta=spec.rope_theta)
    inputs = {k: torch.from_numpy(v) for k, v in feeds.items()}
    dyn = {k: {0: "patches"} for k in inputs} | {"image_features": {0: "merged"}}
    return Qwen3VisionGraph(model.model.visual), inputs, dyn


def export_hybrid_decoder(text_model: torch.nn.Module, lm_head: torch.nn.Module, tcfg, out: Path, opset: int,
                          export, check) -> dict[str, float]:
    """Write ``decoder.onnx`` (plain ops) and ``decoder_contrib.onnx`` (ONNX Runtime's linear-attention
    contrib ops) for a hybrid text model; check each against torch with a non-empty cache, the empty
    cache of a prefill and a one-token step. Returns the max differences."""
    layer_types = list(tcfg.layer_types)
    la = next(layer.linear_attn for layer, lt in zip(text_model.layers, layer_types) if lt == "linear_attention")
    head_dim = getattr(tcfg, "head_dim", None) or tcfg.hidden_size // tcfg.num_attention_heads
    s, p = 5, 3
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, s, tcfg.hidden_size, generator=g)
    pos = torch.arange(p, p + s).view(1, 1, s).expand(3, 1, s).contiguous()

    def states(past: int, scale: float) -> list[torch.Tensor]:
        out_: list[torch.Tensor] = []
        for lt in layer_types:
            if lt == "linear_attention":
                out_ += [scale * torch.randn(1, la.conv_dim, la.conv_kernel_size - 1, generator=g),
                         scale * torch.randn(1, la.num_v_heads, la.head_k_dim, la.head_v_dim, generator=g)]
            else:
                out_ += [torch.randn(1, tcfg.num_key_value_heads, past, head_dim, generator=g) for _ in range(2)]
        return out_

    past = states(p, 0.5)
    in_names = ["inputs_embeds", "attention_mask", "position_ids", *state_names(layer_types, "past_key_values")]
    out_names = ["logits", *state_names(layer_types, "present")]
    dyn: dict[str, dict[int, str]] = {"inputs_embeds": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
                                      "position_ids": {1: "batch", 2: "seq"}, "logits": {0: "batch"}}
    for name in in_names[3:] + out_names[1:]:
        kv = name.endswith((".key", ".value"))
        dyn[name] = {0: "batch", 2: ("past" if name.startswith("past") else "total")} if kv else {0: "batch"}
    cases = {"": (x, torch.ones(1, p + s, dtype=torch.int64), pos, *past),
             "_prefill": (x, torch.ones(1, s, dtype=torch.int64), pos - p, *states(0, 0.0)),
             "_step": (x[:, :1], torch.ones(1, p + 1, dtype=torch.int64), pos[:, :, :1], *past)}
    checks = {}
    for contrib, fname in ((False, "decoder.onnx"), (True, "decoder_contrib.onnx")):
        dec = HybridDecoderGraph(text_model, lm_head, layer_types, contrib=contrib).eval()
        path = out / fname
        export(dec, cases[""], path, in_names, out_names, dyn, opset)
        for suffix, args in cases.items():
            with torch.no_grad():
                ref = [t.numpy() for t in dec(*args)]
            what = f"{path.stem}{suffix}"
            checks[what] = check(path, {n: a.numpy() for n, a in zip(in_names, args)}, ref, what)
    return checks


def export_deepstack_decoder(text_model: torch.nn.Module, lm_head: torch.nn.Module, tcfg, n_deep: int, out: Path,
                             opset: int, export, check) -> dict[str, float]:
    """Write ``decoder.onnx`` for Qwen3-VL (flat KV cache + ``deepstack_embeds``); check it against torch."""
    dec = DeepstackDecoderGraph(text_model, lm_head).eval()
    n_layers = tcfg.num_hidden_layers
    head_dim = getattr(tcfg, "head_dim", None) or tcfg.hidden_size // tcfg.num_attention_heads
    s, p = 5, 3
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, s, tcfg.hidden_size, generator=g)
    deep = torch.randn(n_deep, 1, s, tcfg.hidden_size, generator=g)
    deep[:, :, :2] = 0  # text rows
    pos = torch.arange(p, p + s).view(1, 1, s).expand(3, 1, s).contiguous()
    past = [torch.randn(1, tcfg.num_key_value_heads, p, head_dim, generator=g) for _ in range(2 * n_layers)]
    names = ["key", "value"]
    in_names = ["inputs_embeds", "attention_mask", "position_ids", "deepstack_embeds",
                *[f"past_key_values.{i}.{n}" for i in range(n_layers) for n in names]]
    out_names = ["logits", *[f"present.{i}.{n}" for i in range(n_layers) for n in names]]
    dyn: dict[str, dict[int, str]] = {"inputs_embeds": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
                                      "position_ids": {1: "batch", 2: "seq"}, "deepstack_embeds": {1: "batch", 2: "seq"},
                                      "logits": {0: "batch"}}
    dyn.update({n: {0: "batch", 2: "past"} for n in in_names[4:]})
    dyn.update({n: {0: "batch", 2: "total"} for n in out_names[1:]})
    path = out / "decoder.onnx"
    args = (x, torch.ones(1, p + s, dtype=torch.int64), pos, deep, *past)
    export(dec, args, path, in_names, out_names, dyn, opset)
    checks = {}
    for what, a in (("decoder", args),
                    ("decoder_prefill", (x, torch.ones(1, s, dtype=torch.int64), pos - p, deep,
                                         *[t[:, :, :0] for t in past]))):
        with torch.no_grad():
            ref = [t.numpy() for t in dec(*a)]
        checks[what] = check(path, {n: v.numpy() for n, v in zip(in_names, a)}, ref, what)
    return checks
