"""INT8 that passes its own gate: leave the most sensitive convolutions in float.

An all-INT8 student can fail the accuracy gate although most of its layers quantize well: a
few convolutions account for most of the error. When that happens,
:func:`keep_sensitive_float` measures each quantized convolution's *own* error: it quantizes
that one convolution alone (every other one left in float) and records how far the result is
from FP32 on the gate set (the largest score difference plus the p99 map difference, both
relative to the FP32 map's range: continuous, unlike an AUROC drop on a small set). It then
keeps the 1, 2, ... most sensitive convolutions in float until the gate passes or the ceiling
(``max_float``; default :func:`default_max_float`) is reached. The float layers cost speed, so
the search stops at the first passing set and the bundle records which layers stayed float and
why (``int8_search`` in gate.json). This is the layer-wise sensitivity analysis of NVIDIA's and
AMD's quantizers: one layer quantized at a time.

Why one in, not one out: a real-photo ``lite0`` student's INT8 error is spread over the stem
and the first three blocks (the high-resolution layers, nine convolutions). Leaving any one of
them in float barely changes the total, and the largest-score-difference term, a maximum over
images, then ranks by chance: on the seed-2 grass student every leave-one-out error lay within
0.29-0.52 (all INT8: 0.32), the three convolutions it kept held one of the nine, and INT8
failed its gate. Quantized alone, the nine rank first (0.026-0.163; every other one 0.025 or
less; block 0's depthwise convolution and the stem first); with six of them in float INT8 passed (AUROC
drop 0.12 points on 256 + 256 gate images, score difference 6 % of the map range, map Pearson
0.999), with all nine the score difference was 3 %.

No torch: ONNX Runtime quantization and the gate only.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from linecam.export import gate, quantize
from linecam.export.calibration_set import CalibrationSet

logger = logging.getLogger(__name__)

#: Floor of the default ceiling on convolutions kept in float (CLI ``--int8-max-float``): the
#: ``s`` student has seven body convolutions.
MIN_DEFAULT_MAX_FLOAT = 3
#: ... otherwise this share of the quantized convolutions: ``lite0`` students (37) needed six of
#: their nine high-resolution ones. More and the INT8 engine is mostly FP16 on TensorRT.
DEFAULT_FLOAT_SHARE = 0.25


#: What ``SearchResult.sensitivity`` holds (recorded beside it in gate.json).
SENSITIVITY_MEASURE = "error with only this convolution quantized (higher: kept in float first)"


def default_max_float(n_convs: int) -> int:
    """The ceiling when none is given: a quarter of the quantized convolutions, at least 3."""
    return max(MIN_DEFAULT_MAX_FLOAT, math.ceil(DEFAULT_FLOAT_SHARE * n_convs))


@dataclass
class SearchResult:
    """What the search did; ``result`` is the INT8 model it settled on (None: none passed)."""

    result: quantize.QuantResult | None
    passed: bool
    #: Error of each convolution quantized alone (higher = keeping it in float helps more).
    sensitivity: dict[str, float] = field(default_factory=dict)
    #: One entry per tried set: the layers kept float, whether it passed, why not.
    tried: list[dict[str, Any]] = field(default_factory=list)
    #: The most convolutions the search could keep in float (the ceiling it ran under).
    max_float: int = 0

    @property
    def float_convs(self) -> list[str]:
        """The convolutions kept in float in ``result``: the last set tried
        (``result.kept_float`` also lists the nodes every INT8 model keeps float, e.g. the head)."""
        return list(self.tried[-1]["float"]) if self.tried else []

    def to_dict(self) -> dict[str, Any]:
        # "sensitivity_measure": gate.json files written before 5cf476c hold leave-one-out
        # errors under the same key, where lower meant more sensitive.
        return {"passed": self.passed, "sensitivity": self.sensitivity, "sensitivity_measure": SENSITIVITY_MEASURE,
                "max_float": self.max_float, "tried": self.tried,
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
                         max_float: int | None = None, threads: int | None = None,
                         progress: Callable[[str], None] | None = None) -> SearchResult:
    """Re-quantize ``fp32`` into ``dst`` keeping the most sensitive convolutions in float until
    the gate (``bounds``: the keyword arguments of :meth:`gate.GateReport.evaluate`) passes.

    Call it after the all-INT8 model failed; ``dst`` is left holding the last model tried (the
    passing one when ``passed``). ``quant_kwargs`` go to :func:`quantize.to_int8` unchanged.
    ``max_float`` None: :func:`default_max_float` of the model's quantized convolutions."""
    say = progress or (lambda msg: logger.info("%s", msg))
    convs = quantized_convs(dst)
    out = SearchResult(result=None, passed=False)
    out.max_float = default_max_float(len(convs)) if max_float is None else max_float
    if out.max_float <= 0 or not convs:
        return out
    logger.info("INT8 fails the accuracy gate: measuring which of its %d convolutions to keep in float (at most %d)",
                len(convs), out.max_float)
    tmp = dst.with_name(dst.stem + ".search.onnx")
    try:
        for i, name in enumerate(convs):
            say(f"INT8 sensitivity {i + 1}/{len(convs)}: {name} quantized alone")
            quantize.to_int8(fp32, tmp, calib, nodes_to_exclude=[n for n in convs if n != name], **quant_kwargs)
            rep = gate.compare(fp32, {"int8": tmp}, x, labels, masks, threads=threads)
            out.sensitivity[name] = round(_error(rep.candidates["int8"]), 6)
    finally:
        tmp.unlink(missing_ok=True)
    # Most sensitive first; ties keep graph order (sorted is stable).
    order = sorted(convs, key=lambda n: -out.sensitivity[n])
    for k in range(1, min(out.max_float, len(order)) + 1):
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
