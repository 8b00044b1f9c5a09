"""A tiny bundle for benchmarks and tests that exercise mechanics, not accuracy (no torch, no training).

The model is a hand-built ONNX graph: anomaly map = darkness of the image (1 - mean over
channels of the un-normalised input), score = max of a 4x4 average-pooled map. Dark things on
a bright background score high. The ``onnx`` package (the export extra) builds it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from linecam.bundle import Manifest, OutputsSpec, TensorSpec, Thresholds, file_entry, new_provenance, write_manifest
from linecam.preprocess import PreprocessSpec

MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)


def darkness_model(h: int, w: int) -> Any:
    """The darkness graph (an ``onnx.ModelProto``) for an ``h`` x ``w`` input."""
    import onnx
    from onnx import TensorProto, helper

    # x_norm = (x - 0.5) / 0.25  ->  x = x_norm * 0.25 + 0.5 ; darkness = 1 - mean_c(x)
    nodes = [
        helper.make_node("ReduceMean", ["image", "axes_c"], ["m"], keepdims=1),
        helper.make_node("Mul", ["m", "k_std"], ["m1"]),
        helper.make_node("Add", ["m1", "k_mean"], ["x"]),
        helper.make_node("Sub", ["one", "x"], ["anomaly_map"]),
        helper.make_node("AveragePool", ["anomaly_map"], ["pooled"], kernel_shape=[4, 4], strides=[4, 4]),
        helper.make_node("ReduceMax", ["pooled", "axes_all"], ["score"], keepdims=0),
        helper.make_node("Reshape", ["score", "shape1"], ["score_out"]),
    ]
    inits = [
        helper.make_tensor("axes_c", TensorProto.INT64, [1], [1]),
        helper.make_tensor("axes_all", TensorProto.INT64, [4], [0, 1, 2, 3]),
        helper.make_tensor("k_std", TensorProto.FLOAT, [], [STD[0]]),
        helper.make_tensor("k_mean", TensorProto.FLOAT, [], [MEAN[0]]),
        helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
        helper.make_tensor("shape1", TensorProto.INT64, [1], [1]),
    ]
    graph = helper.make_graph(
        nodes, "darkness",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, h, w])],
        [helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, [1, 1, h, w]),
         helper.make_tensor_value_info("score_out", TensorProto.FLOAT, [1])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def make_tiny_bundle(root: Path, size: int = 64, image_threshold: float = 0.5,
                     pixel_threshold: float = 0.5) -> Path:
    """A bundle of the darkness graph at ``size`` x ``size`` in ``root`` (needs the ``onnx`` package)."""
    import onnx

    root.mkdir(parents=True, exist_ok=True)
    onnx.save(darkness_model(size, size), str(root / "model.onnx"))
    manifest = Manifest(
        name="tiny-darkness",
        input=TensorSpec(name="image", shape=[1, 3, size, size], layout="NCHW"),
        preprocess=PreprocessSpec(input_size=(size, size), interpolation="area", mean=MEAN, std=STD),
        outputs=OutputsSpec(anomaly_map=TensorSpec(name="anomaly_map", shape=[1, 1, size, size]),
                            image_score=TensorSpec(name="score_out", shape=[1])),
        thresholds=Thresholds(image=image_threshold, pixel=pixel_threshold, method="manual"),
        files={"onnx_fp32": file_entry(root, "model.onnx")},
        provenance=new_provenance(details={"purpose": "tests"}),
    )
    write_manifest(root, manifest)
    return root
