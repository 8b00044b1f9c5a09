"""FP16 and INT8 variants of an exported region expert, behind the accuracy gate.

One definition for every exporter that writes a region-expert bundle (the distilled student,
the text-prompted expert): cast to FP16, quantize to INT8 Q/DQ on a calibration set made
exactly as the line preprocesses, compare both with the FP32 graph on the held-out set, and
write ``gate.json`` next to the models whatever the outcome.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from linecam.bundle import FileEntry, file_entry
from linecam.export.gate import MAX_AUROC_DROP, MAX_SCORE_DIFF, MIN_PEARSON
from linecam.export.int8_search import SearchResult, keep_sensitive_float
from linecam.preprocess import PreprocessSpec

logger = logging.getLogger(__name__)

FP16_FILE = "model_fp16.onnx"
INT8_FILE = "model_int8.onnx"
GATE_FILE = "gate.json"


@dataclass
class QuantOptions:
    """The quantization and accuracy-gate choices every region-expert export offers
    (``distil`` and ``text-expert`` options inherit them; :meth:`gate_settings` hands them on)."""

    quantize: tuple[str, ...] = ("fp16", "int8")
    max_auroc_drop: float = MAX_AUROC_DROP
    min_map_pearson: float = MIN_PEARSON
    max_score_diff: float = MAX_SCORE_DIFF
    force: bool = False
    int8_method: str | None = None
    int8_tool: str = "auto"
    #: When INT8 fails the gate, keep up to this many of its most sensitive convolutions in
    #: float until it passes (:mod:`linecam.export.int8_search`); 0: fail as is; None: a quarter
    #: of the model's quantized convolutions, at least 3.
    int8_max_float: int | None = None
    #: Good and synthetic-defect images each in the gate set (held-out images, jittered copies,
    #: anomalies painted on them); None: the command's own default. More make the gate's AUROC
    #: drop steadier (its 95 % interval narrows as 1/sqrt(n)) and give the thresholds more good images.
    gate_images: int | None = None

    def gate_settings(self, **kw: Any) -> GateSettings:
        """These choices plus the run's own (``seed``, ``threads``, ``calib_anomaly_ratio``)."""
        return GateSettings(**{f.name: getattr(self, f.name) for f in fields(QuantOptions)}, **kw)


@dataclass
class GateSettings(QuantOptions):
    calib_anomaly_ratio: float = 0.5
    seed: int = 0
    threads: int | None = None


@dataclass
class Variants:
    files: dict[str, FileEntry]  # role -> entry, for the FP16 / INT8 files written
    gate: dict[str, Any] | None  # gate.json's content
    calibration: dict[str, Any] | None


def quantize_and_gate(fp32: Path, out: Path, spec: PreprocessSpec, calib_src: Sequence[Any], calib_name: str,
                      x: np.ndarray, labels: np.ndarray, masks: np.ndarray | None, s: GateSettings) -> Variants:
    """Write the FP16 / INT8 files ``s.quantize`` asks for into ``out`` and gate them against ``fp32``
    on ``x`` (preprocessed ``[N, 3, H, W]``, ``labels`` 1 = defective, optional pixel ``masks``).

    ``calib_src``: the images INT8 is calibrated on (SourceImage), ``calib_name`` what they are
    (recorded). Raises :class:`BundleError` when the gate fails, unless ``s.force``."""
    if not s.quantize:
        return Variants({}, None, None)
    from linecam.export import gate, quantize

    candidates: dict[str, Path] = {}
    calibration: dict[str, Any] | None = None
    if "fp16" in s.quantize:
        candidates["onnx_fp16"] = quantize.to_fp16(fp32, out / FP16_FILE)
    if "int8" in s.quantize:
        calib = quantize.calibration_batch(calib_src, spec, anomaly_ratio=s.calib_anomaly_ratio, seed=s.seed)
        kwargs: dict[str, Any] = {"tool": s.int8_tool}
        if s.int8_method:
            kwargs["method"] = s.int8_method
        q = quantize.to_int8(fp32, out / INT8_FILE, calib, **kwargs)
        candidates["onnx_int8"] = q.path
        calibration = {**calib.describe(), "source": calib_name,
                       **{k: v for k, v in q.to_dict().items()
                          if k not in ("path", "calibration_sha256", "calibration_n")}}
    masks = masks if masks is not None and masks.any() else None
    report = gate.compare(fp32, candidates, x, labels, masks, threads=s.threads)
    bounds = {"max_auroc_drop": s.max_auroc_drop, "min_pearson": s.min_map_pearson,
              "max_score_diff": s.max_score_diff}
    report.evaluate(**bounds)
    search: SearchResult | None = None
    if calibration is not None and s.int8_max_float != 0 and \
            any(v.name == "onnx_int8" and not v.passed for v in report.verdicts()):
        search = keep_sensitive_float(fp32, candidates["onnx_int8"], calib, x, labels, masks, bounds=bounds,
                                      quant_kwargs=kwargs, max_float=s.int8_max_float, threads=s.threads)
        if search.passed and search.result is not None:
            # Loud: the INT8 model that ships is slower than full INT8, and a gate that only a
            # float fallback passes often means calibration images unlike the line's.
            logger.warning("INT8 passes the accuracy gate only with %d convolution(s) kept in float (%s): check "
                           "that the calibration images look like the line's; the INT8 file is that mixed model",
                           len(search.float_convs), ", ".join(search.float_convs))
        if search.result is not None:
            calibration.update(kept_float=list(search.result.kept_float), qdq_pairs=search.result.qdq_pairs,
                               ops_quantized=search.result.ops_quantized)
        report = gate.compare(fp32, candidates, x, labels, masks, threads=s.threads)
    try:
        report.enforce(force=s.force, **bounds)
    finally:
        # Passed, forced or failed: the report stays next to the models for the record.
        gate_dict = report.to_dict()
        gate_dict["calibration"] = calibration
        if search is not None:
            gate_dict["int8_search"] = search.to_dict()
        (out / GATE_FILE).write_text(json.dumps(gate_dict, indent=1, default=float) + "\n")
        logger.info("accuracy gate:\n%s", report.table())
    files = {role: file_entry(out, path.name, precision=role.split("_")[1])  # type: ignore[arg-type]
             for role, path in candidates.items()}
    return Variants(files, gate_dict, calibration)
