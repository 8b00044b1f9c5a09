"""Exportable graphs of the Qwen3 families: Qwen3.5's hybrid decoder, Qwen3-VL's deepstack
decoder and the Qwen3-style vision encoder they share.

Qwen3.5's decoder is hybrid: most layers are Gated-DeltaNet linear attention (a causal
depthwise convolution with a state of the last ``K - 1`` inputs, then the gated delta
rule with a ``[heads, k_dim, v_dim]`` recurrent state); every ``full_attention_interval``-th
layer is gated full attention with a KV cache. :class:`HybridDecoderGraph` makes every
state plain graph I/O, named as onnxruntime-genai's ``qwen3_5`` does:
``past_key_values.N.key`` / ``.value`` (full-attention layers), ``past_key_values.N.conv_state``
/ ``.recurrent_state`` (linear-attention layers, always FP32), and ``present.N.*`` out.

Two graphs of the same layers: ``plain`` ops only (the delta rule is a scripted loop over
the sequence, an ONNX ``Loop``; the convolution Concat + Conv + Slice), which TensorRT and
every ONNX Runtime provider run; and ``contrib``: ONNX Runtime's ``com.microsoft``
``CausalConvWithState`` and ``LinearAttention`` (``update_rule="gated_delta"``), fused
kernels on its CPU and CUDA providers (ORT >= 1.31). The same recurrence as transformers'
recurrent kernel; its chunked prefill kernel is the same recurrence reassociated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from linecam.export.vlm.graphs import _FlatKV, causal_mask


def _delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
               state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated delta rule over ``S`` steps. ``q, k [B, H, S, Dk]`` (normalised, q scaled), ``v [B, H, S, Dv]``,
    ``g, beta [B, H, S]``, ``state [B, H, Dk, Dv]`` -> ``(out [B, H, S, Dv], state)``."""
    outs = []
    for i in range(q.shape[2]):
        state = state * g[:, :, i].exp().unsqueeze(-1).unsqueeze(-1)
        kt = k[:, :, i]
        kv_mem = (state * kt.unsqueeze(-1)).sum(-2)
        delta = (v[:, :, i] - kv_mem) * beta[:, :, i].unsqueeze(-1)
        state = state + kt.unsqueeze(-1) * delta.unsqueeze(-2)
        outs.append((state * q[:, :, i].unsqueeze(-1)).sum(-2))
    return torch.stack(outs, 2), state


#: Scripted, so the plain graph gets an ONNX Loop over the sequence instead of a traced, fixed-length unroll.
delta_rule = torch.jit.script(_delta_rule)


class _CausalConvOp(torch.autograd.Function):
    """``com.microsoft::CausalConvWithState`` (SiLU fused) in the graph; eager: Concat + Conv + Slice."""

    @staticmethod
    def forward(ctx, x, weight, bias, state):  # noqa: ARG004
        full = torch.cat([state, x], dim=-1)
        out = F.silu(F.conv1d(full, weight, bias, groups=full.shape[1]))
        return out, full[:, :, full.shape[2] - state.shape[2]:]

    @staticmethod
    def symbolic(g, x, weight, bias, state):
        return g.op("com.microsoft::CausalConvWithState", x, weight, bias, state, activation_s="silu", outputs=2)


class _LinearAttentionOp(torch.autograd.Function):
    """``com.microsoft::LinearAttention`` (gated delta rule) in the graph; eager: :func:`delta_rule`.
    ``q, k [B, T, H*Dk]`` (L2-normalised, q not yet scaled), ``v [B, T, H*Dv]``, ``g, beta [B, T, H]``."""

    @staticmethod
    def forward(ctx, q, k, v, state, g, beta, heads):  # noqa: ARG004
        b, t = q.shape[:2]
        q4, k4, v4 = (x.reshape(b, t, heads, -1).transpose(1, 2) for x in (q, k, v))
        out, new = _delta_rule(q4 / (q4.shape[-1] ** 0.5), k4, v4, g.transpose(1, 2), beta.transpose(1, 2), state)
        return out.transpose(1, 2).reshape(b, t, -1), new

    @staticmethod
    def symbolic(g, q, k, v, state, decay, beta, heads):
        return g.op("com.microsoft::LinearAttention", q, k, v, state, decay, beta, q_num_heads_i=heads,
                    kv_num_heads_i=heads, update_rule_s="gated_delta", outputs=2)


def _l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def linear_attention(la: nn.Module, x: torch.Tensor, conv_state: torch.Tensor, rec_state: torch.Tensor,
                     contrib: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Gated-DeltaNet token mixer (transformers' ``Qwen3_5GatedDeltaNet``) on explicit states.

    ``conv_state [B, conv_dim, K - 1]`` (the last inputs of the convolution; zeros before the
    first token), ``rec_state [B, Hv, Dk, Dv]``. Returns ``(out, conv_state, rec_state)``.
    """
    b, s, _ = x.shape
    mixed = la.in_proj_qkv(x).transpose(1, 2)  # [B, conv_dim, S]
    z = la.in_proj_z(x).reshape(b, s, -1, la.head_v_dim)
    beta = la.in_proj_b(x).sigmoid()
    g = -la.A_log.float().exp() * F.softplus(la.in_proj_a(x).float() + la.dt_bias)
    if contrib:
        if la.activation not in ("silu", "swish"):
            raise ValueError("the contrib-op graph covers SiLU convolutions (Qwen3.5's)")
        bias = la.conv1d.bias if la.conv1d.bias is not None else torch.zeros(la.conv_dim, dtype=mixed.dtype)
        conv, new_conv = _CausalConvOp.apply(mixed, la.conv1d.weight, bias, conv_state.to(mixed.dtype))
    else:
        full = torch.cat([conv_state.to(mixed.dtype), mixed], dim=-1)  # [B, conv_dim, K - 1 + S]
        new_conv = full[:, :, full.shape[2] - (la.conv_kernel_size - 1):]
        conv = F.conv1d(full, la.conv1d.weight, la.conv1d.bias, groups=full.shape[1])  # [B, conv_dim, S]
        conv = F.silu(conv) if la.activation in ("silu", "swish") else getattr(F, la.activation)(conv)
    q, k, v = torch.split(conv.transpose(1, 2), [la.key_dim, la.key_dim, la.value_dim], dim=-1)
    q = q.reshape(b, s, -1, la.head_k_dim)
    k = k.reshape(b, s, -1, la.head_k_dim)
    v = v.reshape(b, s, -1, la.head_v_dim)
    if la.num_v_heads != la.num_k_heads:
        rep = la.num_v_heads // la.num_k_heads
        q, k = q.repeat_interleave(rep, dim=2), k.repeat_interleave(rep, dim=2)
    if contrib:
        q, k = _l2norm(q.float()).reshape(b, s, -1), _l2norm(k.float()).reshape(b, s, -1)
        core, new_rec = _LinearAttentionOp.apply(q, k, v.float().reshape(b, s, -1), rec_state.float(), g.float(),
                                                 beta.float(), la.num_v_heads)
        core = core.to(x.dtype).reshape(-1, la.head_v_dim)
    else:
        q, k, v, beta, g = (t.transpose(1, 2).float() for t in (q, k, v, beta, g))
        q = _l2norm(q) / (q.shape[-1] ** 0.5)
        k = _l2norm(k)
        core, new_rec = delta_rule(q, k, v, g, beta, rec_state.float())
        core = core.transpose(1, 2).to(x.dtype).reshape(-1, la.head_v_dim)
    core = la.norm(core, z.reshape(-1, la.head_v_dim)).reshape(b, s, -1)
    return la.out_proj(core), new_conv.float(), new_rec


class HybridDecoderGraph(nn.Module):
    """``(inputs_embeds, attention_mask, position_ids [3, B, S], *states)`` -> ``(logits [B, 1, V], *present)``.

    ``states`` in layer order: ``key, value`` for a full-attention layer, ``conv_state,
    recurrent_state`` for a linear-attention one (see :func:`state_names`).
    """

    def __init__(self, text_model: nn.Module, lm_head: nn.Module, layer_types: list[str],
                 contrib: bool = False) -> None:
        super().__init__()
        self.contrib = contrib
        self.layers = text_model.layers
        self.norm = text_model.norm
        self.rotary_emb = text_model.rotary_emb
        self.lm_head = lm_head
        self.layer_types = list(layer_types)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor):
        mask = causal_mask(inputs_embeds, attention_mask)
        cos, sin = self.rotary_emb(inputs_embeds, position_ids)
        kv_layers = [i for i, lt in enumerate(self.layer_types) if lt == "full_attention"]
        cache = _FlatKV({i: (past[2 * i], past[2 * i + 1]) for i in kv_layers})  # type: ignore[arg-type]
        present: list[torch.Tensor] = []
        h = inputs_embeds
        for i, layer in enumerate(self.layers):
            res = h
            x = layer.input_layernorm(h)
            if self.layer_types[i] == "linear_attention":
                x, conv, rec = linear_attention(layer.linear_attn, x, past[2 * i], past[2 * i + 1], self.contrib)
                present += [conv, rec]
            else:
                x, _ = layer.self_attn(hidden_states=x, position_embeddings=(cos, sin), attention_mask=mask,
                                       cache=cache)
                present += list(cache.present[-1])
            h = res + x
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        logits = self.lm_head(self.norm(h[:, -1:, :]))
        return (logits, *present)


def state_names(layer_types: list[str], prefix: str) -> list[str]:
    """Graph I/O names of the states, in :class:`HybridDecoderGraph`'s order (``prefix`` is
    ``past_key_values`` or ``present``)."""
    out = []
    for i, lt in enumerate(layer_types):
        parts = ("conv_state", "recurrent_state") if lt == "linear_attention" else ("key", "value")
        out += [f"{prefix}.{i}.{p}" for p in parts]
    return out


class DeepstackDecoderGraph(nn.Module):
    """Qwen3-VL's decoder: a flat KV cache (``past_key_values.N.key`` / ``.value``) plus
    ``deepstack_embeds [k, B, S, H]``, added to the hidden states after each of the first ``k``
    layers (zero rows for text tokens: transformers adds them at the image positions only).
    """

    def __init__(self, text_model: nn.Module, lm_head: nn.Module) -> None:
        super().__init__()
        self.layers = text_model.layers
        self.norm = text_model.norm
        self.rotary_emb = text_model.rotary_emb
        self.lm_head = lm_head

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                deepstack_embeds: torch.Tensor, *past: torch.Tensor):
        mask = causal_mask(inputs_embeds, attention_mask)
        cos, sin = self.rotary_emb(inputs_embeds, position_ids)
        cache = _FlatKV([(past[2 * i], past[2 * i + 1]) for i in range(len(self.layers))])
        h = inputs_embeds
        for i, layer in enumerate(self.layers):
            h = layer(h, attention_mask=mask, position_ids=position_ids[0], cache=cache,
                      position_embeddings=(cos, sin))
            if i < deepstack_embeds.shape[0]:
                h = h + deepstack_embeds[i].to(h.dtype)
        logits = self.lm_head(self.norm(h[:, -1:, :]))
        out = [logits]
        for k, v in cache.present:
            out += [k, v]
        return tuple(out)


class Qwen3VisionGraph(nn.Module):
    """Qwen3.5 / Qwen3-VL vision encoder + merger for one image, host-computed positions.

    Inputs: ``pixel_values [n, C*T*P*P]``, ``pos_indices`` / ``pos_weights [n, 4]`` (bilinear
    resampling of the learned position table to the image grid), ``rotary_cos`` /
    ``rotary_sin [n, head_dim]``. Output: ``image_features [n / merge^2, text_hidden]``, and for
    Qwen3-VL ``deepstack_features [k, n / merge^2, text_hidden]`` (the deepstack mergers' outputs).
    One image is one attention segment, so every patch attends to every patch.
    """

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.patch_embed = visual.patch_embed
        self.pos_embed = visual.pos_embed
        self.blocks = visual.blocks
        self.merger = visual.merger
        self.deepstack_index = [int(i) for i in getattr(visual, "deepstack_visual_indexes", None) or []]
        self.deepstack_mergers = getattr(visual, "deepstack_merger_list", None)

    @staticmethod
    def _attn(attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        from transformers.models.qwen3_5.modeling_qwen3_5 import apply_rotary_pos_emb_vision

        n = x.shape[0]
        q, k, v = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        q, k, v = (y.transpose(0, 1) for y in (q, k, v))  # [heads, n, hd]
        w = torch.matmul(q, k.transpose(1, 2)) * attn.scaling
        w = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        return attn.proj(torch.matmul(w, v).transpose(0, 1).reshape(n, -1))

    def forward(self, pixel_values: torch.Tensor, pos_indices: torch.Tensor, pos_weights: torch.Tensor,
                rotary_cos: torch.Tensor, rotary_sin: torch.Tensor) -> torch.Tensor:
        h = self.patch_embed(pixel_values)
        h = h + (self.pos_embed(pos_indices) * pos_weights[:, :, None]).sum(1).to(h.dtype)
        deep = []
        for i, blk in enumerate(self.blocks):
            h = h + self._attn(blk.attn, blk.norm1(h), rotary_cos, rotary_sin)
            h = h + blk.mlp(blk.norm2(h))
            if i in self.deepstack_index:
                deep.append(self.deepstack_mergers[self.deepstack_index.index(i)](h))
        if deep:
            return self.merger(h), torch.stack(deep)
        return self.merger(h)
