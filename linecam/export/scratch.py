"""The "scratch" region expert: a small segmentation CNN trained from scratch on good
images with synthetic anomalies (DRAEM-style), exported to ONNX, calibrated on the
*exported* model and written as a linecam bundle.

Why this design:

* no pretrained backbone: nothing to download on an air-gapped workstation, and the
  net is small enough to train in minutes on a laptop CPU;
* a plain conv/BN/ReLU U-Net with static shapes: exports to a compact ONNX graph that
  TensorRT builds without plugins, and runs at camera rate on small edge GPUs;
* the image score is computed *inside* the graph (max of a k x k mean-pooled map), so
  every backend agrees on it, and a single noisy pixel cannot reject a part;
* thresholds come from held-out good images (and jittered copies) run through onnxruntime, i.e. from the
  model that is deployed, not the torch model it was exported from;
* synthetic anomalies are painted on the source image, which then goes through the
  same :class:`linecam.preprocess.Preprocessor` (recorded in the bundle) as at
  inference: there is one preprocessing definition.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from linecam.progress import make_progress
from linecam.export.torch_device import LossLog, describe_device, gpu_memory_errors, pick_device
from linecam.bundle import (
    Manifest,
    OutputsSpec,
    TensorSpec,
    file_entry,
    new_provenance,
    source_hash,
    write_manifest,
)
from linecam.calibration.thresholds import fit_image_threshold, fit_pixel_threshold, to_thresholds
from linecam.errors import BundleError
from linecam.export.anomalies import RECIPES
from linecam.export.eval_set import EVAL_GOOD, eval_set, note_threshold_warning
from linecam.export.gate import run_expert
from linecam.export.layers import cbr
from linecam.export.images import (  # noqa: F401
    IMAGE_SUFFIXES, MIN_IMAGES, SourceImage, aspect_warning, list_images, split_holdout)
from linecam.export.onnx_export import INPUT_NAME, MAP_NAME, SCORE_NAME, export_onnx
from linecam.export.sampler import AnomalySampler
from linecam.preprocess import PreprocessSpec, Preprocessor

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
TRAINING_FILE = "training.json"
#: The map's scale (manifest ``extra["map_scale"]``; bundles without it: ``LEGACY_MAP_SCALE``, a
#: sigmoid that saturates at 1.0, issue 21), see :func:`expert_map`.
MAP_SCALE, LEGACY_MAP_SCALE = "sigmoid+relu_logit", "sigmoid"
#: Upper bound of the fitted pixel threshold: the map at logit 0 (p = 0.5) on both scales.
PIXEL_THRESHOLD_CAP = 0.5


# --------------------------------------------------------------------------- model




class ScratchExpert(nn.Module):
    """U-Net-lite: ``[N, 3, H, W]`` normalised image -> ``(anomaly_map [N, 1, H, W], score [N])``.

    A stride-2 stem, three stride-2 stages (receptive field ~1/4 of a 256 input,
    enough to know the normal texture around a pixel), nearest-neighbour upsampling
    with skip connections, and a bilinear upsample of the half-resolution logits to
    the input size. ``H`` and ``W`` must be multiples of 16. The score is the max of
    the ``score_pool`` x ``score_pool`` mean-pooled map.
    """

    def __init__(self, base_width: int = 12, score_pool: int = 9) -> None:
        super().__init__()
        w = base_width
        self.base_width = base_width
        self.score_pool = score_pool
        self.stem = nn.Sequential(cbr(3, w, 2), cbr(w, w))
        self.down1 = nn.Sequential(cbr(w, 2 * w, 2), cbr(2 * w, 2 * w))
        self.down2 = nn.Sequential(cbr(2 * w, 4 * w, 2), cbr(4 * w, 4 * w))
        self.down3 = nn.Sequential(cbr(4 * w, 8 * w, 2), cbr(8 * w, 8 * w), cbr(8 * w, 8 * w))
        self.up2 = cbr(12 * w, 4 * w)
        self.up1 = cbr(6 * w, 2 * w)
        self.up0 = cbr(3 * w, w)
        self.head = nn.Conv2d(w, 1, 1)
        # Start "everything is good": anomalous pixels are rare, and a neutral start
        # makes the first focal-loss steps huge and noisy.
        nn.init.constant_(self.head.bias, -4.0)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        e0 = self.stem(x)
        e1 = self.down1(e0)
        e2 = self.down2(e1)
        e3 = self.down3(e2)
        y = self.up2(torch.cat([F.interpolate(e3, scale_factor=2.0, mode="nearest"), e2], 1))
        y = self.up1(torch.cat([F.interpolate(y, scale_factor=2.0, mode="nearest"), e1], 1))
        y = self.up0(torch.cat([F.interpolate(y, scale_factor=2.0, mode="nearest"), e0], 1))
        return F.interpolate(self.head(y), size=x.shape[-2:], mode="bilinear", align_corners=False)

    def score(self, amap: torch.Tensor) -> torch.Tensor:
        pooled = F.avg_pool2d(amap, self.score_pool, stride=1)
        return torch.amax(pooled, dim=(1, 2, 3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        amap = expert_map(self.logits(x))
        return amap, self.score(amap)


def build_expert(encoder: str, spec: PreprocessSpec, *, base_width: int, score_pool: int,
                 encoder_lr_scale: float = 0.0) -> nn.Module:
    """The net to train: the from-scratch U-Net (``encoder="none"``) or a decoder on a pretrained
    encoder (frozen, or fine-tuned at ``encoder_lr_scale``); both map a normalised image to
    ``(anomaly map, score)``."""
    if encoder == "none":
        return ScratchExpert(base_width=base_width, score_pool=score_pool)
    from linecam.export.encoder_expert import EncoderExpert

    return EncoderExpert(encoder, mean=tuple(spec.mean), std=tuple(spec.std), score_pool=score_pool,
                         encoder_lr_scale=encoder_lr_scale)


def _encoder_training(model: nn.Module) -> str:
    scale = getattr(model, "encoder_lr_scale", 0.0)
    return f"fine-tuned at {scale:g}x lr" if scale else "frozen"


def expert_map(logits: torch.Tensor) -> torch.Tensor:
    """``sigmoid(z) + max(0, z)``: for z < 0 the old sigmoid map bit for bit (good images, hence
    thresholds, as before); above, the log-odds keep a stronger defect scoring higher. Not bare
    logits: thresholds must stay positive (scores are published as ``raw / threshold``) and the
    small-sample rule (a margin on heights above the good floor) wants non-negative scores. Not
    softplus: float32 rounds it to 0 for z < -16."""
    return torch.sigmoid(logits) + F.relu(logits)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Binary focal loss (soft targets allowed), mean over pixels."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * target + (1 - p) * (1 - target)
    return ((1 - p_t) ** gamma * bce).mean()


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft dice over the whole batch (per-image dice is undefined on good images)."""
    p = torch.sigmoid(logits)
    inter = (p * target).sum()
    return 1 - (2 * inter + eps) / (p.sum() + target.sum() + eps)


@dataclass
class TrainResult:
    losses: list[float]
    seconds: float

    @property
    def final_loss(self) -> float:
        tail = self.losses[-max(1, len(self.losses) // 20):]
        return float(np.mean(tail))


def _lr_at(step: int, steps: int, lr: float) -> float:
    """Short linear warm-up, then cosine decay to 2 % of ``lr``."""
    warm = max(1, steps // 20)
    if step < warm:
        return lr * (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t)))


def train(model: nn.Module, sampler: AnomalySampler, *, steps: int, batch_size: int, lr: float,
          weight_decay: float = 1e-4, dice_weight: float = 0.5, progress: bool = True,
          device: torch.device | None = None) -> TrainResult:
    """Train on ``device`` (default: the CPU); the model is back on the CPU when this returns,
    since export, calibration and the gate run there."""
    device = device or torch.device("cpu")
    # channels_last: oneDNN's fast convolution layout on CPU (~1.6x faster training here); cuDNN's too.
    model.to(device=device, memory_format=torch.channels_last)
    # Trainable parameters only: a frozen pretrained encoder (encoder_expert) is not decayed either;
    # a fine-tuned one learns at its own share of ``lr`` (its param_groups' "lr_scale").
    groups = (model.param_groups(lr) if hasattr(model, "param_groups")
              else [{"params": [p for p in model.parameters() if p.requires_grad]}])
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    log = LossLog()
    t0 = time.perf_counter()
    model.train()
    bar = make_progress(progress, "loss {task.fields[loss]:.4f}")
    with bar:
        task = bar.add_task("training scratch expert", total=steps, loss=float("nan"))
        for step in range(steps):
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, steps, lr) * g.get("lr_scale", 1.0)
            x, y = sampler.batch(batch_size)
            x, y = x.to(device).contiguous(memory_format=torch.channels_last), y.to(device)
            logits = model.logits(x)
            loss = focal_loss(logits, y)
            if dice_weight:
                loss = loss + dice_weight * dice_loss(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            log.add(loss)
            if step % 10 == 0 or step == steps - 1:
                bar.update(task, completed=step + 1, loss=log.recent_mean())
    model.eval()
    model.to(device="cpu", memory_format=torch.contiguous_format)  # plain layout for export
    return TrainResult(log.values(), time.perf_counter() - t0)


# --------------------------------------------------------------------------- calibration


def score_onnx(model_path: str | Path, images: Sequence[SourceImage], spec: PreprocessSpec, *,
               threads: int | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """(image scores, anomaly maps) of ``images`` from the exported model via onnxruntime."""
    pre = Preprocessor(spec)
    x = np.empty((len(images), 3, *spec.input_size), np.float32)
    for i, s in enumerate(images):
        x[i] = pre(s.image, s.bit_depth)[0]  # the preprocessor's own buffer, copied in: no list of arrays
    maps, scores = run_expert(Path(model_path), x, threads)
    return scores, list(maps)


# --------------------------------------------------------------------------- public entry


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__, "opencv": cv2.__version__}


def fit_scratch_expert(
    images: str | Path,
    out: str | Path,
    *,
    input_size: tuple[int, int] = (256, 256),
    steps: int = 1000,
    batch_size: int = 8,
    lr: float = 2e-3,
    base_width: int = 12,
    seed: int = 0,
    holdout: float = 0.2,
    target_frr: float = 0.01,
    sensitivity: float = 1.0,
    name: str | None = None,
    progress: bool = True,
    preprocess: PreprocessSpec | None = None,
    anomaly_ratio: float = 0.5,
    recipe_weights: dict[str, float] | None = None,
    score_pool: int = 9,
    dice_weight: float = 0.5,
    threads: int | None = None,
    encoder: str = "none",
    encoder_lr_scale: float = 0.0,
    device: str = "auto",
) -> Path:
    """Train a scratch expert on the good images in ``images`` and write a bundle to ``out``.

    ``holdout`` of the images (deterministic given ``seed``) are kept out of training
    and run, with jittered copies of them, through the exported ONNX model to fit the thresholds (``target_frr`` is
    the wanted false-reject rate on good parts). ``preprocess`` overrides the default
    :class:`PreprocessSpec` (e.g. to add a crop); its ``input_size`` must equal
    ``input_size``. ``threads`` caps torch's and onnxruntime's CPU threads for this
    call (default: theirs); on a CPU shared with other jobs, 1 is often several times
    faster than oversubscribed threads spinning against each other. ``encoder``: ``"none"``
    trains the whole U-Net from scratch; ``"efficientnet-lite0"`` trains a decoder on that
    ImageNet encoder (:mod:`linecam.export.encoder_expert`; ``base_width`` is then unused), frozen,
    or fine-tuned at ``encoder_lr_scale`` x ``lr`` when that is above 0. ``device`` (auto / cpu /
    cuda, :func:`~linecam.export.torch_device.pick_device`) is where it trains; export and
    thresholds run on the CPU. Returns the bundle folder.
    """
    if threads is not None and threads < 1:
        raise BundleError(f"threads must be >= 1, got {threads}")
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _fit(images, out, input_size=input_size, steps=steps, batch_size=batch_size, lr=lr,
                    base_width=base_width, seed=seed, holdout=holdout, target_frr=target_frr,
                    sensitivity=sensitivity, name=name, progress=progress, preprocess=preprocess,
                    anomaly_ratio=anomaly_ratio, recipe_weights=recipe_weights, score_pool=score_pool,
                    dice_weight=dice_weight, threads=threads, encoder=encoder,
                    encoder_lr_scale=encoder_lr_scale, device=pick_device(device))
    finally:
        torch.set_num_threads(previous)  # the caller's process setting, restored


def _fit(images: str | Path, out: str | Path, *, input_size: tuple[int, int], steps: int, batch_size: int,
         lr: float, base_width: int, seed: int, holdout: float, target_frr: float, sensitivity: float,
         name: str | None, progress: bool, preprocess: PreprocessSpec | None, anomaly_ratio: float,
         recipe_weights: dict[str, float] | None, score_pool: int, dice_weight: float,
         threads: int | None, encoder: str, encoder_lr_scale: float, device: torch.device) -> Path:
    t_start = time.perf_counter()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BundleError(f"--out {out} is a file: give a folder for the bundle")
    h, w = input_size
    if h % 16 or w % 16 or h < 32 or w < 32:
        raise BundleError(f"input size {h}x{w} is not supported: use multiples of 16, at least 32 (e.g. 256x256)")
    if steps < 1 or batch_size < 1:
        raise BundleError("steps and batch size must be >= 1")
    spec = preprocess or PreprocessSpec(input_size=(h, w))
    if tuple(spec.input_size) != (h, w):
        raise BundleError(f"preprocess.input_size {spec.input_size} != input_size {input_size}: give one size")
    if recipe_weights is not None:
        unknown = set(recipe_weights) - set(RECIPES)
        if unknown:
            raise BundleError(f"unknown anomaly recipe(s) {sorted(unknown)}: choose from {sorted(RECIPES)}")

    sources = list_images(images)
    if spec.crop is not None:
        Preprocessor(spec).crop(sources[0].image)  # fail now, not after training, if it does not fit
    if odd := aspect_warning(spec, sources[0].image):
        logger.warning("SIZE: %s", odd)
    train_idx, hold_idx = split_holdout(len(sources), holdout, seed)
    train_set = [sources[i] for i in train_idx]
    hold_set = [sources[i] for i in hold_idx]
    logger.info("%d images: %d for training, %d held out for thresholds", len(sources), len(train_set),
                len(hold_set))

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    if encoder_lr_scale < 0:
        raise BundleError(f"encoder_lr_scale must be >= 0, got {encoder_lr_scale}")
    model = build_expert(encoder, spec, base_width=base_width, score_pool=score_pool,
                         encoder_lr_scale=encoder_lr_scale if encoder != "none" else 0.0)
    sampler = AnomalySampler(train_set, spec, rng, anomaly_ratio=anomaly_ratio, recipe_weights=recipe_weights)
    logger.info("training the scratch expert on %s", describe_device(device))
    with gpu_memory_errors("training the scratch expert"):
        result = train(model, sampler, steps=steps, batch_size=batch_size, lr=lr, dice_weight=dice_weight,
                       progress=progress, device=device)
    logger.info("trained %d steps in %.1f s, final loss %.4f", steps, result.seconds, result.final_loss)

    out.mkdir(parents=True, exist_ok=True)
    model_path = export_onnx(model, out / MODEL_FILE, (h, w), seed=seed)

    # Thresholds from the deployed artefact (onnxruntime), never from torch, on the held-out good
    # images and jittered copies of them (eval_set: a 20 % split alone misses the good tail), as
    # distil and text-expert fit theirs; and loudly when that cannot show the target rate.
    n_hold = len(hold_set)
    ev = eval_set(hold_set, spec, seed, max(EVAL_GOOD, n_hold), 0)
    maps, scores = run_expert(model_path, ev.x, threads)
    image_fit = fit_image_threshold(scores, target_frr=target_frr, sensitivity=sensitivity)
    thresholds = to_thresholds(image_fit, fit_pixel_threshold(maps, target_frr=target_frr, sensitivity=sensitivity),
                               pooled_score=True)
    if thresholds.pixel > PIXEL_THRESHOLD_CAP:
        # At 0.5 (logit 0) the net itself calls the pixel anomalous, so a region threshold
        # beyond it would hide regions of real defects.
        details_px = {**thresholds.details["pixel"], "fitted": thresholds.pixel, "capped_at": PIXEL_THRESHOLD_CAP}
        thresholds = thresholds.model_copy(update={
            "pixel": PIXEL_THRESHOLD_CAP, "details": {**thresholds.details, "pixel": details_px}})

    note_threshold_warning(thresholds, image_fit, hold_set, scores)

    train_scores, _ = score_onnx(model_path, train_set, spec, threads=threads)
    folder = Path(images)
    details = {
        "expert": "scratch",
        "images": str(folder.resolve()),
        "n_train": len(train_set),
        "n_holdout": len(hold_set),
        "holdout_files": [s.path.name for s in hold_set],
        "train_sha256": source_hash([s.sha256 for s in train_set]),
        "holdout_sha256": source_hash([s.sha256 for s in hold_set]),
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "base_width": base_width,
        "encoder": encoder,
        "encoder_sha256": getattr(model, "encoder_sha256", None),
        "encoder_lr_scale": getattr(model, "encoder_lr_scale", None),
        "anomaly_ratio": anomaly_ratio,
        "recipe_weights": recipe_weights or {k: v for k, (_, v) in RECIPES.items()},
        "final_loss": result.final_loss,
        "train_seconds": round(result.seconds, 2),
        "threads": torch.get_num_threads(),
        "train_device": describe_device(device),
        "train_score_max": float(train_scores.max()),
        "holdout_score_max": float(scores[:n_hold].max()),
    }
    manifest = Manifest(
        name=name or out.resolve().name,
        input=TensorSpec(name=INPUT_NAME, shape=[1, 3, h, w], dtype="float32", layout="NCHW"),
        preprocess=spec,
        outputs=OutputsSpec(
            anomaly_map=TensorSpec(name=MAP_NAME, shape=[1, 1, h, w], dtype="float32", layout="NCHW"),
            image_score=TensorSpec(name=SCORE_NAME, shape=[1], dtype="float32"),
        ),
        thresholds=thresholds,
        files={"onnx_fp32": file_entry(out, MODEL_FILE)},
        provenance=new_provenance(
            tool_versions=_versions(),
            # What the bundle was made from: every image used, training and held out.
            source_sha256=source_hash([s.sha256 for s in sources]),
            details=details,
        ),
        extra={
            "expert": "scratch",
            "architecture": "unet-lite" if encoder == "none" else f"{encoder} encoder ({_encoder_training(model)}) + u-net decoder",
            "encoder": encoder,
            "base_width": base_width,
            "score_pool": score_pool,
            "score": f"max of the {score_pool}x{score_pool} mean-pooled anomaly map",
            "map_scale": MAP_SCALE,  # no "map_range": the map grows without bound
        },
    )
    (out / TRAINING_FILE).write_text(json.dumps({
        "losses": [round(v, 6) for v in result.losses],
        "final_loss": result.final_loss,
        "train_seconds": result.seconds,
        "total_seconds": time.perf_counter() - t_start,
        "holdout_scores": {s.path.name: float(v) for s, v in zip(hold_set, scores[:n_hold])},
        "train_scores": {s.path.name: float(v) for s, v in zip(train_set, train_scores)},
    }, indent=1) + "\n")
    write_manifest(out, manifest)
    logger.info("bundle written to %s (image threshold %.4f, pixel threshold %.4f)", out,
                thresholds.image, thresholds.pixel)
    return out
