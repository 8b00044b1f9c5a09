"""Distil a teacher into a compact student, quantize it, prove the accuracy, write a bundle.

Pipeline (``export-engine distil``), every step cached under ``work_dir`` so that an
interrupted run resumes where it stopped and a re-run with other export options (e.g. a
new calibration set) does not retrain:

1. good images → train / held-out split (deterministic in ``seed``);
2. teacher: fit (DINOv2 memory bank) or train (scratch) on the training images;
3. distillation pool: augmented good images, half with synthetic anomalies, and the
   teacher's maps of them (sample ``i`` is a function of ``(seed, i)`` alone);
4. student trained to reproduce ``teacher map / scale`` (``scale``: the teacher's 99.9th
   percentile pixel on good samples, so a good pixel is ~<1 whatever the teacher's units), or
   its ``log1p`` when the teacher's defects reach far beyond that (:class:`~linecam.export.pool.Target`);
   checkpoints every ``checkpoint_every`` steps, batch ``s`` drawn from ``(seed, s)``;
5. ONNX FP32 export (torch parity checked), FP16 and INT8 (symmetric Q/DQ, calibrated on
   real images preprocessed exactly as on the line);
6. accuracy gate on held-out images (good + synthetic anomalies + any real bad images):
   FP16 / INT8 vs FP32 image AUROC and map agreement; fails the export unless ``force``;
7. thresholds from held-out good images on the deployed FP32 ONNX (F1-optimal when real
   bad images are given).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from linecam.bundle import (
    MANIFEST,
    Manifest,
    OutputsSpec,
    TensorSpec,
    file_entry,
    new_provenance,
    source_hash,
    write_manifest,
)
from linecam.calibration.metrics import auroc, pearson
from linecam.calibration.thresholds import fit_image_threshold, fit_pixel_threshold, to_thresholds
from linecam.errors import BundleError
from linecam.export.eval_set import EVAL_GOOD, eval_set, note_threshold_warning
from linecam.export.gate import run_expert
from linecam.export.images import aspect_warning
from linecam.export.quantize import CALIBRATION_ANOMALY_RATIO
from linecam.export.onnx_export import INPUT_NAME, MAP_NAME, SCORE_NAME, export_onnx
from linecam.export.pool import SCALE_QUANTILE, Pool, Target, build_pool, map_scale, student_target  # noqa: F401
from linecam.export.sampler import AnomalySampler
from linecam.export.scratch import (
    _lr_at,
    _versions,
    list_images,
    split_holdout,
)
from linecam.export.student import SIZES, STRIDE, STUDENTS, downsample, image_score, input_multiple, make_student, map_size
from linecam.export.teachers import Teacher
from linecam.export.torch_device import LossLog, describe_device, gpu_memory_errors, pick_device
from linecam.export.variants import FP16_FILE, GATE_FILE, INT8_FILE, QuantOptions, quantize_and_gate  # noqa: F401
from linecam.preprocess import PreprocessSpec, Preprocessor
from linecam.progress import make_progress

logger = logging.getLogger(__name__)

FP32_FILE = "model.onnx"
REPORT_FILE = "distil.json"
#: Below this student-vs-teacher map correlation on held-out images the export warns.
MIN_DISTIL_PEARSON = 0.9
#: What :func:`train_student` minimises (part of a checkpoint's key).
TRAIN_OBJECTIVE = "mse(raw map, target(teacher))"


@dataclass
class DistilOptions(QuantOptions):
    """``export-engine distil``'s choices (quantization and gate ones: :class:`QuantOptions`)."""

    #: ``lite0`` (ImageNet-initialised) by default: on real photographs the plain ``s`` student kept
    #: 0.85 / 0.90 of its encoder-expert teacher's 0.92 / 0.95 image / pixel AUROC, ``lite0`` 0.93 / 0.95.
    student: str = "lite0"
    steps: int = 1500
    batch_size: int = 8
    lr: float = 3e-3
    pool_size: int = 512
    seed: int = 0
    holdout: float = 0.2
    target_frr: float = 0.01
    sensitivity: float = 1.0
    score_pool: int = 3
    #: Share of calibration images given a synthetic anomaly (see quantize.CALIBRATION_ANOMALY_RATIO).
    calib_anomaly_ratio: float = CALIBRATION_ANOMALY_RATIO
    checkpoint_every: int = 100
    eval_good: int = EVAL_GOOD
    eval_bad: int = 64
    threads: int | None = None
    #: Where the teacher trains and the student learns: auto (the CUDA GPU if torch sees one), cpu, cuda.
    device: str = "auto"
    name: str | None = None


@dataclass
class DistilResult:
    bundle: Path
    distillation: dict[str, Any]
    gate: dict[str, Any] | None
    thresholds: dict[str, float]
    seconds: dict[str, float] = field(default_factory=dict)


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_identity(describe: dict[str, Any]) -> dict[str, Any]:
    """A teacher's ``describe()`` as a cache key: without a path ``X`` wherever ``X_sha256`` says
    what the file holds (``source``, ``bundle``), so a work dir (or a virtualenv holding the
    weights) moved or restored elsewhere keeps its trained teacher, pool and student."""
    out = {}
    for k, v in describe.items():
        if f"{k}_sha256" in describe:
            continue
        out[k] = cache_identity(v) if isinstance(v, dict) else v
    return out


# --------------------------------------------------------------------------- training


def train_student(model: nn.Module, pool: Pool, target: Target, ckpt: Path, key: str, *, steps: int, batch_size: int,
                  lr: float, seed: int, every: int, progress: bool = True,
                  device: torch.device | None = None) -> list[float]:
    """Regress ``target(pool.t)`` on ``device`` (default: the CPU); resumes from ``ckpt`` when it
    belongs to the same run (``key``), whichever device wrote it. The model ends on the CPU."""
    device = device or torch.device("cpu")
    model.to(device)  # before the optimiser: its state lives beside the parameters
    # A pretrained student's encoder learns at a share of ``lr`` (its ``param_groups``).
    groups = model.param_groups(lr) if hasattr(model, "param_groups") else [{"params": list(model.parameters())}]
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=1e-4)
    log = LossLog()
    start = 0
    if ckpt.is_file():
        # Tensors and plain data only: no code from the file. map_location: a checkpoint written on a
        # GPU resumes on a CPU-only machine too (load_state_dict copies onto the model's device).
        state = torch.load(ckpt, weights_only=True, map_location="cpu")
        if state.get("key") == key:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            log = LossLog(state["losses"])
            start = int(state["step"])
            logger.info("resuming student training at step %d of %d (%s)", start, steps, ckpt)
    model.train()
    bar = make_progress(progress, "loss {task.fields[loss]:.5f}")
    with bar:
        task = bar.add_task(f"distilling student '{model.size}'", total=steps, completed=start,
                            loss=log.recent_mean())
        for step in range(start, steps):
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, steps, lr) * g.get("lr_scale", 1.0)
            idx = np.sort(np.random.default_rng([seed, 11, step]).choice(pool.n, batch_size, replace=False))
            x = torch.from_numpy(pool.x[idx].astype(np.float32)).to(device)
            t = torch.from_numpy(target(pool.t[idx]))[:, None].to(device)
            # The map before its clamp: targets are >= 0, and a clamped prediction has no gradient
            # where it is negative, so a region that once went negative stayed dead (a gravel
            # student lost one border column of its map for good: loss flat at 1/16 x t^2).
            loss = F.mse_loss(model.raw(x), t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            log.add(loss)
            done = step + 1
            if done % every == 0 or done == steps:
                tmp = ckpt.with_name(ckpt.name + ".tmp")
                torch.save({"key": key, "step": done, "model": model.state_dict(), "opt": opt.state_dict(),
                            "losses": log.values()}, tmp)
                tmp.replace(ckpt)
            if step % 10 == 0 or done == steps:
                bar.update(task, completed=done, loss=log.recent_mean())
    model.eval()
    model.to("cpu")  # export and the gate run on the CPU
    return log.values()


def student_manifest(name: str, spec: PreprocessSpec, student: str, score_pool: int, thresholds: Any,
                     files: dict[str, Any], provenance: Any, **extra: Any) -> Manifest:
    """The manifest of a student bundle (the ONNX contract every student shares); ``extra`` adds
    to the manifest's ``extra`` (teacher, gate, ...)."""
    h, w = spec.input_size
    return Manifest(
        name=name,
        input=TensorSpec(name=INPUT_NAME, shape=[1, 3, h, w], dtype="float32", layout="NCHW"),
        preprocess=spec,
        outputs=OutputsSpec(
            anomaly_map=TensorSpec(name=MAP_NAME, shape=[1, 1, *map_size((h, w))], dtype="float32",
                                   layout="NCHW"),
            image_score=TensorSpec(name=SCORE_NAME, shape=[1], dtype="float32"),
        ),
        thresholds=thresholds,
        files=files,
        provenance=provenance,
        extra={
            "expert": "student",
            "architecture": ("EfficientNet-Lite0 stages to stride 16 (fine-tuned from ImageNet) + conv head, "
                             "map at 1/8 resolution" if student == "lite0"
                             else "plain conv regression student, map at 1/8 resolution"),
            "student_size": student,
            **({"base_width": SIZES[student]} if student in SIZES else {}),
            "score_pool": score_pool,
            "score": f"max of the {score_pool}x{score_pool} mean-pooled anomaly map",
            **extra,
        },
    )


# --------------------------------------------------------------------------- public entry


def distil(teacher: Teacher, images: str | Path, out: str | Path, *, work_dir: str | Path | None = None,
           options: DistilOptions | None = None, bad_images: str | Path | None = None,
           calib_images: str | Path | None = None, progress: bool = True) -> DistilResult:
    """Distil ``teacher`` into a student bundle at ``out``; see the module docstring.

    ``teacher`` is not yet fitted: its ``fit`` runs here on the training split (cached).
    Raises :class:`BundleError` when the accuracy gate fails (unless ``options.force``)."""
    o = options or DistilOptions()
    if o.student not in STUDENTS:
        raise BundleError(f"unknown student {o.student!r}: choose from {', '.join(STUDENTS)}")
    bad_q = set(o.quantize) - {"fp16", "int8"}
    if bad_q:
        raise BundleError(f"unknown quantization {sorted(bad_q)}: choose from fp16, int8 (or none)")
    previous = torch.get_num_threads()
    if o.threads:
        torch.set_num_threads(o.threads)
    try:
        with gpu_memory_errors("distil", "; a re-run resumes from its work dir (teacher, pool, last checkpoint)"):
            return _distil(teacher, images, out, work_dir, o, bad_images, calib_images, progress)
    finally:
        torch.set_num_threads(previous)


def _distil(teacher: Teacher, images: str | Path, out: str | Path, work_dir: str | Path | None, o: DistilOptions,
            bad_images: str | Path | None, calib_images: str | Path | None, progress: bool) -> DistilResult:
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BundleError(f"--out {out} is a file: give a folder for the bundle")
    spec = teacher.spec
    h, w = spec.input_size
    mult = input_multiple(o.student)
    if h % mult or w % mult or min(h, w) < 4 * STRIDE:
        hint = f"; --student s takes multiples of {STRIDE}" if mult > STRIDE else ""
        raise BundleError(f"input size {h}x{w}: student '{o.student}' needs multiples of {mult}, at least "
                          f"{4 * STRIDE} (e.g. 224 or 256){hint}")
    device = pick_device(o.device)  # before any training: a missing GPU fails in seconds
    work = Path(work_dir) if work_dir is not None else out.with_name(out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)

    sources = list_images(images)
    if spec.crop is not None:
        Preprocessor(spec).crop(sources[0].image)
    if odd := aspect_warning(spec, sources[0].image):
        logger.warning("SIZE: %s", odd)
    train_idx, hold_idx = split_holdout(len(sources), o.holdout, o.seed)
    train_set = [sources[i] for i in train_idx]
    hold_set = [sources[i] for i in hold_idx]
    bad_set = list_images(bad_images) if bad_images is not None else []
    spec_json = spec.model_dump(mode="json")
    data_key = [source_hash([s.sha256 for s in train_set]), spec_json, o.seed]
    logger.info("%d good images: %d for training, %d held out", len(sources), len(train_set), len(hold_set))

    # 2. teacher
    t = time.perf_counter()
    teacher_key = _key(cache_identity(teacher.describe()), data_key)
    teacher.fit(train_set, cache=work / f"teacher-{teacher_key}.pt", progress=progress)
    seconds["teacher_fit"] = time.perf_counter() - t

    # 3. pool
    t = time.perf_counter()
    pool_key = _key(cache_identity(teacher.describe()), data_key, o.pool_size, STRIDE)
    pool = Pool(work / f"pool-{pool_key}", o.pool_size, (h, w))
    sampler = AnomalySampler(train_set, spec, np.random.default_rng(o.seed), anomaly_ratio=0.5)
    build_pool(pool, teacher, sampler, o.seed, progress=progress)
    target = student_target(pool)
    seconds["pool"] = time.perf_counter() - t

    # 4. student
    t = time.perf_counter()
    torch.manual_seed(o.seed)
    student = make_student(o.student, o.score_pool, spec.mean, spec.std)
    # The objective is in the key: a checkpoint cached by the clamped-map loss (whose students
    # could lose a map column for good) is not resumed as if it were this one's.
    run_key = _key(pool_key, o.student, o.steps, o.batch_size, o.lr, o.score_pool, TRAIN_OBJECTIVE, target.log)
    ckpt = work / f"student-{o.student}-{run_key}.pt"
    logger.info("training the student on %s", describe_device(device))
    losses = train_student(student, pool, target, ckpt, run_key, steps=o.steps, batch_size=o.batch_size,
                           lr=o.lr, seed=o.seed, every=max(1, o.checkpoint_every), progress=progress, device=device)
    seconds["train"] = time.perf_counter() - t

    # 5. export. A bundle already in --out stops being one first: if this export fails (the gate,
    # Ctrl-C), the folder must not look like a bundle whose manifest names files now replaced.
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    try:  # parity checked on real pool inputs too: what the model will see on the line
        fp32 = export_onnx(student, out / FP32_FILE, (h, w), seed=o.seed, inputs=pool.x[:4].astype(np.float32))
    except BundleError as e:
        raise BundleError(f"{e}. The trained student is kept in {ckpt}: a re-run of the same command "
                          "reuses it (and the teacher) without training again") from None

    # distillation quality on held-out images
    t = time.perf_counter()
    ev = eval_set(hold_set, spec, o.seed, o.gate_images or o.eval_good, o.gate_images or o.eval_bad, bad_set)
    t_maps = target(downsample(teacher.maps(ev.x)))  # at the student's resolution, in its unit
    s_maps, s_scores = run_expert(fp32, ev.x, o.threads)
    t_scores = image_score(t_maps, o.score_pool)
    per_image = [pearson(a, b) for a, b in zip(s_maps, t_maps)]
    distillation = {
        "map_pearson": pearson(s_maps, t_maps),
        "map_pearson_per_image_median": float(np.nanmedian(per_image)),
        "score_pearson": pearson(s_scores, t_scores),
        "teacher_auroc": auroc(ev.labels, t_scores),
        "student_auroc": auroc(ev.labels, s_scores),
        "n_eval_good": int((ev.labels == 0).sum()),
        "n_eval_synthetic": ev.kinds.count("synthetic"),
        "n_eval_bad": ev.kinds.count("bad"),
        "map_scale": target.scale,
        "target": "log1p" if target.log else "linear",
        "defect_peak": target.defect_peak,
    }
    seconds["evaluate"] = time.perf_counter() - t
    logger.info("student vs teacher on held-out images: map Pearson %.3f, AUROC %.4f (teacher %.4f)",
                distillation["map_pearson"], distillation["student_auroc"], distillation["teacher_auroc"])
    if not distillation["map_pearson"] >= MIN_DISTIL_PEARSON:
        bigger = "--student lite0" if o.student in SIZES else "--student m or l"
        logger.warning("the student reproduces the teacher's maps with Pearson %.3f only (< %.2f): train longer "
                       "(--steps), another student (%s) or a bigger pool (--pool-size)",
                       distillation["map_pearson"], MIN_DISTIL_PEARSON, bigger)

    files = {"onnx_fp32": file_entry(out, FP32_FILE)}
    gate_dict: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None
    if o.quantize:
        t = time.perf_counter()
        calib_src = list_images(calib_images) if calib_images is not None else train_set
        v = quantize_and_gate(fp32, out, spec, calib_src,
                              str(Path(calib_images).resolve()) if calib_images else "training images",
                              ev.x, ev.labels, ev.masks, o.gate_settings(
                                  calib_anomaly_ratio=o.calib_anomaly_ratio, seed=o.seed, threads=o.threads))
        gate_dict, calibration = v.gate, v.calibration
        files.update(v.files)
        seconds["quantize_and_gate"] = time.perf_counter() - t

    # 7. thresholds on the deployed FP32 model: its outputs on every good image of the evaluation
    # set — the held-out images as they are *and* their jittered copies (shifts, flips, light),
    # since a 20 % split alone is a dozen images that miss the good tail (new parts were
    # rejected at 13 % for a 1 % target) — and on the real defective ones, if any.
    n_hold = len(hold_set)
    good_sel = ev.labels == 0
    scores, maps = s_scores[good_sel], list(s_maps[good_sel])
    bad_scores = s_scores[len(s_scores) - len(bad_set):] if bad_set else None
    image_fit = fit_image_threshold(scores, bad_scores, target_frr=o.target_frr, sensitivity=o.sensitivity)
    thresholds = to_thresholds(image_fit,
                               fit_pixel_threshold(maps, target_frr=o.target_frr, sensitivity=o.sensitivity),
                               pooled_score=True)
    note_threshold_warning(thresholds, image_fit, hold_set, scores)

    details = {
        "expert": "student",
        "images": str(Path(images).resolve()),
        "n_train": len(train_set), "n_holdout": len(hold_set),
        "train_device": describe_device(device),  # where the student trained (options say what was asked)
        "holdout_files": [s.path.name for s in hold_set],
        "train_sha256": source_hash([s.sha256 for s in train_set]),
        "holdout_sha256": source_hash([s.sha256 for s in hold_set]),
        "bad_images_sha256": source_hash([s.sha256 for s in bad_set]) if bad_set else None,
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(o).items()},
        "teacher": teacher.describe(),
        "distillation": distillation,
        "calibration": calibration,
        "final_loss": float(np.mean(losses[-max(1, len(losses) // 20):])),
    }
    manifest = student_manifest(
        o.name or out.resolve().name, spec, o.student, o.score_pool, thresholds, files,
        new_provenance(tool_versions=_versions(), source_sha256=source_hash([s.sha256 for s in sources + bad_set]),
                       details=details),
        map_unit=target.describe(),
        teacher=teacher.describe(),
        calibration_sha256=calibration["sha256"] if calibration else None,
        gate={k: gate_dict[k] for k in ("passed", "forced", "bounds")} if gate_dict else None,
    )
    seconds["total"] = time.perf_counter() - t0
    (out / REPORT_FILE).write_text(json.dumps({
        "distillation": distillation, "losses": [round(v, 7) for v in losses], "seconds": seconds,
        "holdout_scores": {s.path.name: float(v) for s, v in zip(hold_set, s_scores[:n_hold])},
    }, indent=1, default=float) + "\n")
    write_manifest(out, manifest)
    logger.info("bundle written to %s (image threshold %.4f, pixel threshold %.4f)", out, thresholds.image,
                thresholds.pixel)
    return DistilResult(out, distillation, gate_dict, {"image": thresholds.image, "pixel": thresholds.pixel},
                        seconds)
