"""torch modules that wrap a Hugging Face VLM into the three exportable graphs.

The standard split (see the VLM notes): ``vision`` (encoder + projector), ``embedding``
(token ids -> rows) and ``decoder`` (``inputs_embeds`` + flat KV cache -> last-token
logits + new KV cache). Each wrapper calls the model's own sub-modules, so numerics are
transformers' own; only what does not trace (Python loops over image grids, cache
objects) is replaced by tensors the runtime computes on the host.
"""

from __future__ import annotations

import torch
from torch import nn


def causal_mask(inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Causal + padding mask, additive like transformers' eager path: query i (absolute position
    t - s + i) may see key j iff j <= t - s + i and attention_mask[j] == 1 (every decoder graph)."""
    s, t = inputs_embeds.shape[1], attention_mask.shape[1]
    dtype = inputs_embeds.dtype
    q_pos = torch.arange(s, device=inputs_embeds.device).unsqueeze(1) + (t - s)
    k_pos = torch.arange(t, device=inputs_embeds.device).unsqueeze(0)
    allowed = (k_pos <= q_pos).unsqueeze(0).unsqueeze(0) & (attention_mask[:, None, None, :] > 0)
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


class _FlatKV:
    """Duck-typed stand-in for transformers' ``Cache``: flat tensors in, flat tensors out.

    Attention layers call ``update(key, value, layer_idx)`` and attend over what it
    returns; we concatenate the graph's ``past`` inputs and keep the result as the
    graph's ``present`` outputs, which makes the KV cache plain graph I/O.
    """

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.past = past
        self.present: list[tuple[torch.Tensor, torch.Tensor]] = []

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        pk, pv = self.past[layer_idx]
        k = torch.cat([pk, key], dim=2)
        v = torch.cat([pv, value], dim=2)
        self.present.append((k, v))
        return k, v

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.past[layer_idx][0].shape[2]


class DecoderGraph(nn.Module):
    """``(inputs_embeds, attention_mask, position_ids, past.0.key, past.0.value, ...)`` ->
    ``(logits [B, 1, V], present.0.key, present.0.value, ...)``.

    ``position_ids`` is ``[3, B, S]`` for M-RoPE models (Qwen-VL) and ``[B, S]`` otherwise;
    ``attention_mask`` ``[B, past + S]`` (1 = attend). Logits are computed for the last
    position only: that is all greedy decoding needs, and the vocabulary projection of
    every prompt position would dominate prefill on a small model.
    """

    def __init__(self, text_model: nn.Module, lm_head: nn.Module) -> None:
        super().__init__()
        self.layers = text_model.layers
        self.norm = text_model.norm
        self.rotary_emb = text_model.rotary_emb
        self.lm_head = lm_head
        self.n_layers = len(self.layers)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor):
        mask = causal_mask(inputs_embeds, attention_mask)
        cos, sin = self.rotary_emb(inputs_embeds, position_ids)
        cache = _FlatKV([(past[2 * i], past[2 * i + 1]) for i in range(self.n_layers)])
        text_pos = position_ids[0] if position_ids.dim() == 3 else position_ids
        h = inputs_embeds
        for layer in self.layers:
            h = layer(h, attention_mask=mask, position_ids=text_pos, past_key_values=cache, use_cache=True,
                      position_embeddings=(cos, sin))
            if isinstance(h, tuple):  # older transformers return (hidden, ...)
                h = h[0]
        logits = self.lm_head(self.norm(h[:, -1:, :]))
        out = [logits]
        for k, v in cache.present:
            out += [k, v]
        return tuple(out)


class EmbeddingGraph(nn.Module):
    """``input_ids [B, S]`` -> ``inputs_embeds [B, S, H]`` (image rows are written by the host)."""

    def __init__(self, embed_tokens: nn.Module) -> None:
        super().__init__()
        self.embed_tokens = embed_tokens

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)


class QwenVisionGraph(nn.Module):
    """Qwen2.5-VL vision encoder + merger with host-computed rotary, windows and masks.

    Inputs: ``pixel_values [n, C*T*P*P]``, ``rotary_cos/sin [n, head_dim]`` (already in
    window order), ``window_index`` / ``reverse_index`` ``[n / merge^2]``, ``full_mask`` and
    ``window_mask`` ``[n, n]`` additive. Output: ``image_features [n / merge^2, text_hidden]``.
    Masked full attention replaces transformers' per-chunk loop (masked keys get exactly
    zero weight), so any image size runs through one graph.
    """

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.patch_embed = visual.patch_embed
        self.blocks = visual.blocks
        self.merger = visual.merger
        self.unit = visual.spatial_merge_unit
        self.fullatt = set(int(i) for i in visual.fullatt_block_indexes)

    def _attn(self, attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              mask: torch.Tensor) -> torch.Tensor:
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

        n = x.shape[0]
        q, k, v = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        q, k, v = (y.transpose(0, 1) for y in (q, k, v))  # [heads, n, hd]
        w = torch.matmul(q, k.transpose(1, 2)) * attn.scaling + mask
        w = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        o = torch.matmul(w, v).transpose(0, 1).reshape(n, -1)
        return attn.proj(o)

    def forward(self, pixel_values: torch.Tensor, rotary_cos: torch.Tensor, rotary_sin: torch.Tensor,
                window_index: torch.Tensor, reverse_index: torch.Tensor, full_mask: torch.Tensor,
                window_mask: torch.Tensor) -> torch.Tensor:
        h = self.patch_embed(pixel_values)
        n = h.shape[0]
        h = h.reshape(n // self.unit, self.unit, -1)[window_index].reshape(n, -1)
        for i, blk in enumerate(self.blocks):
            mask = full_mask if i in self.fullatt else window_mask
            h = h + self._attn(blk.attn, blk.norm1(h), rotary_cos, rotary_sin, mask)
            h = h + blk.mlp(blk.norm2(h))
        merged = self.merger(h)
        return merged[reverse_index]


class Idefics3VisionGraph(nn.Module):
    """Idefics3 (SmolVLM) SigLIP encoder + pixel-shuffle connector for full, unpadded tiles.

    Input: ``pixel_values [n_tiles, 3, S, S]`` (every tile is exactly the encoder's image
    size, so every patch is real and patch positions are ``0 .. P-1``; the host passes
    them as ``patch_position_ids [n_tiles, P]`` because transformers computes them with
    ``bucketize``, which the exporter lacks). Output: ``image_features [n_tiles * L, text_hidden]``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        vm = model.vision_model
        self.patch_embedding = vm.embeddings.patch_embedding
        self.position_embedding = vm.embeddings.position_embedding
        self.layers = vm.encoder.layers
        self.post_layernorm = vm.post_layernorm
        self.connector = model.connector

    def forward(self, pixel_values: torch.Tensor, patch_position_ids: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        x = x + self.position_embedding(patch_position_ids)
        for layer in self.layers:
            x = layer(x, None)
            if isinstance(x, tuple):
                x = x[0]
        x = self.post_layernorm(x)
        feats = self.connector(x)
        return feats.reshape(-1, feats.shape[-1])
