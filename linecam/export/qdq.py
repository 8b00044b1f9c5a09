"""Inspecting Q/DQ graphs: the float head to keep, node names, and the symmetric-int8 check
TensorRT's strongly typed networks need (zero point 0 everywhere). onnx only, no torch.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from linecam.errors import BundleError

if TYPE_CHECKING:
    import onnx


def head_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes from the last conv(s) to the graph outputs.

    Walks back from every graph output through non-conv nodes; the first Conv /
    ConvTranspose / Gemm / MatMul met on each path is included and the walk stops there.
    For a region expert that is: head conv -> Resize (logits to input size) -> Sigmoid + Relu
    -> AveragePool -> ReduceMax, plus the small shape subgraph feeding the Resize.
    """
    producer = {o: n for n in model.graph.node for o in n.output}
    stop = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
    seen: set[str] = set()
    out: list[str] = []
    todo = [o.name for o in model.graph.output]
    while todo:
        t = todo.pop()
        n = producer.get(t)
        if n is None or n.name in seen:
            continue
        seen.add(n.name)
        out.append(n.name)
        if n.op_type in stop:
            continue
        todo.extend(i for i in n.input if i)
    return out


def _name_nodes(model: onnx.ModelProto) -> None:
    used = {n.name for n in model.graph.node if n.name}
    for i, n in enumerate(model.graph.node):
        if not n.name:
            name = f"{n.op_type}_{i}"
            while name in used:
                name += "_"
            n.name = name
            used.add(name)


@dataclass(frozen=True)
class QdqSummary:
    qdq_pairs: int
    weight_dq: int
    ops_quantized: dict[str, int]


def check_symmetric(model: onnx.ModelProto | str | Path) -> QdqSummary:
    """Raise :class:`BundleError` unless every QuantizeLinear/DequantizeLinear is int8 with zero point 0.

    A missing zero point means uint8 (ONNX's default), which is not symmetric int8 either.
    Returns counts of Q/DQ pairs, weight DQs and the op types consuming dequantized tensors.
    """
    import onnx
    from onnx import numpy_helper

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    inits = {t.name: t for t in model.graph.initializer}
    consts = {n.output[0]: n.attribute[0].t for n in model.graph.node
              if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    bad: list[str] = []
    for n in qdq:
        if len(n.input) < 3 or not n.input[2]:
            bad.append(f"{n.name} (no zero point: uint8)")
            continue
        t = inits.get(n.input[2]) or consts.get(n.input[2])
        if t is None:
            bad.append(f"{n.name} (zero point {n.input[2]} is not a constant)")
            continue
        if t.data_type != onnx.TensorProto.INT8:
            bad.append(f"{n.name} (zero point type {onnx.TensorProto.DataType.Name(t.data_type)})")
            continue
        if np.any(numpy_helper.to_array(t) != 0):
            bad.append(f"{n.name} (zero point {numpy_helper.to_array(t).ravel()[:4].tolist()})")
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise BundleError(f"INT8 model is not symmetric int8 Q/DQ (TensorRT needs zero point 0): "
                          f"{', '.join(bad[:3])}{more}; re-quantize with symmetric activations and weights")
    producer = {o: n for n in model.graph.node for o in n.output}
    pairs = sum(1 for n in qdq if n.op_type == "DequantizeLinear"
                and n.input[0] in producer and producer[n.input[0]].op_type == "QuantizeLinear")
    weight_dq = sum(1 for n in qdq if n.op_type == "DequantizeLinear" and n.input[0] in inits)
    dq_out = {n.output[0] for n in qdq if n.op_type == "DequantizeLinear"}
    ops = Counter(n.op_type for n in model.graph.node
                  if n.op_type not in ("QuantizeLinear", "DequantizeLinear") and any(i in dq_out for i in n.input))
    return QdqSummary(pairs, weight_dq, dict(sorted(ops.items())))
