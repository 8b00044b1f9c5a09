"""Questions about a stored defect, answered by the line's VLM bundle (``linecam ask``, the
page's question box). Never in the line daemon: the view or the terminal process loads the VLM.

The first question is asked the way the daemon describes a defect: the stored annotated
snapshot cropped around the defect's regions, boxes drawn, regions in the text
(:class:`~linecam.runtime.vlm.prompt.RegionPromptBuilder`), then the question. A follow-up
in the same conversation feeds only the new turn: the decoder's KV cache of the previous
turns (image included) is kept per conversation and extended, so the image is encoded once.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from linecam.errors import LinecamError

logger = logging.getLogger(__name__)


@dataclass
class Conversation:
    id: str
    defect_event_id: str
    past: list[np.ndarray]  # decoder KV outputs, [key0, value0, key1, ...]
    length: int  # tokens whose keys/values are in ``past``
    delta: int  # position offset (Qwen M-RoPE: image tokens take fewer positions)
    pending: int  # the last generated token: not yet fed to the decoder
    turns: list[tuple[str, str]] = field(default_factory=list)


def _turn_format(fmt: str) -> str:
    """The bundle's prompt format without what precedes the first user turn (a system message)."""
    head = fmt[: fmt.index("{image}")] if "{image}" in fmt else fmt[: fmt.index("{prompt}")]
    cut = 0
    for end in ("<|im_end|>\n", "<end_of_utterance>\n"):
        i = head.rfind(end)
        if i >= 0:
            cut = max(cut, i + len(end))
    return fmt[cut:].replace("{image}", "")


class Asker:
    """One VLM engine, one generation at a time, a bounded set of conversations."""

    def __init__(self, bundle: str | Path, *, precision: str = "fp32", device: str = "cpu",
                 intra_op_threads: int = 0, max_new_tokens: int = 64, max_conversations: int = 16) -> None:
        from linecam.runtime.vlm.bundle import load_vlm_bundle
        from linecam.runtime.vlm.engine import VlmEngine
        from linecam.runtime.vlm.prompt import RegionPromptBuilder

        vb = load_vlm_bundle(bundle)
        self.engine = VlmEngine(vb, precision=precision, device=device, intra_op_threads=intra_op_threads)
        self.builder = RegionPromptBuilder()
        self.max_new_tokens = max_new_tokens
        self.max_conversations = max_conversations
        self._conversations: collections.OrderedDict[str, Conversation] = collections.OrderedDict()
        self._lock = threading.Lock()

    # -- decoding with a kept cache ----------------------------------------------------------
    def _positions(self, start: int, k: int) -> np.ndarray:
        p = np.arange(start, start + k, dtype=np.int64)
        if self.engine.manifest.text.positions == "mrope":
            return np.ascontiguousarray(np.broadcast_to(p, (3, 1, k)))
        return p[None, :]

    def _decode(self, embeds: np.ndarray, positions: np.ndarray, past: list[np.ndarray] | None, length: int,
                delta: int) -> tuple[list[int], list[np.ndarray], int, str]:
        """Feed ``embeds`` after ``length`` cached tokens, then decode greedily.
        Returns (tokens, past, tokens in past, stop reason)."""
        e = self.engine
        stops = set(e.manifest.text.eos_token_ids)
        if past is None:
            past = e.empty_past()
        length += embeds.shape[1]
        tokens: list[int] = []
        reason = "max_tokens"
        while True:
            logits, past = e.decoder_step(embeds, positions, past, length)
            nxt = int(np.argmax(logits))
            tokens.append(nxt)
            if nxt in stops:
                reason = "stop_token"
                break
            if len(tokens) >= self.max_new_tokens:
                break
            embeds = e.embed(np.asarray([[nxt]], dtype=np.int64))
            positions = self._positions(length + delta, 1)
            length += 1
        return tokens, past, length, reason

    # -- questions -------------------------------------------------------------------------
    def _first_turn(self, defect: dict[str, Any], jpeg: bytes | None, question: str) -> tuple[Any, ...]:
        import cv2

        if not jpeg:
            raise LinecamError(f"defect {defect.get('event_id')} has no stored snapshot: run the line with "
                               "snapshots on, and the recorder with --copy-snapshots or output.publish_snapshots")
        bgr = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
        if bgr is None:
            raise LinecamError(f"the snapshot of defect {defect.get('event_id')} is not a readable JPEG")
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        grounded = self.builder.build(rgb, defect.get("regions") or [])
        enc = self.engine.encode(grounded.image, f"{grounded.prompt}\nQuestion: {question}")
        embeds = self.engine.embed(enc.input_ids, self.engine.image_features(enc))
        pos, delta = self.engine.positions(enc)
        return embeds, pos, delta, enc.n_tokens

    def ask(self, defect: dict[str, Any], jpeg: bytes | None, question: str,
            conversation_id: str | None = None) -> dict[str, Any]:
        """Answer ``question`` about ``defect`` (its message as published); continue the
        conversation ``conversation_id`` when it is known, else start one."""
        t0 = time.perf_counter()
        with self._lock:
            conv = self._conversations.get(conversation_id or "")
            if conv is not None and conv.defect_event_id != defect.get("event_id"):
                conv = None
            if conv is None:
                embeds, pos, delta, n_prompt = self._first_turn(defect, jpeg, question)
                tokens, past, length, reason = self._decode(embeds, pos, None, 0, delta)
                conv = Conversation(uuid.uuid4().hex, str(defect.get("event_id")), past, length, delta, tokens[-1])
                cached = 0
            else:
                tok = self.engine.tokenizer
                ids = [conv.pending] + tok.encode("\n" + _turn_format(self.engine.manifest.prompt.format)
                                                  .replace("{prompt}", question), add_special_tokens=False).ids
                n_prompt, cached = len(ids), conv.length
                embeds = self.engine.embed(np.asarray([ids], dtype=np.int64))
                tokens, conv.past, conv.length, reason = self._decode(
                    embeds, self._positions(conv.length + conv.delta, len(ids)), conv.past, conv.length, conv.delta)
                conv.pending = tokens[-1]
            answer = self.engine.tokenizer.decode(tokens, skip_special_tokens=True).strip()
            conv.turns.append((question, answer))
            self._conversations[conv.id] = conv
            self._conversations.move_to_end(conv.id)
            while len(self._conversations) > self.max_conversations:
                self._conversations.popitem(last=False)
        return {"answer": answer, "conversation_id": conv.id, "turn": len(conv.turns), "n_tokens": len(tokens),
                "prompt_tokens": n_prompt, "cached_tokens": cached, "stop_reason": reason,
                "latency_ms": round((time.perf_counter() - t0) * 1e3, 1)}
