"""A Hugging Face VLM (teacher or student) fed exactly like the exported edge runtime.

Distillation is only worth something if the student is trained on the inputs it will
see on the line. So the image + prompt are encoded by the edge runtime's own code
(:meth:`linecam.runtime.vlm.engine.VlmEngine.encode`: OpenCV preprocessing, the chat
format derived at export, ``tokenizer.json``) and only then handed to torch; the
parity tests already show transformers decodes those inputs token for token like the
ONNX bundle does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import numpy as np
import torch

from linecam.errors import BundleError
from linecam.export.torch_device import Device, pick_device
from linecam.export.vlm.export import FAMILIES, MODEL_CLASSES, QWEN_STYLE, _prompt_format, _read_json
from linecam.runtime.vlm.bundle import PromptSpec
from linecam.runtime.vlm.engine import Encoded, VlmEngine

logger = logging.getLogger(__name__)

DType = Literal["auto", "fp32", "bf16", "fp16"]
Quant = Literal["none", "4bit", "8bit"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _dtype(dtype: DType, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # bf16 halves a large teacher's memory on GPU; CPU bf16 matmuls are slow and less exact.
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return _DTYPES[dtype]


@dataclass(slots=True)
class Sample:
    """One (image, prompt) -> target sequence as torch inputs (batch of one)."""

    inputs: dict[str, torch.Tensor]  # input_ids, attention_mask, pixel_values, ...
    prompt_len: int  # tokens before the target
    target: list[int]  # target token ids (incl. the stop token); empty for generation


class HfVlm:
    """A local Hugging Face VLM folder of a family ``export-engine vlm`` supports.

    ``dtype``: ``auto`` is bf16 on a GPU that has it, FP32 on CPU (a full fine-tune asks
    for ``fp32`` master weights; LoRA trains FP32 adapters over a frozen bf16 base).
    ``trainable``: train mode; otherwise eval mode. ``quant``: load a large teacher in
    4 / 8 bit via bitsandbytes (GPU only).
    """

    def __init__(self, folder: str | Path, *, device: Device = "auto", dtype: DType = "auto",
                 quant: Quant = "none", trainable: bool = False) -> None:
        from tokenizers import Tokenizer
        from transformers import AutoConfig

        self.folder = Path(folder)
        if not (self.folder / "config.json").is_file():
            raise BundleError(f"{self.folder} has no config.json: give a local Hugging Face VLM folder "
                              f"(config, weights, tokenizer.json)")
        if not (self.folder / "tokenizer.json").is_file():
            raise BundleError(f"{self.folder} has no tokenizer.json: save the tokenizer with a fast tokenizer "
                              f"(tokenizer.save_pretrained)")
        cfg = AutoConfig.from_pretrained(str(self.folder), local_files_only=True)
        self.family = cfg.model_type
        if self.family not in FAMILIES:
            raise BundleError(f"{self.folder} is a '{self.family}' model; distillation supports: "
                              f"{', '.join(sorted(FAMILIES))}")
        self.device = pick_device(device)
        kw: dict = {"local_files_only": True, "attn_implementation": "sdpa", "dtype": _dtype(dtype, self.device)}
        if quant != "none":
            if self.device.type != "cuda":
                raise BundleError(f"--teacher-quant {quant} needs a CUDA GPU (bitsandbytes); use --teacher-quant "
                                  f"none on CPU")
            try:
                from transformers import BitsAndBytesConfig
                import bitsandbytes  # noqa: F401
            except ImportError:
                raise BundleError(f"--teacher-quant {quant} needs bitsandbytes: pip install bitsandbytes") from None
            kw["quantization_config"] = (
                BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
                if quant == "4bit" else BitsAndBytesConfig(load_in_8bit=True))
            kw["device_map"] = {"": self.device.index or 0}
        import transformers

        cls = getattr(transformers, MODEL_CLASSES[self.family])
        model = cls.from_pretrained(str(self.folder), **kw)
        if quant == "none":
            model = model.to(self.device)
        self.model = model.train(trainable) if trainable else model.eval()
        # The vision spec and chat format exactly as export_vlm will write them into the bundle.
        self.vision_spec = FAMILIES[self.family](model, self.folder).vision_spec
        fmt = _prompt_format(self.folder, self.family)
        self.tokenizer = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        self._encoder = SimpleNamespace(manifest=SimpleNamespace(vision=self.vision_spec,
                                                                 prompt=PromptSpec(format=fmt)),
                                        tokenizer=self.tokenizer)
        tcfg = model.config.text_config if hasattr(model.config, "text_config") else model.config
        gen = _read_json(self.folder / "generation_config.json")
        eos = gen.get("eos_token_id", getattr(tcfg, "eos_token_id", None))
        self.eos_ids = [int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
        if not self.eos_ids:
            raise BundleError(f"{self.folder} names no eos_token_id (config or generation_config.json): the "
                              f"student could never learn to stop; set one")
        self.vocab_size = int(tcfg.vocab_size)
        self.image_token_id = int(model.config.image_token_id)

    @property
    def name(self) -> str:
        return self.folder.name

    # -- inputs ---------------------------------------------------------------------------
    def encode(self, image: np.ndarray, prompt: str, bit_depth: int = 8) -> Encoded:
        # The runtime's own encode (a method that reads only .manifest and .tokenizer):
        # training inputs are then the very token ids and pixel values the bundle will see.
        return VlmEngine.encode(self._encoder, image, prompt, bit_depth)  # type: ignore[arg-type]

    def target_ids(self, text: str) -> list[int]:
        """``text`` as the tokens the student must emit, ending with the stop token."""
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids) + [self.eos_ids[0]]

    def sample(self, image: np.ndarray, prompt: str, target: str | None = None, bit_depth: int = 8, *,
               on_device: bool = True) -> Sample:
        """``on_device=False`` keeps the tensors on the CPU (for caching; see :meth:`to_device`)."""
        enc = self.encode(image, prompt, bit_depth)
        tgt = self.target_ids(target) if target is not None else []
        ids = np.concatenate([enc.input_ids, np.asarray([tgt], dtype=np.int64)], axis=1) if tgt else enc.input_ids
        t_ids = torch.from_numpy(ids)
        inputs = {"input_ids": t_ids, "attention_mask": torch.ones_like(t_ids)}
        if enc.vision_feeds:
            pv = torch.from_numpy(enc.vision_feeds["pixel_values"])
            if self.family in QWEN_STYLE:
                inputs.update(pixel_values=pv, image_grid_thw=torch.tensor(enc.grids),
                              mm_token_type_ids=(t_ids == self.image_token_id).int())
            else:
                inputs["pixel_values"] = pv[None]
        s = Sample(inputs, enc.n_tokens, tgt)
        return self.to_device(s) if on_device else s

    def to_device(self, s: Sample) -> Sample:
        inputs = {k: v.to(self.device) for k, v in s.inputs.items()}
        if "pixel_values" in inputs and self.model.dtype != torch.float32:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return Sample(inputs, s.prompt_len, s.target)

    def target_logits(self, sample: Sample) -> torch.Tensor:
        """Logits ``[T, vocab]`` at the positions that predict the ``T`` target tokens."""
        out = self.model(**sample.inputs, use_cache=False, logits_to_keep=len(sample.target) + 1)
        return out.logits[0, :-1]

    # -- generation -----------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, image: np.ndarray, prompt: str, *, max_new_tokens: int = 64, bit_depth: int = 8) -> str:
        """Greedy description (what the edge runtime would say for this model)."""
        s = self.sample(image, prompt, bit_depth=bit_depth)
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.model.generate(**s.inputs, do_sample=False, max_new_tokens=max_new_tokens,
                                      eos_token_id=self.eos_ids, pad_token_id=self.eos_ids[0])
        finally:
            self.model.train(was_training)
        new = out[0, s.inputs["input_ids"].shape[1]:].tolist()
        return self.tokenizer.decode(new, skip_special_tokens=True)
