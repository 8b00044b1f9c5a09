"""``export-engine vlm --distil-from``: a large VLM teaches a compact one this plant's defects.

Pipeline (every stage resumable, every stage logged):

1. **Localise** - the region expert bundle runs on each defect image as the daemon runs it;
   its regions become the daemon's region-grounded prompt (:mod:`.dataset`).
2. **Describe** - the teacher answers each prompt; answers are cached in a JSONL review
   file a person can read and edit before training (:mod:`.teacher`). ``--describe-only``
   stops here.
3. **Train** - the student learns (crop + prompt -> text) with LoRA adapters via ``peft``
   (or a full fine-tune): cross-entropy on the text's tokens, plus optionally KL to the
   teacher's next-token distribution when both share a tokenizer. Seeded, checkpointed
   (``--resume``), CPU for tiny models, GPU (bf16 autocast) when there is one.
4. **Evaluate** - greedy descriptions of the student before and after training vs the
   review file's text, on the training and held-out records (:mod:`.evaluate`).
5. **Gate + export** - a student whose agreement (held-out if there is a held-out set)
   is below ``min_agreement`` is refused unless ``force``; otherwise LoRA is merged, the
   student exported with :func:`~linecam.export.vlm.export.export_vlm`, the exported
   bundle scored again with the edge runtime, and the report written next to it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from linecam.export.torch_device import Device
from linecam.export.vlm.dataset import (
    DescriptionRecord,
    DistilError,
    RegionLocator,
    list_defect_images,
    prepare_records,
    read_records,
    write_records,
)
from linecam.export.vlm.evaluate import Vocabulary
from linecam.export.vlm.hfmodel import DType, HfVlm, Quant
from linecam.progress import make_progress
from linecam.export.vlm.train import Example, merged_model, save_student, seed_everything, train_student
from linecam.runtime.vlm.prompt import PromptConfig, RegionPromptBuilder

logger = logging.getLogger(__name__)

REVIEW_FILE = "descriptions.jsonl"
REPORT_FILE = "distillation.json"
CHECKPOINT = "checkpoint.pt"

#: The settings a training checkpoint depends on (a resumed run must use the same).
_TRAINING_FIELDS = ("steps", "batch_size", "lr", "lora_r", "lora_alpha", "lora_dropout", "lora_vision", "full_finetune",
                    "weight_decay", "warmup", "grad_clip", "seed", "kl_weight", "kl_temperature", "region_tokens",
                    "train_projector_only", "projector_lr_scale")

__all__ = ["DistilConfig", "DistilError", "DistilResult", "distil_vlm", "line_settings"]


@dataclass
class DistilConfig:
    """Everything that shapes a distillation run (the CLI's options)."""

    steps: int = 400
    #: Samples per optimiser step (gradient accumulation over single samples).
    batch_size: int = 4
    lr: float = 2e-4
    lora_r: int = 16
    lora_alpha: int | None = None  # default 2 * r
    lora_dropout: float = 0.0
    #: Also put adapters on the vision encoder (the projector always gets them).
    lora_vision: bool = False
    full_finetune: bool = False
    weight_decay: float = 0.0
    warmup: float = 0.05
    grad_clip: float = 1.0
    seed: int = 0
    holdout: float = 0.1
    #: Weight of KL(teacher || student) on next-token distributions (0: off; needs a shared tokenizer).
    kl_weight: float = 0.0
    kl_temperature: float = 2.0
    #: Teacher's answer budget (also the evaluation's upper bound).
    max_new_tokens: int = 64
    min_agreement: float = 0.8
    force: bool = False
    resume: bool = False
    save_every: int = 50
    device: Device = "auto"
    teacher_dtype: DType = "auto"
    teacher_quant: Quant = "none"
    threads: int | None = None
    #: Extra defect words for the structured evaluation (dataset labels are added automatically).
    kinds: tuple[str, ...] = ()
    #: Most records scored per split (first by id), with torch; and with the exported bundle
    #: (ONNX Runtime, CUDA when onnxruntime-gpu is installed, else CPU: keep it small).
    eval_limit: int = 200
    export_eval_limit: int = 32
    describe_only: bool = False
    progress: bool = True
    # export
    quantize: tuple[str, ...] = ("int8", "int4")
    fp16: bool = False
    # region expert / prompt: the daemon's settings (defaults = the daemon's defaults)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    image_threshold: float | None = None
    pixel_threshold: float | None = None
    min_region_area_px: int = 16
    # region-token injection (IAD-Unify): K rows from a trained region projector (0: prompt-only)
    region_tokens: int = 0
    train_projector_only: bool = False
    projector_lr_scale: float = 3.0  # the projector's learning rate / --lr
    #: Also train a prompt-only and an ungrounded student and report the three side by side.
    ablation: bool = False
    #: Export gate on location-word accuracy (same split as the agreement gate).
    min_location: float = 0.0

    def check(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.lr <= 0 or self.lora_r < 1 or self.save_every < 1:
            raise DistilError("steps >= 0, batch size >= 1, lr > 0, LoRA rank >= 1 and save_every >= 1 are needed: "
                              "fix the options")
        if not 0 <= self.holdout < 1:
            raise DistilError(f"holdout {self.holdout} is out of range: give a fraction in [0, 1)")
        if not 0 <= self.kl_weight <= 1 or self.kl_temperature <= 0:
            raise DistilError("kl weight must be in [0, 1] and the KL temperature > 0: fix the options")
        if self.region_tokens < 0 or (self.train_projector_only and not self.region_tokens):
            raise DistilError("--train-projector-only trains the region projector: give --region-tokens K (K >= 1)")
        if not 0 <= self.min_location <= 1:
            raise DistilError(f"--min-location {self.min_location} is out of range: give a fraction in [0, 1]")


@dataclass
class DistilResult:
    review_file: Path
    report: dict[str, Any]
    report_path: Path | None = None
    bundle: Path | None = None  # None: describe-only, or refused by the gate


# --------------------------------------------------------------------------- helpers


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _model_fingerprint(folder: Path) -> dict[str, Any]:
    # Config + weight file names and sizes: cheap even for multi-GB students.
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
    return {"config": (folder / "config.json").read_text(), "files": [(p.name, p.stat().st_size) for p in files]}


def same_tokenizer(a: Path, b: Path) -> bool:
    """Do two model folders' ``tokenizer.json`` map every token to the same id?"""
    from tokenizers import Tokenizer

    try:
        va, vb = (Tokenizer.from_file(str(p / "tokenizer.json")).get_vocab(with_added_tokens=True) for p in (a, b))
    except Exception as e:  # a missing or unreadable file: HfVlm reports it with its own message later
        logger.debug("tokenizer comparison failed: %s", e)
        return False
    return va == vb


# --------------------------------------------------------------------------- evaluation


def _eval_records(examples: Sequence[Example], limit: int) -> list[Example]:
    return sorted(examples, key=lambda e: e.record.id)[:limit]


def _eval_torch(model_vlm: HfVlm, splits: dict[str, list[Example]], vocab: Vocabulary, max_new: int,
                progress: Any, label: str, injector: Any = None) -> dict[str, Any]:
    from linecam.export.vlm.grounding import evaluate, torch_generator

    return {name: evaluate(torch_generator(model_vlm, injector, max_new), exs, vocab, progress, f"{label} ({name})")
            for name, exs in splits.items() if exs}


# --------------------------------------------------------------------------- pipeline


def line_settings(path: str | Path) -> dict[str, Any]:
    """The daemon's prompt and region settings from a linecam line config (YAML), as
    :class:`DistilConfig` fields plus ``bundle`` (the config's region expert)."""
    from linecam.config import load_config

    cfg = load_config(path)
    v = cfg.vlm
    # Built like linecam.runtime.service.make_describer builds the daemon's prompt.
    prompt = {k: val for k, val in (("template", v.template), ("region_template", v.region_template))
              if val is not None}
    return {"prompt": PromptConfig(margin=v.crop_margin, **prompt), "image_threshold": cfg.thresholds.image,
            "pixel_threshold": cfg.thresholds.pixel, "min_region_area_px": cfg.thresholds.min_region_area_px,
            "bundle": cfg.model.bundle}


def _versions() -> dict[str, str]:
    import transformers

    v = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import peft

        v["peft"] = peft.__version__
    except ImportError:
        pass
    return v


def _write_json(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def distil_vlm(student_dir: str | Path, out: str | Path, *, teacher_dir: str | Path, images: str | Path,
               expert_bundle: str | Path, review_file: str | Path | None = None, work_dir: str | Path | None = None,
               config: DistilConfig | None = None, name: str | None = None, export: bool = True,
               on_step: Callable[[int, float], None] | None = None) -> DistilResult:
    """Run the pipeline of the module doc; returns where things were written and the report.

    ``work_dir`` (default ``<out>.distil`` beside ``out``) holds the review file (unless
    ``review_file`` is given), the training checkpoint, the merged student and the
    evaluation report. ``export=False`` stops after the evaluation (no gate, no bundle).
    """
    cfg = config or DistilConfig()
    cfg.check()
    student_dir, out, teacher_dir = Path(student_dir), Path(out), Path(teacher_dir)
    work = Path(work_dir) if work_dir is not None else out.parent / f"{out.name}.distil"
    review = Path(review_file) if review_file is not None else work / REVIEW_FILE
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    t_start = time.perf_counter()

    if cfg.kl_weight > 0 and not same_tokenizer(student_dir, teacher_dir):
        raise DistilError(f"--kl-weight needs teacher and student to share a tokenizer; {teacher_dir} and "
                          f"{student_dir} do not: use --kl-weight 0 (text-only distillation)")

    teacher: HfVlm | None = None
    with make_progress(cfg.progress) as progress:
        # 1 + 2. localise, prompt, describe (cached records are reused)
        records, teacher = describe_images(images, expert_bundle, review, teacher_dir, cfg, progress)
        summary = _summary(records)
        if cfg.describe_only:
            logger.info("descriptions written to %s: review them (edit 'text', set 'reviewed'), then run again "
                        "without --describe-only", review)
            return DistilResult(review, {"records": summary})

        # 3. train
        usable = [r for r in records if r.usable]
        if not any(r.split == "train" for r in usable):
            raise DistilError(f"{review} has no usable training record (regions found, 'use' true, a 'text', "
                              f"split 'train'): add defect images or fix the records")
        from linecam.export.vlm.grounding import make_splits
        from linecam.export.vlm.projector import FeatureMaker, Injector

        features_of = None
        if cfg.region_tokens:
            maker = FeatureMaker(expert_bundle, cfg)
            features_of = lambda r, g: maker(r.image, g.regions)  # noqa: E731
        splits = make_splits(usable, RegionPromptBuilder(cfg.prompt), features_of)
        if cfg.kl_weight > 0 and teacher is None:
            logger.info("loading teacher %s for logit distillation", teacher_dir)
            teacher = HfVlm(teacher_dir, device=cfg.device, dtype=cfg.teacher_dtype, quant=cfg.teacher_quant)
        elif cfg.kl_weight == 0 and teacher is not None:
            teacher = None  # free its memory before the student trains
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        work.mkdir(parents=True, exist_ok=True)
        student = HfVlm(student_dir, device=cfg.device, dtype="fp32" if cfg.full_finetune else "auto",
                        trainable=True)
        injector = Injector(student, cfg.region_tokens, lr_scale=cfg.projector_lr_scale) if cfg.region_tokens else None
        vocab = Vocabulary([*sorted({r.label for r in records if r.label}), *cfg.kinds])
        max_target = max(len(student.target_ids(ex.record.text or "")) for exs in splits.values() for ex in exs)
        max_new = min(cfg.max_new_tokens, max_target + 8)
        eval_sets = {k: _eval_records(v, cfg.eval_limit) for k, v in splits.items()}
        before = _eval_torch(student, eval_sets, vocab, max_new, progress, "student before", injector)
        fingerprint = _sha({"student": _model_fingerprint(student_dir),
                            "data": [(e.record.id, e.record.prompt, e.record.text, e.kl) for e in splits["train"]],
                            "cfg": {k: v for k, v in asdict(cfg).items() if k in _TRAINING_FIELDS}})
        trained, stats = train_student(student, splits["train"], cfg, checkpoint=work / CHECKPOINT,
                                       fingerprint=fingerprint, teacher=teacher, progress=progress, on_step=on_step,
                                       injector=injector)
        teacher = None
        if injector is not None:
            injector.detach(trained)
            torch.save(injector.net.state_dict(), work / "region_projector.pt")
        student.model = merged_model(trained)
        merged_dir = save_student(student.model, student_dir, work / "student")

        # 4. evaluate
        after = _eval_torch(student, eval_sets, vocab, max_new, progress, "student after", injector)
        ablation = None
        if cfg.ablation:
            from linecam.export.vlm.grounding import row, run_ablation

            split = "holdout" if after.get("holdout", {}).get("n") else "train"
            ablation = {"split": split, "rows": {("inject" if injector else "prompt"): {**row(after[split], "torch"),
                                                                                      "split": split}}}
            ablation["rows"].update(run_ablation(student_dir, usable, cfg, vocab, work, progress, max_new,
                                                 ("prompt", "none") if injector else ("none",)))
    gate_split = "holdout" if after.get("holdout", {}).get("n") else "train"
    agreement = after[gate_split]["agreement"]
    location = after[gate_split]["fields"].get("location")  # None: the references name no location
    report: dict[str, Any] = {
        "teacher": str(teacher_dir), "student": str(student_dir), "review_file": str(review),
        "review_sha256": hashlib.sha256(review.read_bytes()).hexdigest(), "records": summary,
        "method": {"mode": "full" if cfg.full_finetune else "lora", "lora_r": None if cfg.full_finetune else cfg.lora_r,
                   "kl_weight": cfg.kl_weight, "region_tokens": cfg.region_tokens,
                   "train_projector_only": cfg.train_projector_only, "steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr,
                   "seed": cfg.seed, "device": str(student.device)},
        "training": {k: v for k, v in asdict(stats).items() if k != "history"},
        "before": before, "after": after,
        "gate": {"split": gate_split, "agreement": agreement, "min_agreement": cfg.min_agreement,
                 "location": location, "min_location": cfg.min_location,
                 "passed": agreement >= cfg.min_agreement and (location or 0.0) >= cfg.min_location,
                 "forced": False},
        "max_target_tokens": max_target, "seconds": round(time.perf_counter() - t_start, 1),
        "versions": _versions(), "vocabulary": [" ".join(k) for k in vocab.kinds],
    }
    if ablation is not None:
        report["ablation"] = ablation
    if gate_split == "train":
        logger.warning("no held-out records (--holdout 0 or too few images): the gate reads agreement on the "
                       "training records, which says little about new defects")
    if max_target > 48:
        logger.warning("the longest description is %d tokens; the daemon stops at vlm.max_new_tokens (48 by "
                       "default): raise it in the line config", max_target)
    report_path = _write_json(work / REPORT_FILE, report)
    logger.info("agreement %s: %.2f (before training %.2f); report %s", gate_split, agreement,
                before.get(gate_split, {}).get("agreement", 0.0), report_path)
    if not export:
        return DistilResult(review, report, report_path)
    if not report["gate"]["passed"]:
        if not cfg.force and agreement < cfg.min_agreement:
            raise DistilError(f"distilled student agrees with the descriptions on {agreement:.0%} of the {gate_split} "
                              f"records, below --min-agreement {cfg.min_agreement:.0%}: no bundle written (see "
                              f"{report_path}); train longer, add images, or pass --force to export anyway")
        if not cfg.force:
            raise DistilError(f"distilled student names the right location on {location or 0.0:.0%} of the {gate_split} "
                              f"records, below --min-location {cfg.min_location:.0%}: no bundle written (see "
                              f"{report_path}); add --region-tokens, train longer, or pass --force")
        report["gate"]["forced"] = True
        logger.warning("exporting a student below --min-agreement because of --force")

    # 5. export, then score the exported bundle with the edge runtime
    report["exported"] = {gate_split: export_and_score(merged_dir, out, cfg, name or out.name,
                                                       eval_sets[gate_split], vocab, max_new, injector)}
    if ablation is not None and injector is not None and ablation["split"] == gate_split:
        from linecam.export.vlm.grounding import row

        ablation["rows"]["inject_onnx"] = {**row(report["exported"][gate_split], "onnxruntime"), "split": gate_split}
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    _write_json(work / REPORT_FILE, report)
    bundle_report = _write_json(out / REPORT_FILE, report)
    _record_in_manifest(out, report)
    return DistilResult(review, report, bundle_report, out)


def describe_images(images: str | Path, expert_bundle: str | Path, review: Path, teacher_dir: Path,
                    cfg: DistilConfig, progress: Any) -> tuple[list[DescriptionRecord], HfVlm | None]:
    """Stages 1 and 2: the review file's records, brought up to date and described.

    Returns the records and the teacher when it had to be loaded (None otherwise).
    """
    from linecam.export.vlm.teacher import describe, needs_teacher

    builder = RegionPromptBuilder(cfg.prompt)
    locator = RegionLocator(expert_bundle, image_threshold=cfg.image_threshold,
                            pixel_threshold=cfg.pixel_threshold, min_area_px=cfg.min_region_area_px)
    existing = read_records(review) if review.is_file() else []
    records = prepare_records(list_defect_images(images), locator, builder, existing, holdout=cfg.holdout,
                              seed=cfg.seed)
    write_records(review, records)
    no_regions = sum(not r.regions for r in records)
    if no_regions:
        logger.warning("%d of %d image(s): the region expert finds no defect; they are not used (see 'note' in %s)",
                       no_regions, len(records), review)
    teacher = None
    if any(needs_teacher(r) for r in records):
        logger.info("loading teacher %s", teacher_dir)
        teacher = HfVlm(teacher_dir, device=cfg.device, dtype=cfg.teacher_dtype, quant=cfg.teacher_quant)
        describe(records, teacher, builder, max_new_tokens=cfg.max_new_tokens,
                 save=lambda: write_records(review, records), progress=progress)
        write_records(review, records)
    return records, teacher


def _summary(records: Sequence[DescriptionRecord]) -> dict[str, int]:
    usable = [r for r in records if r.usable]
    return {"images": len(records), "usable": len(usable), "no_regions": sum(not r.regions for r in records),
            "reviewed": sum(r.reviewed for r in records),
            "edited": sum(r.text is not None and r.text != r.teacher_text for r in records),
            "train": sum(r.split == "train" for r in usable), "holdout": sum(r.split == "holdout" for r in usable)}


def export_and_score(merged_dir: Path, out: Path, cfg: DistilConfig, name: str, examples: Sequence[Example],
                     vocab: Vocabulary, max_new: int, injector: Any = None) -> dict[str, Any]:
    """Export the merged student (and its region projector) to the bundle ``out``; score what the
    edge runtime says."""
    from linecam.export.vlm.export import export_vlm
    from linecam.export.vlm.grounding import evaluate, onnx_generator

    export_vlm(merged_dir, out, name=name, quantize=cfg.quantize, fp16=cfg.fp16)
    if injector is not None:
        from linecam.export.vlm.projector import export_projector

        probe = np.stack([ex.features for ex in examples[:16]]) if examples else None
        export_projector(injector.net, out, placeholder=injector.placeholder, probe=probe)
    with make_progress(cfg.progress) as progress:
        return evaluate(onnx_generator(out, max_new, injector is not None), examples[: cfg.export_eval_limit], vocab,
                        progress, "bundle")


def _record_in_manifest(out: Path, report: dict[str, Any]) -> None:
    from linecam.bundle import write_manifest
    from linecam.runtime.vlm.bundle import load_vlm_bundle

    man = load_vlm_bundle(out).manifest
    quality = dict(man.quality)
    quality["distillation"] = {"split": report["gate"]["split"], "agreement": report["gate"]["agreement"],
                               "overlap": report["after"][report["gate"]["split"]]["overlap"],
                               "exported_agreement": next(iter(report["exported"].values()))["agreement"],
                               "location": report["gate"]["location"], "forced": report["gate"]["forced"]}
    if "ablation" in report:
        quality["grounding_ablation"] = {k: {f: v.get(f) for f in ("n", "location", "kind", "size", "runtime")}
                                         for k, v in report["ablation"]["rows"].items()}
    extra = dict(man.extra)
    extra["distillation"] = {"teacher": Path(report["teacher"]).name, "student": Path(report["student"]).name,
                             "review_sha256": report["review_sha256"], "method": report["method"],
                             "report": REPORT_FILE}
    write_manifest(out, man.model_copy(update={"quality": quality, "extra": extra}))  # type: ignore[arg-type]
