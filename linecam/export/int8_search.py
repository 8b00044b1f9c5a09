"""INT8 that passes its own gate: leave the most sensitive convolutions in float.

An all-INT8 student can fail the accuracy gate although most of its layers quantize well: one
or two convolutions (often the first, which sees the raw image, or the last body stage, whose
activations carry the anomaly's tail) account for most of the error. When that happens,
:func:`keep_sensitive_float` measures each quantized convolution's share: it re-quantizes the
model with that one convolution left in float (leave-one-out) and records how far the result
still is from FP32 on the gate set (the largest score difference plus the p99 map difference,
both relative to the FP32 map's range: continuous, unlike an AUROC drop on a small set). It
then keeps the 1, 2, ... most sensitive convolutions in float until the gate passes or
``max_float`` is reached. The float layers cost speed, so the search stops at the first
passing set and the bundle records which layers stayed float and why (``int8_search`` in
gate.json). Mixed precision like this is what NVIDIA's and AMD's quantizers call layer-wise
sensitivity analysis; here it is bounded by the student's handful of convolutions.

No torch: ONNX Runtime quantization and the gate only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from linecam.export import gate, quantize
from linecam.export.calibration_set import CalibrationSet

logger = logging.getLogger(__name__)

#: Default ceiling on convolutions kept in float (CLI ``--int8-max-float``): the s student has
#: seven body convolutions; more than three in float and INT8 stops paying off on CPU.
DEFAULT_MAX_FLOAT = 3


@dataclass
class SearchResult:
    """What the search did; ``result`` is the INT8 model it settled on (None: none passed)."""

    result: quantize.QuantResult | None
    passed: bool
    #: Leave-one-out error per convolution (lower = keeping it in float helps more).
    sensitivity: dict[str, float] = field(default_factory=dict)
    #: One entry per tried set: the layers kept float, whether it passed, why not.
    tried: list[dict[str, Any]] = field(default_factory=list)

    @property
    def float_convs(self) -> list[str]:
        """The convolutions kept in float in ``result``: the last set tried
        (``result.kept_float`` also lists the nodes every INT8 model keeps float, e.g. the head)."""
        return list(self.tried[-1]["float"]) if self.tried else []

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "sensitivity": self.sensitivity, "tried": self.tried,
                "float_convs": self.float_convs,
                "kept_float": list(self.result.kept_float) if self.result else None}


def quantized_convs(int8_path: str | Path) -> list[str]:
    """Names of the Conv / ConvTranspose / Gemm / MatMul nodes whose weight is int8 (fed by a
    DequantizeLinear), in graph order: the candidates for staying in float."""
    import onnx

    model = onnx.load(str(int8_path), load_external_data=False)
    dq_out = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [n.name for n in model.graph.node
            if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and len(n.input) > 1 and n.input[1] in dq_out]


def _error(c: gate.CandidateMetrics) -> float:
    return float(c.score_max_rel_diff + c.map_p99_rel_diff)


def keep_sensitive_float(fp32: Path, dst: Path, calib: CalibrationSet, x: np.ndarray, labels: np.ndarray,
                         masks: np.ndarray | None, *, bounds: dict[str, Any], quant_kwargs: dict[str, Any],
                         max_float: int = DEFAULT_MAX_FLOAT, threads: int | None = None,
                         progress: Callable[[str], None] | None = None) -> SearchResult:
    """Re-quantize ``fp32`` into ``dst`` keeping the most sensitive convolutions in float until
    the gate (``bounds``: the keyword arguments of :meth:`gate.GateReport.evaluate`) passes.

    Call it after the all-INT8 model failed; ``dst`` is left holding the last model tried (the
    passing one when ``passed``). ``quant_kwargs`` go to :func:`quantize.to_int8` unchanged."""
    say = progress or (lambda msg: logger.info("%s", msg))
    convs = quantized_convs(dst)
    out = SearchResult(result=None, passed=False)
    if max_float <= 0 or not convs:
        return out
    tmp = dst.with_name(dst.stem + ".search.onnx")
    try:
        for i, name in enumerate(convs):
            say(f"INT8 sensitivity {i + 1}/{len(convs)}: {name} in float")
            quantize.to_int8(fp32, tmp, calib, nodes_to_exclude=[name], **quant_kwargs)
            rep = gate.compare(fp32, {"int8": tmp}, x, labels, masks, threads=threads)
            out.sensitivity[name] = round(_error(rep.candidates["int8"]), 6)
    finally:
        tmp.unlink(missing_ok=True)
    order = sorted(convs, key=lambda n: out.sensitivity[n])
    for k in range(1, min(max_float, len(order)) + 1):
        keep = order[:k]
        say(f"INT8 with {k} convolution(s) in float: {', '.join(keep)}")
        res = quantize.to_int8(fp32, dst, calib, nodes_to_exclude=keep, **quant_kwargs)
        rep = gate.compare(fp32, {"int8": dst}, x, labels, masks, threads=threads)
        rep.evaluate(**bounds)
        verdict = rep.verdicts()[0]
        c = rep.candidates["int8"]
        out.tried.append({"float": keep, "passed": verdict.passed, "reasons": verdict.reasons,
                          "auroc_drop": c.auroc_drop, "pearson": c.pearson,
                          "score_max_rel_diff": c.score_max_rel_diff})
        out.result = res
        if verdict.passed:
            out.passed = True
            logger.info("INT8 passes the gate with %s in float", ", ".join(keep))
            break
    return out
