"""The distillation's quantize-and-gate stage: FP16 and INT8 candidates of the FP32 student,
the accuracy gate on the held-out set, and, when INT8 fails it, the search for the few
convolutions to keep in float (:mod:`linecam.export.int8_search`) before the verdict.

The gate report (passed, forced or failed) is written to ``gate.json`` beside the models.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from linecam.export import gate, quantize
from linecam.export.images import SourceImage
from linecam.export.int8_search import SearchResult, keep_sensitive_float
from linecam.preprocess import PreprocessSpec

if TYPE_CHECKING:  # only for annotations: distil imports this module
    from linecam.export.distil import DistilOptions, EvalSet

logger = logging.getLogger(__name__)

FP16_FILE = "model_fp16.onnx"
INT8_FILE = "model_int8.onnx"
GATE_FILE = "gate.json"


def quantize_and_gate(fp32: Path, out: Path, o: "DistilOptions", spec: PreprocessSpec,
                      calib_src: Sequence[SourceImage], calib_name: str,
                      ev: "EvalSet") -> tuple[dict[str, Path], dict[str, Any]]:
    """Write the precisions ``o.quantize`` asks for next to ``fp32`` and gate them against it.

    Returns the candidate files by role (``onnx_fp16``, ``onnx_int8``) and the gate report as
    written to ``gate.json``. Raises :class:`~linecam.errors.BundleError` when the gate fails
    (unless ``o.force``)."""
    candidates: dict[str, Path] = {}
    calibration: dict[str, Any] | None = None
    if "fp16" in o.quantize:
        candidates["onnx_fp16"] = quantize.to_fp16(fp32, out / FP16_FILE)
    kwargs: dict[str, Any] = {"tool": o.int8_tool}
    if o.int8_method:
        kwargs["method"] = o.int8_method
    calib = None
    if "int8" in o.quantize:
        calib = quantize.calibration_batch(calib_src, spec, anomaly_ratio=o.calib_anomaly_ratio, seed=o.seed)
        q = quantize.to_int8(fp32, out / INT8_FILE, calib, **kwargs)
        candidates["onnx_int8"] = q.path
        calibration = {**calib.describe(), "source": calib_name,
                       **{k: v for k, v in q.to_dict().items()
                          if k not in ("path", "calibration_sha256", "calibration_n")}}
    masks = ev.masks if ev.masks.any() else None
    report = gate.compare(fp32, candidates, ev.x, ev.labels, masks, threads=o.threads)
    bounds = {"max_auroc_drop": o.max_auroc_drop, "min_pearson": o.min_map_pearson,
              "max_score_diff": o.max_score_diff}
    search: SearchResult | None = None
    report.evaluate(**bounds)
    int8_failed = any(v.name == "onnx_int8" and not v.passed for v in report.verdicts())
    if int8_failed and calib is not None and o.int8_max_float > 0:
        logger.info("INT8 fails the accuracy gate: measuring which convolutions to keep in float (at most %d)",
                    o.int8_max_float)
        search = keep_sensitive_float(fp32, candidates["onnx_int8"], calib, ev.x, ev.labels, masks,
                                      bounds=bounds, quant_kwargs=kwargs, max_float=o.int8_max_float,
                                      threads=o.threads)
        if search.result is not None and calibration is not None:
            calibration.update(kept_float=list(search.result.kept_float),
                               ops_quantized=search.result.ops_quantized, qdq_pairs=search.result.qdq_pairs)
        report = gate.compare(fp32, candidates, ev.x, ev.labels, masks, threads=o.threads)
    try:
        report.enforce(force=o.force, **bounds)
    finally:
        # Passed, forced or failed: the report stays next to the models for the record.
        gate_dict = report.to_dict()
        gate_dict["calibration"] = calibration
        if search is not None:
            gate_dict["int8_search"] = search.to_dict()
        (out / GATE_FILE).write_text(json.dumps(gate_dict, indent=1, default=float) + "\n")
        logger.info("accuracy gate:\n%s", report.table())
    return candidates, gate_dict
