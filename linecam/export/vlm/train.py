"""Fine-tune the student on (crop + prompt -> text): LoRA via ``peft`` or a full fine-tune.

Loss: cross-entropy on the text's tokens (ending with the stop token), plus optionally
KL(teacher || student) on the next-token distributions at those positions when the
text is the teacher's own and both models share a tokenizer. Seeded and resumable: the
sample order is a pure function of (seed, sample number), and a checkpoint holds the
trainable weights, optimiser, schedule and RNG state, so a resumed run ends with the
same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from linecam.export.vlm.dataset import DescriptionRecord, DistilError
from linecam.export.vlm.hfmodel import HfVlm
from linecam.progress import NoProgress
from linecam.runtime.vlm.prompt import GroundedPrompt

if TYPE_CHECKING:
    from linecam.export.vlm.distil import DistilConfig

logger = logging.getLogger(__name__)

#: Host memory for encoded training samples kept between epochs (beyond it they are re-encoded).
CACHE_BYTES = 2 * 1024**3


@dataclass(slots=True)
class Example:
    record: DescriptionRecord
    grounded: GroundedPrompt
    kl: bool  # the text is the teacher's own: its logits are a valid soft target
    #: Region-token features (:func:`linecam.runtime.vlm.region_tokens.region_features`), with --region-tokens.
    features: np.ndarray | None = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lora_targets(family: str, vision: bool) -> str:
    """peft ``target_modules`` regex: the language model's linear layers and the projector
    (optionally the vision encoder). ``lm_head`` stays frozen: the output vocabulary is shared."""
    if family == "qwen2_5_vl":
        parts = [r".*\.language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)",
                 r".*\.visual\.merger\.mlp\.[02]"]
        if vision:
            parts.append(r".*\.visual\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(gate|up|down)_proj)")
    elif family in ("qwen3_5", "qwen3_vl"):  # + Qwen3.5's Gated-DeltaNet projections
        parts = [r".*\.language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj"
                 r"|linear_attn\.(in_proj_qkv|in_proj_z|out_proj))",
                 r".*\.visual\.merger\.linear_fc[12]"]
        if vision:
            parts.append(r".*\.visual\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.linear_fc[12])")
    else:
        parts = [r".*\.text_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)",
                 r".*\.connector\.modality_projection\.proj"]
        if vision:
            parts.append(r".*\.vision_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])")
    return "|".join(f"({p})" for p in parts)


def _lr_lambda(steps: int, warmup: float) -> Callable[[int], float]:
    w = max(1, int(round(warmup * steps)))

    def f(step: int) -> float:  # linear warm-up, cosine decay to 10 %
        if step < w:
            return (step + 1) / w
        t = (step - w) / max(1, steps - w)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


def sample_index(i: int, n: int, seed: int) -> int:
    """The ``i``-th training sample: a fresh seeded permutation per epoch, a pure function of ``i``
    (so a resumed run draws exactly what an uninterrupted one would)."""
    epoch, k = divmod(i, n)
    return int(np.random.default_rng([seed, epoch]).permutation(n)[k])


def kl_divergence(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over positions of KL(teacher_T || student_T) * T^2 on the shared vocabulary."""
    v = min(student.shape[-1], teacher.shape[-1])  # checkpoints pad lm_head differently
    s = F.log_softmax(student[..., :v].float() / temperature, dim=-1)
    t = F.log_softmax(teacher[..., :v].float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


@dataclass
class TrainStats:
    steps: int = 0
    resumed_from: int = 0
    loss_first: float | None = None
    loss_last: float | None = None
    ce_last: float | None = None
    kl_first: float | None = None
    kl_last: float | None = None
    seconds: float = 0.0
    trainable_params: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def _save_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any, step: int,
                     fingerprint: str, history: list[dict[str, float]]) -> None:
    state = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    ck = {"step": step, "fingerprint": fingerprint, "trainable": state, "optimizer": opt.state_dict(),
          "scheduler": sched.state_dict(), "torch_rng": torch.get_rng_state(), "history": history,
          "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    tmp = path.with_suffix(".tmp")
    torch.save(ck, tmp)
    os.replace(tmp, path)  # a crash mid-save leaves the previous checkpoint intact


def _load_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any,
                     fingerprint: str) -> tuple[int, list[dict[str, float]]]:
    ck = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data only: no code from the file
    if ck.get("fingerprint") != fingerprint:
        raise DistilError(f"checkpoint {path} was made from other data, student or settings: drop --resume to "
                          f"start over, or delete it")
    params = dict(model.named_parameters())
    missing = [n for n in ck["trainable"] if n not in params]
    if missing:
        raise DistilError(f"checkpoint {path} does not fit this student ({missing[0]} unknown): drop --resume")
    with torch.no_grad():
        for n, t in ck["trainable"].items():
            params[n].copy_(t.to(params[n].device))
    opt.load_state_dict(ck["optimizer"])
    sched.load_state_dict(ck["scheduler"])
    torch.set_rng_state(ck["torch_rng"])
    if ck.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ck["cuda_rng"])
    return int(ck["step"]), list(ck.get("history", []))


def train_student(student: HfVlm, examples: Sequence[Example], cfg: DistilConfig, *, checkpoint: Path,
                  fingerprint: str, teacher: HfVlm | None = None, progress: Any = None,
                  on_step: Callable[[int, float], None] | None = None,
                  injector: Any = None) -> tuple[torch.nn.Module, TrainStats]:
    """Fine-tune ``student.model`` on ``examples``; returns the (peft-wrapped or full) model and stats.

    ``injector`` (a :class:`linecam.export.vlm.projector.Injector`): the region projector trains
    too (jointly with the adapters, or alone with the VLM frozen: ``cfg.train_projector_only``);
    it is a submodule of the returned model until ``injector.detach(model)``.

    ``on_step(step, loss)`` is called after every optimiser step (tests interrupt through it).
    """
    progress = progress or NoProgress()
    seed_everything(cfg.seed)
    model = student.model
    if cfg.full_finetune:
        for p in model.parameters():
            p.requires_grad_(True)
    elif injector is not None and getattr(cfg, "train_projector_only", False):
        for p in model.parameters():
            p.requires_grad_(False)
    else:
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha or 2 * cfg.lora_r, lora_dropout=cfg.lora_dropout,
                          target_modules=lora_targets(student.family, cfg.lora_vision), bias="none")
        model = get_peft_model(model, lcfg)
    if injector is not None:
        injector.attach(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    groups: list[dict[str, Any]] = [{"params": params}]
    if injector is not None:  # the projector starts from nothing: it may learn faster than the adapters
        mine = {id(p) for p in injector.net.parameters()}
        groups = [{"params": [p for p in params if id(p) not in mine]},
                  {"params": list(injector.net.parameters()), "lr": cfg.lr * injector.lr_scale}]
        groups = [g for g in groups if g["params"]]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.steps, cfg.warmup))
    stats = TrainStats(trainable_params=sum(p.numel() for p in params))
    start, history = 0, []
    if cfg.resume and checkpoint.is_file():
        start, history = _load_checkpoint(checkpoint, model, opt, sched, fingerprint)
        logger.info("resuming from %s at step %d of %d", checkpoint, start, cfg.steps)
    elif cfg.resume:
        logger.warning("--resume: no checkpoint at %s; starting from step 0", checkpoint)
    stats.resumed_from = start
    stats.history = history
    # GPU: bf16 compute (no loss scaling needed, unlike fp16), over FP32 master weights for a
    # full fine-tune, over a frozen bf16 base with FP32 adapters for LoRA.
    amp = student.device.type == "cuda" and torch.cuda.is_bf16_supported()
    use_kl = teacher is not None and cfg.kl_weight > 0
    n = len(examples)
    t0 = time.perf_counter()
    task = progress.add_task("training", total=cfg.steps, completed=start, info="")
    cache: dict[int, Any] = {}  # encoded inputs on the CPU, reused across epochs
    cached_bytes = 0
    for step in range(start, cfg.steps):
        opt.zero_grad(set_to_none=True)
        tot = ce_sum = kl_sum = 0.0
        kl_n = 0
        for j in range(cfg.batch_size):
            k = sample_index(step * cfg.batch_size + j, n, cfg.seed)
            ex = examples[k]
            s = cache.get(k)
            if s is None:
                s = student.sample(ex.grounded.image, ex.grounded.prompt, ex.record.text, on_device=False)
                size = sum(t.numel() * t.element_size() for t in s.inputs.values())
                if cached_bytes + size <= CACHE_BYTES:
                    cache[k] = s
                    cached_bytes += size
            s = student.to_device(s)
            if injector is not None:
                s = injector.apply(s, ex.features)
            target = torch.tensor(s.target, device=student.device)
            with torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext():
                logits = model(**s.inputs, use_cache=False, logits_to_keep=len(s.target) + 1).logits[0, :-1]
            ce = F.cross_entropy(logits.float(), target)
            loss = ce
            if use_kl and ex.kl:
                assert teacher is not None
                with torch.no_grad():
                    ts = teacher.sample(ex.grounded.image, ex.grounded.prompt, ex.record.text)
                    t_logits = teacher.target_logits(ts).to(logits.device) if ts.target == s.target else None
                if t_logits is not None:
                    kl = kl_divergence(logits, t_logits, cfg.kl_temperature)
                    loss = (1 - cfg.kl_weight) * ce + cfg.kl_weight * kl
                    kl_sum += kl.item()
                    kl_n += 1
            (loss / cfg.batch_size).backward()
            tot += loss.item()
            ce_sum += ce.item()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        rec = {"step": step + 1, "loss": tot / cfg.batch_size, "ce": ce_sum / cfg.batch_size,
               "lr": opt.param_groups[0]["lr"]}
        if kl_n:
            rec["kl"] = kl_sum / kl_n
        history.append(rec)
        progress.update(task, advance=1, info=f"loss {rec['loss']:.4f}")
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            _save_checkpoint(checkpoint, model, opt, sched, step + 1, fingerprint, history)
        if on_step is not None:
            on_step(step + 1, rec["loss"])
    stats.steps = cfg.steps
    stats.seconds = time.perf_counter() - t0
    if history:
        stats.loss_first, stats.loss_last, stats.ce_last = history[0]["loss"], history[-1]["loss"], history[-1]["ce"]
        kls = [h["kl"] for h in history if "kl" in h]
        if kls:
            stats.kl_first, stats.kl_last = kls[0], kls[-1]
    return model, stats


def merged_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain transformers model: LoRA folded into the weights (a full fine-tune is returned as is)."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return model.eval()


def save_student(model: torch.nn.Module, student_dir: Path, out: Path) -> Path:
    """A Hugging Face folder ``export_vlm`` reads: weights + the student's tokenizer / processor files."""
    from linecam.export.vlm.export import TOKENIZER_FILES

    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(str(out))
    for fname in TOKENIZER_FILES:
        if (student_dir / fname).is_file():
            shutil.copyfile(student_dir / fname, out / fname)
    return out
