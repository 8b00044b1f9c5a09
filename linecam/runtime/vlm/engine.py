"""Run an exported VLM bundle with ONNX Runtime: image + prompt -> greedy tokens.

Three sessions (the standard split): ``vision`` turns the image into rows of
``inputs_embeds``, ``embedding`` turns token ids into rows, ``decoder`` runs the language
model over ``inputs_embeds`` with a flat KV cache. Everything that does not trace
(M-RoPE positions, vision rotary / windows / masks, patch positions) is computed here
on the host with numpy. Greedy decoding with stop tokens, a token budget, a streaming
callback and a cancel hook; CPU by default, CUDA where onnxruntime has it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort

from linecam.errors import BundleError
from linecam.runtime.vlm import image as vimg
from linecam.runtime.vlm import qwen3, rope
from linecam.runtime.session import make_session
from linecam.runtime.vlm.bundle import (
    Idefics3VisionSpec, Qwen3VisionSpec, QwenImageSpec, QwenVisionSpec, VlmBundle, load_vlm_bundle)

logger = logging.getLogger(__name__)

StopReason = Literal["stop_token", "max_tokens", "cancelled"]


@dataclass(slots=True)
class Encoded:
    """A prompt ready for the decoder: token ids, image features, positions."""

    input_ids: np.ndarray  # [1, S] int64
    vision_feeds: dict[str, np.ndarray]  # inputs of the vision graph (empty: text only)
    grids: list[rope.Grid] = field(default_factory=list)  # Qwen patch grids (for M-RoPE)
    vision_ms: float = 0.0
    #: Region-token injection (:mod:`.region_tokens`): (index, rows [k, hidden]) overwrite the
    #: embeddings of k placeholder ids at ``index``.
    injected: tuple[int, np.ndarray] | None = None

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.shape[1])


@dataclass(slots=True)
class Generation:
    tokens: list[int]  # generated ids, including the stop token when one ended it
    text: str
    stop_reason: StopReason
    prompt_tokens: int
    image_tokens: int
    #: vision, prefill (embedding + first decoder pass), ttft (call -> first token), decode, total.
    timings_ms: dict[str, float]

    @property
    def tokens_per_s(self) -> float:
        """Decode speed after the first token (the usual 'tokens/s')."""
        n = len(self.tokens) - 1
        d = self.timings_ms.get("decode", 0.0)
        return n / (d / 1e3) if n > 0 and d > 0 else 0.0


def available_providers(device: Literal["cpu", "cuda", "auto"] = "auto") -> list[str]:
    have = ort.get_available_providers()
    if device in ("cuda", "auto") and "CUDAExecutionProvider" in have:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise BundleError("device 'cuda' asked for but this onnxruntime has no CUDAExecutionProvider: "
                          "install onnxruntime-gpu or use device 'cpu'")
    return ["CPUExecutionProvider"]


def _session(path: Path, providers: list[str], threads: int) -> ort.InferenceSession:
    return make_session(path, providers=providers, intra_op_threads=threads, hint="re-export the VLM bundle")


_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
_DECODER_INPUTS = ("inputs_embeds", "attention_mask", "position_ids", "deepstack_embeds")


class VlmEngine:
    """One loaded VLM. Not thread-safe: one engine per worker thread.

    ``precision`` picks the decoder file (``decoder_<precision>``); vision and embedding
    use fp16 on CUDA when the bundle has them, fp32 otherwise. ``graph`` (hybrid Qwen3.5
    bundles, which carry two decoders): ``auto`` runs ``decoder_contrib_<precision>``
    (ONNX Runtime's fused linear-attention ops) on CPU, where it is faster, and the plain-op
    ``decoder_<precision>`` elsewhere; ``plain`` / ``contrib`` force one.
    """

    def __init__(self, bundle: VlmBundle | str | Path, *, precision: str = "fp32",
                 device: Literal["cpu", "cuda", "auto"] = "cpu", intra_op_threads: int = 0,
                 graph: Literal["auto", "plain", "contrib"] = "auto") -> None:
        from tokenizers import Tokenizer

        self.bundle = bundle if isinstance(bundle, VlmBundle) else load_vlm_bundle(bundle)
        man = self.bundle.manifest
        self.manifest = man
        self.precision = precision
        self.providers = available_providers(device)
        cuda = self.providers[0] == "CUDAExecutionProvider"

        def pick(kind: str) -> str:
            for prec in (["fp16"] if cuda else []) + ["fp32"]:
                if self.bundle.has(f"{kind}_{prec}"):
                    return f"{kind}_{prec}"
            return f"{kind}_fp32"  # path() raises the one-line error

        dec = f"decoder_{precision}"
        contrib = f"decoder_contrib_{precision}"
        if graph == "contrib" or (graph == "auto" and not cuda and self.bundle.has(contrib)):
            dec = contrib
        self.roles = {"vision": pick("vision"), "embedding": pick("embedding"), "decoder": dec}
        self.vision = _session(self.bundle.path(self.roles["vision"]), self.providers, intra_op_threads)
        self.embedding = _session(self.bundle.path(self.roles["embedding"]), self.providers, intra_op_threads)
        self.decoder = _session(self.bundle.path(self.roles["decoder"]), self.providers, intra_op_threads)
        self.tokenizer = Tokenizer.from_file(str(self.bundle.path("tokenizer")))
        # Cache inputs in graph order (a flat KV cache, or a hybrid decoder's KV + conv / recurrent
        # states); the decoder returns their successors in the same order after the logits.
        dec_in = self.decoder.get_inputs()
        self._state_inputs = [i for i in dec_in if i.name not in _DECODER_INPUTS]
        self._emb_dtype = _NP.get({i.name: i.type for i in dec_in}.get("inputs_embeds", "tensor(float)"), np.float32)
        # Qwen3-VL: vision features added inside the first k decoder layers at the image positions.
        deep = [i for i in dec_in if i.name == "deepstack_embeds"]
        self._n_deep = int(deep[0].shape[0]) if deep else 0
        self._out_names = [o.name for o in self.decoder.get_outputs()]
        logger.info("VLM %s (%s) on %s: %s", man.name, man.family, self.providers[0], self.roles)

    # -- prompt ---------------------------------------------------------------------------
    def encode(self, image: np.ndarray | None, prompt: str, bit_depth: int = 8) -> Encoded:
        """Image (``(H, W, 3)`` RGB or a linecam frame image) + user text -> :class:`Encoded`."""
        man = self.manifest
        vis = man.vision
        feeds: dict[str, np.ndarray] = {}
        grids: list[rope.Grid] = []
        image_text = ""
        if image is not None:
            rgb = vimg.to_rgb_u8(image, bit_depth)
            if isinstance(vis, Qwen3VisionSpec):
                q = vimg.qwen_preprocess(rgb, vis)  # type: ignore[arg-type]  # same processor fields
                grids = [q.grid]
                feeds = qwen3.vision_feeds(q.pixel_values, q.grid, side=vis.num_grid_per_side, merge=vis.merge_size,
                                           head_dim=vis.head_dim, theta=vis.rope_theta)
                image_text = vis.vision_start + vis.image_pad * q.n_tokens + vis.vision_end
            elif isinstance(vis, QwenVisionSpec):
                q = vimg.qwen_preprocess(rgb, vis)
                grids = [q.grid]
                extra = rope.qwen_vision_inputs(grids, merge=vis.merge_size, window_size=vis.window_size,
                                                patch_size=vis.patch_size, head_dim=vis.head_dim,
                                                theta=vis.rope_theta)
                feeds = {"pixel_values": q.pixel_values, **extra.feeds()}
                image_text = vis.vision_start + vis.image_pad * q.n_tokens + vis.vision_end
            else:
                assert isinstance(vis, Idefics3VisionSpec)
                im = vimg.idefics3_preprocess(rgb, vis)
                feeds = {"pixel_values": im.pixel_values,
                         "patch_position_ids": vimg.idefics3_patch_positions(im.pixel_values.shape[0], vis)}
                image_text = vimg.idefics3_image_prompt(im.rows, im.cols, vis)
        text = man.prompt.format.replace("{image}", image_text).replace("{prompt}", prompt)
        ids = self.tokenizer.encode(text, add_special_tokens=man.prompt.add_special_tokens).ids
        return Encoded(np.asarray([ids], dtype=np.int64), feeds, grids)

    # -- graphs ---------------------------------------------------------------------------
    def embed(self, input_ids: np.ndarray, image_features: np.ndarray | None = None) -> np.ndarray:
        (e,) = self.embedding.run(None, {"input_ids": input_ids})
        if image_features is not None:
            sel = input_ids[0] == self.manifest.text.image_token_id
            if int(sel.sum()) != image_features.shape[0]:
                raise ValueError(f"prompt has {int(sel.sum())} image tokens but the vision graph gave "
                                 f"{image_features.shape[0]} rows")
            e[0, sel] = image_features.astype(e.dtype, copy=False)
        return e.astype(self._emb_dtype, copy=False)

    def image_features(self, enc: Encoded) -> np.ndarray | None:
        return self.vision_outputs(enc)[0]

    def vision_outputs(self, enc: Encoded) -> tuple[np.ndarray | None, np.ndarray | None]:
        """``(image_features, deepstack_features)``; the second only for Qwen3-VL bundles."""
        if not enc.vision_feeds:
            return None, None
        outs = self.vision.run(None, enc.vision_feeds)
        return outs[0], (outs[1] if len(outs) > 1 else None)

    def deepstack(self, input_ids: np.ndarray, features: np.ndarray | None, n: int) -> dict[str, np.ndarray]:
        """The decoder's ``deepstack_embeds`` feed for ``n`` rows: the deepstack features at the image
        tokens of ``input_ids`` (its first rows), zeros elsewhere; ``{}`` for other families."""
        if not self._n_deep:
            return {}
        out = np.zeros((self._n_deep, 1, n, self.manifest.text.hidden_size), dtype=self._emb_dtype)
        if features is not None:
            sel = np.flatnonzero(input_ids[0] == self.manifest.text.image_token_id)
            out[:, 0, sel] = features.astype(out.dtype, copy=False)
        return {"deepstack_embeds": out}

    def positions(self, enc: Encoded) -> tuple[np.ndarray, int]:
        """Position ids of the prompt (``[3, 1, n]`` for M-RoPE, else ``[1, n]``) and the offset
        of later positions (M-RoPE: an image's rows take fewer positions than tokens)."""
        n = enc.n_tokens
        if self.manifest.text.positions == "mrope":
            vis = self.manifest.vision
            merge = vis.merge_size if isinstance(vis, QwenImageSpec) else 1
            if enc.grids:
                pos, delta = rope.mrope_positions(enc.input_ids[0], self.manifest.text.image_token_id,
                                                  enc.grids, merge)
            else:
                pos, delta = np.broadcast_to(np.arange(n, dtype=np.int64), (3, n)), 0
            return np.ascontiguousarray(pos[:, None, :]), delta
        return np.arange(n, dtype=np.int64)[None, :], 0

    # -- decoding -------------------------------------------------------------------------
    def empty_past(self) -> list[np.ndarray]:
        """The cache before the first token, for :meth:`decoder_step`: empty KV tensors (key, value
        per layer) and, for a hybrid decoder, zero conv / recurrent states, in graph order."""
        return [np.zeros(tuple(1 if isinstance(d, str) and d == "batch" else d if isinstance(d, int) else 0
                               for d in i.shape), dtype=_NP.get(i.type, np.float32))
                for i in self._state_inputs]

    def decoder_step(self, embeds: np.ndarray, positions: np.ndarray, past: list[np.ndarray],
                     length: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """One decoder run: ``embeds`` (``[1, k, hidden]``) after the tokens in ``past``;
        ``length`` counts both. Returns the last row's logits and the grown cache (a
        conversation that continues on a kept cache: linecam.station.ask)."""
        feeds: dict[str, np.ndarray] = {"inputs_embeds": embeds, "position_ids": positions,
                                        "attention_mask": np.ones((1, length), dtype=np.int64),
                                        **self.deepstack(np.zeros((1, 0), np.int64), None, embeds.shape[1])}
        n = len(self._state_inputs)
        feeds.update({i.name: p for i, p in zip(self._state_inputs, past)})
        outs = self.decoder.run(self._out_names, feeds)
        return outs[0][0, -1], list(outs[1:1 + n])

    def generate(self, image: np.ndarray | None, prompt: str, *, max_new_tokens: int = 64,
                 stop_token_ids: Sequence[int] | None = None, on_token: Callable[[int, str], None] | None = None,
                 should_stop: Callable[[], bool] | None = None, bit_depth: int = 8,
                 extra_embeds: np.ndarray | None = None) -> Generation:
        """Describe ``image`` (may be None) given ``prompt``; see :meth:`generate_encoded`."""
        t0 = time.perf_counter()
        enc = self.encode(image, prompt, bit_depth)
        return self.generate_encoded(enc, max_new_tokens=max_new_tokens, stop_token_ids=stop_token_ids,
                                     on_token=on_token, should_stop=should_stop, t_start=t0,
                                     extra_embeds=extra_embeds)

    def generate_encoded(self, enc: Encoded, *, max_new_tokens: int = 64,
                         stop_token_ids: Sequence[int] | None = None,
                         on_token: Callable[[int, str], None] | None = None,
                         should_stop: Callable[[], bool] | None = None, t_start: float | None = None,
                         extra_embeds: np.ndarray | None = None,
                         force_tokens: Sequence[int] | None = None,
                         on_state: Callable[[list[np.ndarray]], None] | None = None) -> Generation:
        """Greedy decoding with KV cache.

        Stops at a token in ``stop_token_ids`` (default: the bundle's EOS ids; the stop
        token is kept in ``tokens`` like transformers' ``generate``), after
        ``max_new_tokens``, or when ``should_stop()`` turns true. ``on_token(id, piece)``
        streams each token as it is produced. ``extra_embeds`` (``[k, hidden]``) are
        appended after the prompt rows, e.g. region tokens from a region projector.
        ``force_tokens`` (teacher forcing, for accuracy checks): feed these tokens instead
        of the model's own choices; ``tokens`` still records the model's argmax at each step.
        ``on_state(present)`` sees the decoder's cache outputs after every decoder run (the
        parity tests compare them with transformers' cache).
        """
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        t0 = time.perf_counter() if t_start is None else t_start
        stops = set(self.manifest.text.eos_token_ids if stop_token_ids is None else stop_token_ids)
        tv = time.perf_counter()
        feats, deep = self.vision_outputs(enc)
        vision_ms = (time.perf_counter() - tv) * 1e3
        embeds = self.embed(enc.input_ids, feats)
        if enc.injected is not None:
            at, rows = enc.injected
            embeds[0, at:at + rows.shape[0]] = rows.astype(embeds.dtype, copy=False)
        pos, delta = self.positions(enc)
        if extra_embeds is not None and len(extra_embeds):
            k = extra_embeds.shape[0]
            embeds = np.concatenate([embeds, extra_embeds[None].astype(embeds.dtype)], axis=1)
            last = int(pos.max()) + 1
            tail = np.arange(last, last + k, dtype=np.int64)
            pos = np.concatenate([pos, np.broadcast_to(tail, pos.shape[:-1] + (k,))], axis=-1)
            delta = last + k - embeds.shape[1]
        t = self.manifest.text
        feeds: dict[str, np.ndarray] = {"inputs_embeds": embeds, "attention_mask":
                                        np.ones((1, embeds.shape[1]), dtype=np.int64), "position_ids": pos}
        feeds.update({i.name: p for i, p in zip(self._state_inputs, self.empty_past())})
        feeds.update(self.deepstack(enc.input_ids, deep, embeds.shape[1]))
        tokens: list[int] = []
        reason: StopReason = "max_tokens"
        t_first = t_prefill = None
        length = embeds.shape[1]
        while True:
            outs = self.decoder.run(self._out_names, feeds)
            if on_state is not None:
                on_state(outs[1:])
            nxt = int(np.argmax(outs[0][0, -1]))
            if t_first is None:
                t_first = time.perf_counter()
                t_prefill = t_first - tv
            tokens.append(nxt)
            if on_token is not None:
                on_token(nxt, self.tokenizer.decode([nxt], skip_special_tokens=False))
            if force_tokens is not None:
                if len(tokens) >= len(force_tokens):
                    break
                nxt = int(force_tokens[len(tokens) - 1])
            elif nxt in stops:
                reason = "stop_token"
                break
            if len(tokens) >= max_new_tokens:
                break
            if should_stop is not None and should_stop():
                reason = "cancelled"
                break
            feeds.update({i.name: o for i, o in zip(self._state_inputs, outs[1:])})
            feeds["inputs_embeds"] = self.embed(np.asarray([[nxt]], dtype=np.int64))
            feeds.update(self.deepstack(enc.input_ids, None, 1))
            length += 1
            feeds["attention_mask"] = np.ones((1, length), dtype=np.int64)
            p = np.int64(length - 1 + delta)
            feeds["position_ids"] = (np.full((3, 1, 1), p, dtype=np.int64) if t.positions == "mrope"
                                     else np.full((1, 1), p, dtype=np.int64))
        t_end = time.perf_counter()
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        n_img = int((enc.input_ids[0] == t.image_token_id).sum())
        timings = {"vision": vision_ms, "prefill": (t_prefill or 0.0) * 1e3,
                   "ttft": ((t_first or t_end) - t0) * 1e3, "decode": (t_end - (t_first or t_end)) * 1e3,
                   "total": (t_end - t0) * 1e3}
        return Generation(tokens, text, reason, enc.n_tokens, n_img, timings)
