"""TensorRT on a real NVIDIA GPU: build, verification, parity with ONNX Runtime, CUDA graphs, threads,
and the daemon's backend choice. Marked ``gpu``; skipped (with the reason) where TensorRT, cuda-python
or the GPU is missing. Run with: python -m pytest tests/test_trt_gpu.py -m gpu -q
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bundles import darkness_reference, make_tiny_bundle
from linecam.bundle import (Manifest, OutputsSpec, TensorSpec, Thresholds, file_entry, load_bundle, new_provenance,
                            write_manifest)
from linecam.errors import BundleError
from linecam.preprocess import Preprocessor, PreprocessSpec
from linecam.runtime.device import probe_device

FACTS = probe_device()


def _not_ready() -> str | None:
    if FACTS.tensorrt is None:
        return f"TensorRT not importable ({FACTS.tensorrt_error})"
    if FACTS.gpu is None:
        return f"no NVIDIA GPU ({FACTS.gpu_error})"
    if not (FACTS.cuda_python or FACTS.torch):
        return f"no cuda-python for device buffers ({FACTS.cuda_python_error})"
    return None


REASON = _not_ready()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(REASON is not None, reason=f"needs an NVIDIA GPU with "
                                                                               f"TensorRT: {REASON}")]
SIZE = 64


def write_images(folder: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = np.full((SIZE, SIZE, 3), 200, np.uint8)
        if i % 2:
            y, x = rng.integers(0, SIZE - 16, size=2)
            img[y:y + 16, x:x + 16] = rng.integers(0, 40)
        img = np.clip(img.astype(int) + rng.integers(-10, 10, img.shape), 0, 255).astype(np.uint8)
        cv2.imwrite(str(folder / f"img{i:03d}.png"), img)
    return folder


def conv_model(size: int, seed: int = 0) -> onnx.ModelProto:
    """A small random-weight conv net with the region expert's contract (TensorRT conv kernels, TF32)."""
    rng = np.random.default_rng(seed)
    w1 = (rng.normal(size=(8, 3, 3, 3)) * 0.3).astype(np.float32)
    b1 = np.zeros(8, np.float32)
    w2 = (rng.normal(size=(1, 8, 3, 3)) * 0.3).astype(np.float32)
    b2 = np.array([-1.0], np.float32)
    nodes = [
        helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["c2"], ["anomaly_map"]),
        helper.make_node("AveragePool", ["anomaly_map"], ["pooled"], kernel_shape=[4, 4], strides=[4, 4]),
        helper.make_node("ReduceMax", ["pooled"], ["s"], keepdims=0),
        helper.make_node("Reshape", ["s", "shape1"], ["score"]),
    ]
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))]
    inits.append(helper.make_tensor("shape1", TensorProto.INT64, [1], [1]))
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                                             [1, 3, size, size])],
                              [helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, [1, 1, size, size]),
                               helper.make_tensor_value_info("score", TensorProto.FLOAT, [1])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def make_conv_bundle(root: Path) -> Path:
    root.mkdir(parents=True)
    onnx.save(conv_model(SIZE), str(root / "model.onnx"))
    man = Manifest(
        name="conv-test", input=TensorSpec(name="image", shape=[1, 3, SIZE, SIZE], layout="NCHW"),
        preprocess=PreprocessSpec(input_size=(SIZE, SIZE)),
        outputs=OutputsSpec(anomaly_map=TensorSpec(name="anomaly_map", shape=[1, 1, SIZE, SIZE]),
                            image_score=TensorSpec(name="score", shape=[1])),
        thresholds=Thresholds(image=0.5, pixel=0.5), files={"onnx_fp32": file_entry(root, "model.onnx")},
        provenance=new_provenance())
    write_manifest(root, man)
    return root


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("trt")


@pytest.fixture(scope="module")
def images(work) -> Path:
    return write_images(work / "images", 12)


@pytest.fixture(scope="module")
def tiny_fp32(work, images):
    from linecam.export.trt import TrtBuildOptions, build_bundle_engine

    root = make_tiny_bundle(work / "tiny", size=SIZE)
    result = build_bundle_engine(root, TrtBuildOptions(precision="fp32", images=images), facts=FACTS)
    return root, result


def inputs(n: int, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(1, 3, SIZE, SIZE)).astype(np.float32) for _ in range(n)]


def test_build_registers_a_verified_engine_for_this_device(tiny_fp32):
    from linecam.runtime.backends.sidecar import check_engine

    root, result = tiny_fp32
    bundle = load_bundle(root)
    entry = bundle.manifest.files[result.role]
    assert entry.backend == "tensorrt" and entry.precision == "fp32"
    assert entry.target == FACTS.engine_target()
    side = check_engine(bundle, result.role, FACTS)
    assert side.verification is not None and side.verification["passed"]
    assert side.device.gpu == FACTS.gpu and side.device.tensorrt == FACTS.tensorrt
    assert (root / side.build.timing_cache).stat().st_size > 0
    assert result.verification is not None and result.verification.score_max_rel < 0.01


def test_rebuild_reuses_the_timing_cache(tiny_fp32, images):
    from linecam.export.trt import TrtBuildOptions, build_bundle_engine
    from linecam.runtime.backends.sidecar import read_sidecar

    root, first = tiny_fp32
    again = build_bundle_engine(root, TrtBuildOptions(precision="fp32", images=images), facts=FACTS)
    assert again.role == first.role
    assert read_sidecar(load_bundle(root), again.role)[1].build.timing_cache_reused


def test_engine_parity_with_onnxruntime_and_an_independent_reference(tiny_fp32):
    from linecam.runtime.backends.onnxruntime import OrtRunner
    from linecam.runtime.backends.tensorrt import TensorRTRunner

    root, result = tiny_fp32
    bundle = load_bundle(root)
    trt_runner = TensorRTRunner(bundle.path(result.role), bundle.manifest, result.role)
    ort_runner = OrtRunner(bundle.path("onnx_fp32"), bundle.manifest)
    pre = Preprocessor(bundle.manifest.preprocess)
    rng = np.random.default_rng(3)
    try:
        for _ in range(10):
            img = rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)
            x = pre(img, copy=True)
            a, b = trt_runner.run(x), ort_runner.run(x)
            assert np.abs(a.anomaly_map - b.anomaly_map).max() < 1e-4
            assert a.score == pytest.approx(darkness_reference(img), abs=1e-4)
    finally:
        trt_runner.close()


def test_cuda_graph_replay_gives_the_same_outputs(tiny_fp32):
    from linecam.runtime.backends.tensorrt import TensorRTRunner

    root, result = tiny_fp32
    bundle = load_bundle(root)
    plain = TensorRTRunner(bundle.path(result.role), bundle.manifest, result.role)
    graph = TensorRTRunner(bundle.path(result.role), bundle.manifest, result.role, cuda_graph=True)
    try:
        for x in inputs(20):
            a, b = plain.run(x), graph.run(x)
            np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)
            assert a.score == b.score
        slot = graph._all[0]
        assert not slot.graph_failed and (1, 3, SIZE, SIZE) in slot.graphs
    finally:
        plain.close()
        graph.close()


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_worker_threads_each_get_their_own_slot(tiny_fp32, cuda_graph):
    from linecam.runtime.backends.tensorrt import TensorRTRunner

    root, result = tiny_fp32
    bundle = load_bundle(root)
    runner = TensorRTRunner(bundle.path(result.role), bundle.manifest, result.role, slots=2, cuda_graph=cuda_graph)
    xs = inputs(16, seed=7)
    try:
        expected = [runner.run(x).score for x in xs]
        got: dict[int, float] = {}

        def work(ids: list[int]) -> None:
            for _ in range(5):
                for i in ids:
                    got[i] = runner.run(xs[i]).score
                    assert got[i] == expected[i]

        threads = [threading.Thread(target=work, args=(list(range(k, 16, 4)),)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [got[i] for i in range(16)] == expected
    finally:
        runner.close()


def test_daemon_auto_picks_the_engine_and_refuses_a_foreign_one(tiny_fp32, caplog):
    from linecam.runtime.backends import make_runner
    from linecam.runtime.backends.sidecar import sidecar_path
    from linecam.runtime.backends.tensorrt import TensorRTRunner

    root, result = tiny_fp32
    runner = make_runner(load_bundle(root), "auto", workers=2)
    try:
        assert isinstance(runner, TensorRTRunner) and runner.role == result.role
    finally:
        runner.close()
    side = sidecar_path(result.engine)
    good = side.read_text()
    data = json.loads(good)
    data["device"]["gpu"] = "Foreign GPU"
    side.write_text(json.dumps(data))
    try:
        here = repr(FACTS.gpu) if " " in FACTS.gpu else FACTS.gpu
        with pytest.raises(BundleError, match=re.escape(f"gpu 'Foreign GPU' there, {here} here")):
            make_runner(load_bundle(root), "tensorrt")
        fallback = make_runner(load_bundle(root), "auto")
        assert fallback.name in ("onnxruntime-cuda", "onnxruntime")
    finally:
        side.write_text(good)


def test_fp16_engine_from_a_conv_net(work, images):
    from linecam.export.trt import TrtBuildOptions, build_bundle_engine
    from linecam.runtime.backends.sidecar import read_sidecar

    root = make_conv_bundle(work / "conv16")
    result = build_bundle_engine(root, TrtBuildOptions(precision="fp16", images=images), facts=FACTS)
    entry, side = read_sidecar(load_bundle(root), result.role)
    assert side.source.role == "onnx_fp16" and side.source.derived_from == "onnx_fp32"
    assert side.build.strongly_typed and side.verification["passed"]
    assert side.verification["score_max_rel"] < 0.03


def test_verification_failure_leaves_the_bundle_untouched(work, images):
    from linecam.export.trt import TrtBuildOptions, build_bundle_engine
    from linecam.export.trt_verify import Tolerances

    root = make_conv_bundle(work / "conv-tight")
    before = (root / "manifest.json").read_text()
    impossible = Tolerances(score=1e-9, map=1e-9, pixel_agreement=1.0)
    with pytest.raises(BundleError, match="engine disagrees with the bundle's model"):
        build_bundle_engine(root, TrtBuildOptions(precision="fp16", images=images, tolerances=impossible),
                            facts=FACTS)
    manifest = json.loads((root / "manifest.json").read_text())
    assert not any(e["backend"] == "tensorrt" for e in manifest["files"].values())
    assert not list((root / "trt").glob("*.engine")) and not list((root / "trt").glob(".*.building"))
    assert list((root / "trt").glob("*.verify-failed.json"))
    assert json.loads(before)["files"].keys() <= manifest["files"].keys()


def test_int8_engine_from_qdq_onnx(work, images):
    """INT8 from linecam's own symmetric Q/DQ quantizer (export-engine distil's), built strongly typed."""
    from linecam.export.quantize import calibration_batch, to_int8
    from linecam.export.trt import TrtBuildOptions, build_bundle_engine
    from linecam.export.trt_verify import load_images

    root = make_conv_bundle(work / "conv8")
    bundle = load_bundle(root)
    pre = Preprocessor(bundle.manifest.preprocess)
    calib = np.concatenate([pre(im.image, im.bit_depth, copy=True) for im in load_images(images)])
    to_int8(root / "model.onnx", root / "model.int8.onnx", calibration_batch(calib, bundle.manifest.preprocess))
    files = dict(bundle.manifest.files)
    files["onnx_int8"] = file_entry(root, "model.int8.onnx", precision="int8")
    write_manifest(root, bundle.manifest.model_copy(update={"files": files}))
    result = build_bundle_engine(root, TrtBuildOptions(precision="int8", images=images), facts=FACTS)
    assert result.verification is not None and result.verification.passed, result.verification.failures


@pytest.mark.skipif(not FACTS.is_jetson, reason="DLA exists on Jetson AGX / NX Orin only")
def test_dla_build_reports_layer_placement(work, images):
    from linecam.export.trt import TrtBuildOptions, build_bundle_engine

    root = make_conv_bundle(work / "dla")
    try:
        result = build_bundle_engine(root, TrtBuildOptions(precision="fp16", images=images, dla_core=0),
                                     facts=FACTS)
    except Exception as e:  # Orin Nano: no DLA
        if "has no DLA" in str(e):
            pytest.skip(str(e))
        raise
    assert result.placement is not None
    assert result.placement["engine_layers_on_dla"], result.placement
