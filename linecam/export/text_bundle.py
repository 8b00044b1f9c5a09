"""``export-engine text-expert``: a CLIP / SigLIP folder + prompts -> a region-expert bundle.

1. prompts.yaml -> normal / abnormal ensembles and named referring prompts, embedded once by
   the text tower (:mod:`linecam.export.text_expert`); the text tower goes no further;
2. few-shot (``images`` without ``zero_shot``): a greedy-coreset memory bank of good patch
   features from the training split (:func:`linecam.export.teachers.build_bank`);
3. ONNX export with torch parity (:func:`linecam.export.onnx_export.export_onnx`), then a check
   that the graph holds no text encoder (no token input, no text-tower weights);
4. with images: FP16 / INT8 behind the accuracy gate (:mod:`linecam.export.variants`) on the
   held-out good images and synthetic anomalies on them (the distillation's evaluation set), and
   thresholds fitted on the FP32 model's outputs for the good ones, as for the other experts;
   without images (pure zero-shot): the thresholds are p(abnormal) = 0.5, FP32 only;
5. the manifest: the standard region-expert contract, plus ``outputs.label_maps`` when the
   prompts name regions.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from linecam.bundle import (
    MANIFEST,
    LabelMapsSpec,
    Manifest,
    OutputsSpec,
    TensorSpec,
    Thresholds,
    file_entry,
    new_provenance,
    source_hash,
    write_manifest,
)
from linecam.calibration.thresholds import fit_image_threshold, fit_pixel_threshold, to_thresholds
from linecam.errors import BundleError
from linecam.export.distil import FP32_FILE
from linecam.export.eval_set import eval_set, note_threshold_warning
from linecam.export.gate import run_expert
from linecam.export.images import list_images, split_holdout
from linecam.export.onnx_export import INPUT_NAME, MAP_NAME, SCORE_NAME, export_onnx
from linecam.export.prompts import load_prompts
from linecam.export.scratch import _versions
from linecam.export.teachers import build_bank
from linecam.export.text_expert import DEFAULT_SCALES, PROMPT_MAPS, TextExpert, embed_prompts, load_clip
from linecam.export.variants import QuantOptions, quantize_and_gate
from linecam.preprocess import PreprocessSpec, Preprocessor
from linecam.progress import make_progress

logger = logging.getLogger(__name__)

#: Zero-shot thresholds: the map and the score are abnormal probabilities (ensemble vs ensemble).
ZERO_SHOT_THRESHOLD = 0.5
#: ONNX initializer / input names that would mean the text tower leaked into the edge graph.
TEXT_MARKERS = ("text_model", "text_projection", "input_ids", "token_embedding")


@dataclass
class TextExpertOptions(QuantOptions):
    """``export-engine text-expert``'s choices (quantization and gate ones: :class:`QuantOptions`)."""

    scales: tuple[int, ...] = DEFAULT_SCALES
    text_weight: float = 0.5
    zero_shot: bool = False  # with images: use them for thresholds / gate only, no bank
    coreset_ratio: float = 0.1
    max_bank: int = 4096
    holdout: float = 0.2
    seed: int = 0
    target_frr: float = 0.01
    sensitivity: float = 1.0
    #: Good evaluation images (held out + jittered copies); None: enough for the target FRR's
    #: quantile (1 / target_frr). Fewer fall back to "lowest good + 3 x (max - lowest)", which a
    #: probability map bounded by 1 may never reach.
    eval_good: int | None = None
    eval_bad: int = 32
    threads: int | None = None
    name: str | None = None


@dataclass
class TextExpertResult:
    bundle: Path
    mode: str  # "zero-shot" | "few-shot"
    labels: list[str]
    thresholds: dict[str, float]
    gate: dict[str, Any] | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def text_leaks(path: str | Path) -> list[str]:
    """Names in the ONNX graph at ``path`` that belong to a text encoder (empty: none)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    names = [i.name for i in m.graph.input] + [i.name for i in m.graph.initializer] + [n.name for n in m.graph.node]
    return [n for n in names if any(k in n for k in TEXT_MARKERS)]


def _bank(model: TextExpert, spec: PreprocessSpec, images: list[Any], o: TextExpertOptions,
          progress: bool) -> torch.Tensor:
    pre = Preprocessor(spec)
    feats = []
    bar = make_progress(progress)
    with bar, torch.no_grad():
        task = bar.add_task("good patch features", total=len(images), info="")
        for i in range(0, len(images), 8):
            x = np.concatenate([pre(s.image, s.bit_depth, copy=True) for s in images[i:i + 8]])
            feats.append(model.patch_features(torch.from_numpy(x)))
            bar.update(task, advance=x.shape[0])
    allf = torch.cat(feats)
    n = min(o.max_bank, max(1, int(round(allf.shape[0] * o.coreset_ratio))))
    return build_bank(allf, n, seed=o.seed, cache=None)


def export_text_expert(clip_dir: str | Path, prompts: str | Path, out: str | Path, *,
                       images: str | Path | None = None, options: TextExpertOptions | None = None,
                       progress: bool = True) -> TextExpertResult:
    """Build the text-prompted expert and write its bundle to ``out`` (see the module docstring)."""
    o = options or TextExpertOptions()
    bad_q = set(o.quantize) - {"fp16", "int8"}
    if bad_q:
        raise BundleError(f"unknown quantization {sorted(bad_q)}: choose from fp16, int8 (or none)")
    if o.quantize and images is None:
        raise BundleError("FP16/INT8 need good images for calibration and the accuracy gate: add --images <good "
                          "images> (with --zero-shot to keep the expert zero-shot) or --quantize none")
    if not 0 <= o.text_weight <= 1:
        raise BundleError(f"--text-weight {o.text_weight}: give a value in [0, 1]")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BundleError(f"--out {out} is a file: give a folder for the bundle")
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    spec_p = load_prompts(prompts)
    sources = list_images(images) if images is not None else []  # before the model: fail fast
    previous = torch.get_num_threads()
    if o.threads:
        torch.set_num_threads(o.threads)
    try:
        clip = load_clip(clip_dir)
        size = (clip.image_size, clip.image_size)
        spec = PreprocessSpec(input_size=size, interpolation="cubic", mean=clip.mean, std=clip.std)
        with torch.no_grad():
            emb = embed_prompts(clip, spec_p)
        seconds["prompts"] = time.perf_counter() - t0
        train_set, hold_set = [], []
        if sources:
            tr, ho = split_holdout(len(sources), o.holdout, o.seed)
            train_set, hold_set = [sources[i] for i in tr], [sources[i] for i in ho]
        few_shot = bool(sources) and not o.zero_shot
        model = TextExpert(clip, emb, size, scales=o.scales, text_weight=o.text_weight)
        if few_shot:
            t = time.perf_counter()
            model = TextExpert(clip, emb, size, scales=o.scales, text_weight=o.text_weight,
                               bank=_bank(model, spec, train_set, o, progress))
            seconds["bank"] = time.perf_counter() - t
        return _write(model, clip, spec_p, spec, emb.labels, out, sources, train_set, hold_set, few_shot, o,
                      seconds, t0, images)
    finally:
        torch.set_num_threads(previous)


def _write(model: TextExpert, clip: Any, prompts: Any, spec: PreprocessSpec, labels: list[str], out: Path,
           sources: list[Any], train_set: list[Any], hold_set: list[Any], few_shot: bool, o: TextExpertOptions,
           seconds: dict[str, float], t0: float, images: str | Path | None) -> TextExpertResult:
    h, w = spec.input_size
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # a failed export must not leave a stale bundle behind
    pre = Preprocessor(spec)
    real = (np.concatenate([pre(s.image, s.bit_depth, copy=True) for s in hold_set[:2]]) if hold_set else None)
    t = time.perf_counter()
    extra = (PROMPT_MAPS,) if labels else ()
    with warnings.catch_warnings():
        # transformers' CLIP embedding checks the input size with a Python bool: the size is fixed
        # here (static shapes), so the tracer's "might not generalize" is not the user's concern.
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        fp32 = export_onnx(model, out / FP32_FILE, (h, w), seed=o.seed, inputs=real, extra_outputs=extra)
    leaks = text_leaks(fp32)
    if leaks:  # the prompts must be constants: a text tower on the edge is a bug of this exporter
        raise BundleError(f"the exported graph still holds text-encoder tensors ({', '.join(leaks[:3])}): "
                          "report this with the model folder's config.json")
    seconds["export"] = time.perf_counter() - t
    files = {"onnx_fp32": file_entry(out, FP32_FILE)}
    gate_dict = calibration = None
    if sources:
        n_good = o.gate_images or (o.eval_good if o.eval_good is not None else math.ceil(1.0 / o.target_frr))
        ev = eval_set(hold_set, spec, o.seed, n_good, o.gate_images or o.eval_bad)
        t = time.perf_counter()
        v = quantize_and_gate(fp32, out, spec, train_set, "training images", ev.x, ev.labels, ev.masks,
                              o.gate_settings(seed=o.seed, threads=o.threads))
        files.update(v.files)
        gate_dict, calibration = v.gate, v.calibration
        seconds["quantize_and_gate"] = time.perf_counter() - t
        maps, scores = run_expert(fp32, ev.x, o.threads)
        good = ev.labels == 0
        image_fit = fit_image_threshold(scores[good], target_frr=o.target_frr, sensitivity=o.sensitivity)
        thresholds = to_thresholds(image_fit, fit_pixel_threshold(list(maps[good]), target_frr=o.target_frr,
                                                                  sensitivity=o.sensitivity))
        note_threshold_warning(thresholds, image_fit, hold_set, scores[good])
    else:
        thresholds = Thresholds(image=ZERO_SHOT_THRESHOLD, pixel=ZERO_SHOT_THRESHOLD, method="zero-shot: "
                                "p(abnormal) = 0.5 (no good images given; refit with --images for a target FRR)")
    mode = "few-shot" if few_shot else "zero-shot"
    details = {
        "expert": "text", "mode": mode, "clip": clip.source, "clip_sha256": clip.sha256, "family": clip.family,
        "object": prompts.object, "normal_sentences": prompts.normal_sentences(),
        "abnormal_sentences": prompts.abnormal_sentences(), "regions": prompts.region_sentences(),
        "images": str(Path(images).resolve()) if images is not None else None,
        "n_train": len(train_set), "n_holdout": len(hold_set),
        "holdout_files": [s.path.name for s in hold_set],
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in o.__dict__.items()},
        "calibration": calibration,
    }
    map_spec = TensorSpec(name=MAP_NAME, shape=[1, 1, h, w], dtype="float32", layout="NCHW")
    outputs = OutputsSpec(anomaly_map=map_spec, image_score=TensorSpec(name=SCORE_NAME, shape=[1], dtype="float32"),
                          label_maps=LabelMapsSpec(name=PROMPT_MAPS, shape=[1, len(labels), h, w], layout="NCHW",
                                                   labels=labels) if labels else None)
    src = [clip.sha256 or clip.source] + [s.sha256 for s in sources]
    manifest = Manifest(
        name=o.name or out.resolve().name,
        input=TensorSpec(name=INPUT_NAME, shape=[1, 3, h, w], dtype="float32", layout="NCHW"), preprocess=spec,
        outputs=outputs, thresholds=thresholds, files=files,
        provenance=new_provenance(tool_versions=_versions(), source_sha256=source_hash(src), details=details),
        extra={"expert": "text", "mode": mode, **model.describe(), "labels": labels,
               "map_unit": "p(abnormal) against the normal prompt ensemble" + (
                   ", mixed with (1 - cosine to the good-patch bank) / 2" if few_shot else ""),
               "score": "mean of the global token's p(abnormal) and the map's maximum",
               "gate": {k: gate_dict[k] for k in ("passed", "forced", "bounds")} if gate_dict else None},
    )
    seconds["total"] = time.perf_counter() - t0
    write_manifest(out, manifest)
    (out / "text_expert.json").write_text(json.dumps({"seconds": seconds, "prompts": prompts.model_dump()},
                                                     indent=1) + "\n")
    logger.info("%s text expert written to %s (image threshold %.4f, pixel threshold %.4f)", mode, out,
                thresholds.image, thresholds.pixel)
    return TextExpertResult(out, mode, labels, {"image": thresholds.image, "pixel": thresholds.pixel}, gate_dict,
                            seconds)
