"""``export-engine text-expert``: the text-prompted region expert (CLIP / SigLIP + prompts.yaml).

Kept out of :mod:`linecam.export.cli` (at its size limit); registered on the same group there.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click

from linecam.export.cli_quant import quant_kwargs, quant_options


def _scales(value: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in value.replace(" ", "").split(",") if v)
    except ValueError:
        out = ()
    if not out or any(k < 1 or k % 2 == 0 for k in out):
        raise click.BadParameter(f"{value!r}: give odd window sizes in patches, comma separated, e.g. 1,3")
    return out


@click.command("text-expert")
@click.option("--clip", "clip_dir", required=True, type=click.Path(path_type=Path),
              help="Local Hugging Face CLIP or SigLIP folder (config.json, weights, tokenizer); none ships "
                   "with linecam: zero-shot quality is that of these weights.")
@click.option("--prompts", required=True, type=click.Path(path_type=Path),
              help="prompts.yaml: object, optional normal/abnormal states and templates, named regions.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Bundle folder to write.")
@click.option("--images", type=click.Path(path_type=Path), default=None,
              help="Folder of good images: few-shot memory bank, thresholds for --target-frr, INT8 "
                   "calibration and the accuracy gate. Without it: zero-shot, thresholds at p=0.5, FP32 only.")
@click.option("--zero-shot", is_flag=True, help="With --images: no memory bank (images fit thresholds only).")
@click.option("--scales", default="1,3", show_default=True,
              help="Window sizes in patches over which patch features are averaged (WinCLIP's windows).")
@click.option("--text-weight", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Few-shot: weight of the text map against the good-patch bank map.")
@click.option("--coreset-ratio", type=click.FloatRange(0, 1, min_open=True), default=0.1, show_default=True,
              help="Few-shot: fraction of good patch features kept in the memory bank.")
@click.option("--holdout", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.2,
              show_default=True, help="Fraction of --images kept out of the bank for the gate and thresholds.")
@quant_options("Precisions besides FP32 (need --images): comma list of fp16, int8; 'none' for FP32 only.")
@click.option("--target-frr", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.01,
              show_default=True, help="Wanted false-reject rate on good parts (with --images).")
@click.option("--sensitivity", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help=">1 lowers the thresholds (catch more, reject more good parts), <1 raises them.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--name", default=None, help="Model name recorded in the bundle (default: the --out folder name).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads for torch and ONNX Runtime.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars; warnings and errors only.")
def text_expert(clip_dir: Path, prompts: Path, out: Path, images: Path | None, zero_shot: bool, scales: str,
                text_weight: float, coreset_ratio: float, holdout: float, target_frr: float, sensitivity: float,
                seed: int, name: str | None, threads: int | None, quiet: bool, **quant: Any) -> None:
    """Text-prompted region expert (WinCLIP-style): prompt embeddings baked into a CLIP image graph."""
    if quiet:
        logging.getLogger().setLevel(logging.WARNING)
    if zero_shot and images is None:
        raise click.UsageError("--zero-shot only changes what --images does: add --images <good images>, or "
                               "leave both out for a pure zero-shot bundle")
    quant = quant_kwargs(quant)
    if images is None and click.get_current_context().get_parameter_source("quantize") \
            is click.core.ParameterSource.DEFAULT:
        quant["quantize"] = ()  # pure zero-shot: nothing to calibrate or gate on; FP32 only, said in --help
    try:
        from linecam.export.text_bundle import TextExpertOptions, export_text_expert
    except ImportError as e:
        raise click.ClickException(f"export-engine text-expert needs torch and transformers ({e.name} is "
                                   f"missing): pip install 'linecam[export]'") from None
    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" bars
    options = TextExpertOptions(scales=_scales(scales), text_weight=text_weight, zero_shot=zero_shot,
                                coreset_ratio=coreset_ratio, holdout=holdout, seed=seed, target_frr=target_frr,
                                sensitivity=sensitivity, threads=threads, name=name, **quant)
    res = export_text_expert(clip_dir, prompts, out, images=images, options=options, progress=not quiet)
    if not quiet:
        labels = f", labels {', '.join(res.labels)}" if res.labels else ""
        click.echo(f"{res.mode} text expert{labels}: image threshold {res.thresholds['image']:.4g}, "
                   f"pixel threshold {res.thresholds['pixel']:.4g}")
        click.echo(f"bundle written: {res.bundle}")
