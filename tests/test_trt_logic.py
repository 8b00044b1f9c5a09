"""TensorRT logic that needs no GPU: engine sidecar checks, backend selection, optimization
profiles, builder flag plans, verification, device facts, and the errors a user sees when
TensorRT or the GPU is missing. (Build, parity and CUDA graphs: tests/test_trt_gpu.py.)

Engines here are registered through the real export path (``register_engine``) with
placeholder bytes: the sidecar check must refuse a foreign engine *before* anything reads
the engine, so its content never matters to these tests.
"""

from __future__ import annotations

import json
import logging
import shlex
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest

from bundles import darkness_model, darkness_reference, make_tiny_bundle, read_manifest
from linecam.bundle import file_entry, load_bundle, write_manifest
from linecam.config import ModelConfig
from linecam.errors import BundleError, LinecamError
from linecam.export.cli import main as export_main
from linecam.export.trt import (BuiltEngine, Profile, TrtBuildOptions, build_bundle_engine, build_plan,
                                derive_fp16_onnx, device_slug, engine_role, placement_line, placement_report,
                                profile_shapes, register_engine, source_onnx, verify_engine)
from linecam.export.trt_verify import DEFAULT_TOLERANCES, Tolerances, auroc, compare, load_images
from linecam.runtime.backends import make_runner
from linecam.runtime.backends.base import ExpertOutput
from linecam.runtime.backends.onnxruntime import OrtRunner
from linecam.runtime.backends.select import choose_backend
from linecam.runtime.backends.sidecar import check_engine, read_sidecar, rebuild_command, sidecar_path
from linecam.runtime.device import (ENGINE_KEYS, BackendUnavailable, DeviceFacts, parse_jetpack_version,
                                    parse_nv_tegra_release, probe_device, version_from_int)

H100 = DeviceFacts(gpu="NVIDIA H100 80GB HBM3", compute_capability="9.0", tensorrt="10.13.0.35",
                   cuda_runtime="12.9", cuda_driver="12.9", driver="575.57.08", cuda_python=True,
                   ort_providers=("CUDAExecutionProvider", "CPUExecutionProvider"), platform="Linux-x86_64")
ORIN = DeviceFacts(gpu="Orin", compute_capability="8.7", tensorrt="10.3.0.30", cuda_runtime="12.6",
                   cuda_python=True, ort_providers=("CPUExecutionProvider",), l4t="36.4.0", jetpack="6.1",
                   platform="Linux-aarch64")
CPU_ONLY = DeviceFacts(gpu_error="no cuda-python and no nvidia-smi", tensorrt_error="No module named 'tensorrt'",
                       ort_providers=("CPUExecutionProvider",), platform="Linux-x86_64")
SIZE = 64


def one_line(err: BaseException) -> str:
    msg = str(err)
    assert msg and "\n" not in msg, msg
    return msg


@pytest.fixture
def bundle_dir(tmp_path: Path) -> Path:
    return make_tiny_bundle(tmp_path / "bundle", size=SIZE)


def add_engine(root: Path, facts: DeviceFacts, precision: str = "fp16", **opts) -> str:
    """Register an engine built 'on' ``facts`` exactly as export-engine trt does after a build."""
    bundle = load_bundle(root)
    options = TrtBuildOptions(precision=precision, **opts)  # type: ignore[arg-type]
    source = source_onnx(bundle, precision, echo=lambda _: None)
    role = engine_role(precision, facts, options.dla_core)
    tmp = root / "trt" / f".{role}.engine.building"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_bytes(b"placeholder engine " + role.encode())
    shape = (1, 3, SIZE, SIZE)
    built = BuiltEngine(tmp, 1.5, {"image": Profile(shape, shape, shape)},
                        {"anomaly_map": [1, 1, SIZE, SIZE], "score_out": [1]},
                        build_plan(facts.tensorrt, precision, options.dla_core, options.gpu_fallback), False)
    register_engine(bundle, tmp, role, facts, options, built, source, None, echo=lambda _: None)
    return role


# -- sidecar: written at build, checked before deserializing -----------------------------------------
def test_registered_engine_matches_the_device_it_was_built_on(bundle_dir):
    role = add_engine(bundle_dir, ORIN)
    assert role == "trt_fp16_orin_sm87_trt10.3.0"
    bundle = load_bundle(bundle_dir)  # every file, the engine included, passes its sha256 check
    entry = bundle.manifest.files[role]
    assert (entry.backend, entry.precision, entry.path) == ("tensorrt", "fp16", f"trt/{role}.engine")
    assert entry.target == {"tensorrt": "10.3.0.30", "gpu": "Orin", "compute_capability": "8.7",
                            "l4t": "36.4.0", "platform": "Linux-aarch64"}
    # No FP16 ONNX in the bundle: one was cast from the FP32 model and registered as the source.
    fp16 = bundle.manifest.files["onnx_fp16"]
    assert (fp16.precision, fp16.path) == ("fp16", "trt/model.fp16.onnx")
    side = json.loads(sidecar_path(bundle_dir / entry.path).read_text())
    assert side["engine_sha256"] == entry.sha256
    assert side["device"] == {"tensorrt": "10.3.0.30", "gpu": "Orin", "compute_capability": "8.7",
                              "platform": "Linux-aarch64", "l4t": "36.4.0", "jetpack": "6.1",
                              "cuda_runtime": "12.6", "cuda_driver": None, "driver": None}
    assert side["source"] == {"role": "onnx_fp16", "path": "trt/model.fp16.onnx", "sha256": fp16.sha256,
                              "derived_from": "onnx_fp32"}
    assert side["precision"] == "fp16" and side["inputs"]["image"]["max"] == [1, 3, SIZE, SIZE]
    assert side["outputs"] == {"anomaly_map": [1, 1, SIZE, SIZE], "score_out": [1]}
    assert check_engine(bundle, role, ORIN).device.gpu == "Orin"


CHANGED = {"tensorrt": "10.7.0.23", "gpu": "Orin (nvgpu)", "compute_capability": "8.6", "l4t": "36.3.0",
           "platform": "Linux-x86_64"}


@pytest.mark.parametrize("key", ENGINE_KEYS)
def test_each_differing_device_fact_is_named_with_the_rebuild_command(bundle_dir, key):
    assert set(CHANGED) == set(ENGINE_KEYS)
    role = add_engine(bundle_dir, ORIN)
    here = ORIN.with_(**{key: CHANGED[key]})
    with pytest.raises(BundleError) as e:
        check_engine(load_bundle(bundle_dir), role, here)
    msg = one_line(e.value)
    built = str(getattr(ORIN, key))
    fmt = (lambda v: repr(v) if " " in v else v)
    assert f"{key} {fmt(built)} there, {fmt(CHANGED[key])} here" in msg
    assert msg.count(" there, ") == 1  # only that field
    assert msg.endswith(f"rebuild it on this device with: export-engine trt --bundle {bundle_dir} --precision fp16")


def test_engine_from_a_jetson_on_a_desktop_names_every_difference(bundle_dir):
    role = add_engine(bundle_dir, ORIN)
    with pytest.raises(BundleError) as e:
        make_runner(load_bundle(bundle_dir), "tensorrt", facts=H100)  # the daemon's path
    msg = one_line(e.value)
    for part in ("tensorrt 10.3.0.30 there, 10.13.0.35 here", "gpu Orin there, 'NVIDIA H100 80GB HBM3' here",
                 "compute_capability 8.7 there, 9.0 here", "l4t 36.4.0 there, none here",
                 "platform Linux-aarch64 there, Linux-x86_64 here", f"(role '{role}')"):
        assert part in msg, part


def test_the_check_runs_before_tensorrt_is_even_imported(bundle_dir, monkeypatch):
    """A matching sidecar lets the daemon go on to TensorRT itself: without it installed, the error is
    about the missing package, not about the engine. A foreign engine is refused either way."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError, as on this machine
    add_engine(bundle_dir, ORIN)
    with pytest.raises(BundleError, match="compute_capability 8.7 there, 9.0 here"):
        make_runner(load_bundle(bundle_dir), "tensorrt", facts=H100)
    with pytest.raises(BackendUnavailable) as e:
        make_runner(load_bundle(bundle_dir), "tensorrt", facts=ORIN)
    msg = one_line(e.value)
    assert "needs the TensorRT Python package" in msg and "JetPack" in msg and "pip install 'linecam[trt]'" in msg


def test_rebuild_command_repeats_the_build_options_and_parses(bundle_dir, tmp_path):
    spaced = tmp_path / "line 3 bundle"
    bundle_dir.rename(spaced)
    dla = ORIN.with_(jetpack=None)
    add_engine(spaced, dla, opt_level=5, workspace_mb=1024, dla_core=1)
    bundle = load_bundle(spaced)
    role = [r for r, e in bundle.manifest.files.items() if e.backend == "tensorrt"][0]
    assert role.startswith("trt_fp16_dla1_orin")
    with pytest.raises(BundleError) as e:
        check_engine(bundle, role, dla.with_(tensorrt="10.3.0.31"))
    cmd = one_line(e.value).split("rebuild it on this device with: ", 1)[1]
    assert cmd == (f"export-engine trt --bundle '{spaced}' --precision fp16 --opt-level 5 --workspace-mb 1024 "
                   f"--dla-core 1")
    argv = shlex.split(cmd)
    assert argv[3] == str(spaced)
    # A valid export-engine invocation: no usage error (exit 2); it stops later (no TensorRT, no DLA ...).
    assert export_main(argv[1:]) not in (0, 2)


def test_sidecar_missing_corrupt_or_from_another_engine(bundle_dir):
    role = add_engine(bundle_dir, ORIN)
    bundle = load_bundle(bundle_dir)
    side = sidecar_path(bundle.path(role))
    good = side.read_text()

    data = json.loads(good)
    data["engine_sha256"] = "0" * 64
    side.write_text(json.dumps(data))
    with pytest.raises(BundleError, match=r"engine_sha256 000000000000 in the sidecar.*belongs to another engine"):
        check_engine(bundle, role, ORIN)

    side.write_text(good[: len(good) // 2])
    with pytest.raises(BundleError) as e:
        check_engine(bundle, role, ORIN)
    assert one_line(e.value).startswith(f"cannot read {side}") and "export-engine trt --bundle" in str(e.value)

    del data["device"]
    data["engine_sha256"] = json.loads(good)["engine_sha256"]
    side.write_text(json.dumps(data))
    with pytest.raises(BundleError, match="field 'device': Field required"):
        check_engine(bundle, role, ORIN)

    side.unlink()
    with pytest.raises(BundleError) as e:
        check_engine(bundle, role, ORIN)
    assert f"has no sidecar {side.name}" in one_line(e.value)


def test_engine_built_from_an_older_model_is_refused(bundle_dir):
    role = add_engine(bundle_dir, ORIN)
    # The bundle is re-fitted (new FP16 model) but the old engine stays in the manifest.
    bundle = load_bundle(bundle_dir)
    m = darkness_model(SIZE, SIZE)
    m.graph.initializer[3].float_data[0] = 0.4  # another k_mean: another model
    onnx.save(m, str(bundle_dir / "trt" / "model.fp16.onnx"))
    files = dict(bundle.manifest.files)
    files["onnx_fp16"] = file_entry(bundle_dir, "trt/model.fp16.onnx", precision="fp16")
    write_manifest(bundle_dir, bundle.manifest.model_copy(update={"files": files}))
    with pytest.raises(BundleError, match=r"source_onnx onnx_fp16 sha256 \w{12} at build, \w{12} in this bundle"):
        check_engine(load_bundle(bundle_dir), role, ORIN)


# -- backend selection ---------------------------------------------------------------------------------
def test_auto_on_a_machine_without_gpu(bundle_dir):
    add_engine(bundle_dir, ORIN)
    c = choose_backend(load_bundle(bundle_dir), "auto", None, CPU_ONLY)
    assert (c.backend, c.role, c.fallbacks) == ("onnxruntime", "onnx_fp32", ())
    assert "no TensorRT (TensorRT not importable: No module named 'tensorrt')" in c.reason
    assert "no ONNX Runtime CUDA (no GPU)" in c.reason


def test_auto_prefers_a_matching_engine_then_ort_cuda_then_cpu(bundle_dir):
    role = add_engine(bundle_dir, H100)
    c = choose_backend(load_bundle(bundle_dir), "auto", None, H100)
    assert (c.backend, c.role) == ("tensorrt", role)
    assert [(f.backend, f.role) for f in c.fallbacks] == [("onnxruntime-cuda", "onnx_fp32"),
                                                         ("onnxruntime", "onnx_fp32")]
    assert "built for this device (NVIDIA H100 80GB HBM3 (compute capability 9.0), TensorRT 10.13.0.35" in c.reason


def test_auto_steps_down_when_the_engine_is_for_another_gpu(bundle_dir):
    add_engine(bundle_dir, ORIN)
    c = choose_backend(load_bundle(bundle_dir), "auto", None, H100)
    assert c.backend == "onnxruntime-cuda"
    assert "no TensorRT engine for this device (TensorRT engine" in c.reason
    assert "compute_capability 8.7 there, 9.0 here" in c.reason
    c = choose_backend(load_bundle(bundle_dir), "auto", None, H100.with_(ort_providers=("CPUExecutionProvider",)))
    assert c.backend == "onnxruntime" and "onnxruntime has no CUDAExecutionProvider" in c.reason


@pytest.mark.parametrize("facts, why", [
    (H100.with_(tensorrt=None, tensorrt_error="libnvinfer.so.10: cannot open shared object file"),
     "no TensorRT (TensorRT not importable: libnvinfer.so.10"),
    (H100.with_(cuda_python=False, cuda_python_error="No module named 'cuda'", torch=False),
     "no TensorRT (no cuda-python: No module named 'cuda')"),
])
def test_auto_says_why_tensorrt_was_passed_over(bundle_dir, facts, why):
    add_engine(bundle_dir, H100)
    c = choose_backend(load_bundle(bundle_dir), "auto", None, facts)
    assert c.backend == "onnxruntime-cuda" and why in c.reason


def test_engine_per_device_and_precision(bundle_dir):
    orin = add_engine(bundle_dir, ORIN)
    h100_fp16 = add_engine(bundle_dir, H100)
    h100_fp32 = add_engine(bundle_dir, H100, precision="fp32")
    b = load_bundle(bundle_dir)
    assert choose_backend(b, "auto", None, ORIN).role == orin
    assert choose_backend(b, "auto", None, H100).role == h100_fp16      # FP16 is the default
    assert choose_backend(b, "tensorrt", "fp32", H100).role == h100_fp32
    with pytest.raises(BundleError, match="has no TensorRT engine for int8: build one on this device with: "
                                          "export-engine trt --bundle .* --precision int8"):
        choose_backend(b, "tensorrt", "int8", H100)


def test_no_engine_in_the_bundle(bundle_dir):
    b = load_bundle(bundle_dir)
    c = choose_backend(b, "auto", None, H100)
    assert c.backend == "onnxruntime-cuda"
    assert f"has no TensorRT engine: build one on this device with: export-engine trt --bundle {bundle_dir} " \
           f"--precision fp16" in c.reason
    with pytest.raises(BundleError) as e:
        choose_backend(b, "tensorrt", None, H100)
    assert one_line(e.value).endswith("--precision fp16")


@pytest.mark.parametrize("backend, facts, needles", [
    ("tensorrt", CPU_ONLY, ("needs the TensorRT Python package", "No module named 'tensorrt'",
                            "no pip wheel exists for Tegra", "pip install 'linecam[trt]'",
                            "set model.backend: onnxruntime")),
    ("tensorrt", CPU_ONLY.with_(tensorrt="10.3.0.30"), ("needs an NVIDIA GPU", "nvidia-smi")),
    ("tensorrt", H100.with_(cuda_python=False, torch=False), ("pip install 'cuda-python>=12'",)),
    ("onnxruntime-cuda", CPU_ONLY, ("CUDAExecutionProvider", "pip install onnxruntime-gpu")),
    ("onnxruntime-cuda", CPU_ONLY.with_(ort_providers=("CUDAExecutionProvider",)), ("needs an NVIDIA GPU",)),
])
def test_explicit_backend_that_cannot_run_says_what_is_missing(bundle_dir, backend, facts, needles):
    add_engine(bundle_dir, H100)
    with pytest.raises(BackendUnavailable) as e:
        choose_backend(load_bundle(bundle_dir), backend, None, facts)
    msg = one_line(e.value)
    for n in needles:
        assert n in msg, (n, msg)


def test_explicit_onnxruntime_and_unknown_backend(bundle_dir):
    b = load_bundle(bundle_dir)
    assert choose_backend(b, "onnxruntime", None, H100).backend == "onnxruntime"
    with pytest.raises(LinecamError, match="unknown backend 'trt': use one of auto, tensorrt"):
        choose_backend(b, "trt", None, H100)


def test_auto_on_this_machine_runs_the_model(bundle_dir, caplog):
    facts = probe_device()
    if facts.gpu is not None:
        pytest.skip("this machine has a GPU: the CPU fallback is not what auto picks here")
    caplog.set_level(logging.INFO, logger="linecam.runtime.backends.select")
    runner = make_runner(load_bundle(bundle_dir), "auto")
    assert isinstance(runner, OrtRunner) and runner.role == "onnx_fp32"
    assert any("backend onnxruntime, model onnx_fp32: auto: no TensorRT" in r.getMessage() for r in caplog.records)
    img = np.full((SIZE, SIZE, 3), 200, np.uint8)
    img[8:24, 8:24] = 10
    from linecam.preprocess import Preprocessor

    out = runner.run(Preprocessor(load_bundle(bundle_dir).manifest.preprocess)(img))
    assert out.score == pytest.approx(darkness_reference(img), abs=1e-5)


def test_auto_steps_down_when_a_runner_fails_to_start(bundle_dir, monkeypatch, caplog):
    """Facts say TensorRT and ORT CUDA could run; on this machine neither starts, so auto ends on the CPU."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    add_engine(bundle_dir, H100)
    caplog.set_level(logging.INFO, logger="linecam.runtime.backends.select")
    runner = make_runner(load_bundle(bundle_dir), "auto", facts=H100)
    assert isinstance(runner, OrtRunner)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings[0].startswith("backend tensorrt (trt_fp16_h100-80gb-hbm3_sm90_trt10.13.0) failed to start: "
                                  "backend 'tensorrt' needs the TensorRT Python package")
    assert warnings[1].startswith("backend onnxruntime-cuda (onnx_fp32) failed to start: backend "
                                  "'onnxruntime-cuda' needs ONNX Runtime's CUDAExecutionProvider")
    with pytest.raises(BackendUnavailable):  # explicit: no stepping down
        make_runner(load_bundle(bundle_dir), "tensorrt", facts=H100)


def test_onnxruntime_cuda_on_this_machine(bundle_dir):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    with pytest.raises(BackendUnavailable) as e:
        make_runner(load_bundle(bundle_dir), "onnxruntime-cuda")
    assert "pip install onnxruntime-gpu" in one_line(e.value)


def test_config_backends():
    assert ModelConfig(bundle=Path("b")).backend == "onnxruntime"  # CPU stays the default
    for b in ("auto", "tensorrt", "onnxruntime-cuda", "onnxruntime"):
        assert ModelConfig(bundle=Path("b"), backend=b).backend == b
    with pytest.raises(ValueError):
        ModelConfig(bundle=Path("b"), backend="trt")


# -- profiles and build plans ------------------------------------------------------------------------
def test_static_profile():
    p = profile_shapes("image", [1, 3, 256, 320], [1, 3, 256, 320])
    assert (p.min, p.opt, p.max, p.dynamic) == ((1, 3, 256, 320),) * 3 + (False,)


def test_dynamic_batch_and_size_from_the_manifest():
    p = profile_shapes("image", [-1, 3, -1, -1], ["batch", 3, 256, 256], max_batch=8)
    assert (p.min, p.opt, p.max) == ((1, 3, 256, 256), (1, 3, 256, 256), (8, 3, 256, 256)) and p.dynamic
    assert profile_shapes("image", ["N", 3, 64, 64], [1, 3, 64, 64]).max == (1, 3, 64, 64)


@pytest.mark.parametrize("onnx_shape, manifest, kw, needle", [
    ([1, 3, 256, 256], [1, 3, 320, 256], {}, "static dimension mismatch: input 'image' axis 2 is 256 in the ONNX "
                                             "but 320 in the manifest"),
    ([1, 3, 256, 256], [1, 3, 256, 256], {"max_batch": 4}, "has a fixed batch of 1, so --max-batch 4 cannot be built"),
    ([1, 3, -1, 256], [1, 3, "h", 256], {}, "axis 2 is dynamic in both the ONNX and the manifest"),
    ([1, 3, 256], [1, 3, 256, 256], {}, "has 3 dimensions in the ONNX but 4 in the manifest"),
])
def test_profile_errors(onnx_shape, manifest, kw, needle):
    with pytest.raises(BundleError) as e:
        profile_shapes("image", onnx_shape, manifest, **kw)
    assert needle in one_line(e.value)


@pytest.mark.parametrize("version, precision, dla, fallback, expect", [
    ("10.3.0.30", "fp16", None, True, (True, ("STRONGLY_TYPED",), ())),
    ("10.3.0.30", "int8", None, True, (True, ("STRONGLY_TYPED",), ())),
    ("10.13.0.35", "fp32", None, True, (True, ("STRONGLY_TYPED",), ())),
    ("11.4.0.106", "fp16", None, True, (True, (), ())),       # always strongly typed; no flags exist
    ("11.4.1.2", "int8", 0, True, (True, (), ("GPU_FALLBACK",))),
    ("10.3.0.30", "fp16", 0, True, (False, (), ("FP16", "GPU_FALLBACK"))),
    ("10.3.0.30", "int8", 1, False, (False, (), ("FP16", "INT8"))),
])
def test_build_plan(version, precision, dla, fallback, expect):
    p = build_plan(version, precision, dla, fallback)
    assert (p.strongly_typed, p.network_flags, p.builder_flags) == expect


def test_build_plan_refusals():
    with pytest.raises(BundleError, match="DLA runs FP16 or INT8 only"):
        build_plan("10.3.0.30", "fp32", dla_core=0)
    with pytest.raises(BackendUnavailable, match=r"needs TensorRT >= 10 \(this is 8.6.2\)"):
        build_plan("8.6.2", "fp16")


def test_device_slug_and_roles():
    assert device_slug(H100) == "h100-80gb-hbm3_sm90_trt10.13.0"
    assert engine_role("int8", ORIN, dla_core=0) == "trt_int8_dla0_orin_sm87_trt10.3.0"
    assert device_slug(DeviceFacts(gpu="NVIDIA GeForce RTX 4090", compute_capability="8.9",
                                   tensorrt="11.4.0.106")) == "geforce-rtx-4090_sm89_trt11.4.0"


def test_dla_placement_report():
    info = {"Layers": [
        {"Name": "{ForeignNode[/enc/conv1/Conv.../enc/relu3/Relu]}", "LayerType": "DLA"},
        {"Name": "/head/Sigmoid", "LayerType": "PointWiseV2"},
        {"Name": "Reformatting CopyNode for Input Tensor 0", "LayerType": "Reformat"},
        "names-only layer"], "Bindings": ["image", "anomaly_map", "score"]}
    r = placement_report(info, [("/head/ReduceMax", "REDUCE")], dla_core=0)
    assert r["engine_layers_on_dla"] == ["{ForeignNode[/enc/conv1/Conv.../enc/relu3/Relu]} (DLA)"]
    assert r["engine_layers_on_gpu"] == ["/head/Sigmoid (PointWiseV2)",
                                         "Reformatting CopyNode for Input Tensor 0 (Reformat)"]
    assert r["engine_layers_unknown"] == 1
    line = placement_line(r)
    assert line.startswith("DLA core 0: 1 DLA subgraph(s), 2 GPU layer(s): /head/Sigmoid (PointWiseV2)")
    assert line.endswith("1 network layer(s) cannot run on DLA: /head/ReduceMax (REDUCE)")


# -- verification: engine vs ONNX Runtime --------------------------------------------------------------
def outputs(scores, maps=None):
    maps = maps if maps is not None else [np.zeros((4, 4), np.float32) for _ in scores]
    return [ExpertOutput(anomaly_map=m, score=s) for s, m in zip(scores, maps)]


def test_auroc_known_values():
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert auroc([0.1, 0.2, 0.3], [0, 1, 1]) == 1.0
    assert auroc([0.5, 0.5], [0, 1]) == 0.5
    assert auroc([0.1, 0.2], [0, 0]) is None


def test_compare_passes_within_tolerance_and_ignores_borderline_flips():
    from linecam.bundle import Thresholds

    thr = Thresholds(image=0.5, pixel=0.5)
    tol = Tolerances(score=0.02, map=0.05, pixel_agreement=0.99)
    ref = outputs([0.2, 0.495, 0.9])
    eng = outputs([0.205, 0.504, 0.9])  # 0.495 -> 0.504 flips, but 0.495 is within the +-0.01 band
    r = compare(ref, eng, thr, tol, names=["a", "b", "c"])
    assert r.passed, r.failures
    assert r.verdicts_compared == 2 and r.verdict_disagreements == []
    assert r.score_max_abs == pytest.approx(0.009) and r.score_max_rel == pytest.approx(0.018)


def test_compare_fails_on_a_clear_verdict_flip_and_on_maps():
    from linecam.bundle import Thresholds

    thr = Thresholds(image=0.5, pixel=0.5)
    tol = DEFAULT_TOLERANCES["fp16"]
    ref_maps = [np.full((8, 8), 0.2, np.float32), np.full((8, 8), 0.2, np.float32)]
    eng_maps = [m.copy() for m in ref_maps]
    eng_maps[1][:4] = 0.9  # half of one map turns NG
    r = compare(outputs([0.3, 0.45], ref_maps), outputs([0.3, 0.6], eng_maps), thr, tol, names=["ok.png", "x.png"])
    assert not r.passed
    text = " | ".join(r.failures)
    assert "image score differs by 30.00% of the threshold on x.png (bound 3%)" in text
    assert "OK/NG verdict flips on 1 of 2 clear image(s) (first: x.png)" in text
    assert "pixel verdicts agree on 75.000%" in text
    assert "anomaly map differs by 140.00% of the pixel threshold" in text


def test_compare_auroc_drop():
    from linecam.bundle import Thresholds

    thr = Thresholds(image=10.0, pixel=10.0)  # far away: only the ranking changes
    tol = Tolerances(score=0.5, map=0.5, pixel_agreement=0.0, auroc_drop=0.005)
    r = compare(outputs([0.1, 0.2, 0.3, 0.4]), outputs([0.1, 0.35, 0.3, 0.4]), thr, tol, labels=[0, 0, 1, 1])
    assert (r.auroc_reference, r.auroc_engine) == (1.0, 0.75)
    assert r.failures == ["image AUROC drops 0.2500 (bound 0.005)"]


def write_images(folder: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = np.full((SIZE, SIZE, 3), 200, np.uint8)
        if i % 2:  # a dark defect on every other image
            y, x = rng.integers(0, SIZE - 16, size=2)
            img[y:y + 16, x:x + 16] = rng.integers(0, 40)
        img = np.clip(img.astype(int) + rng.integers(-10, 10, img.shape), 0, 255).astype(np.uint8)
        cv2.imwrite(str(folder / f"img{i:03d}.png"), img)
    return folder


def test_verify_engine_on_real_models(bundle_dir, tmp_path):
    """The verification path with real runners: an FP16 cast of the model passes the FP16 bounds,
    a model that computes something else fails them."""
    images = load_images(write_images(tmp_path / "imgs", 8), limit=6)
    assert len(images) == 6 and all(im.label is None for im in images)
    bundle = load_bundle(bundle_dir)
    fp16 = derive_fp16_onnx(bundle_dir / "model.onnx", tmp_path / "fp16.onnx")
    cand = OrtRunner(fp16, bundle.manifest)
    ok = verify_engine(bundle, cand.run, images, "fp16", DEFAULT_TOLERANCES["fp16"])
    assert ok.passed, ok.failures
    assert ok.n_images == 6 and 0 < ok.score_max_abs < 0.01

    wrong = darkness_model(SIZE, SIZE)
    wrong.graph.initializer[3].float_data[0] = 0.3  # mean 0.3 instead of 0.5: darker everywhere
    onnx.save(wrong, str(tmp_path / "wrong.onnx"))
    bad = verify_engine(bundle, OrtRunner(tmp_path / "wrong.onnx", bundle.manifest).run, images, "fp16",
                        DEFAULT_TOLERANCES["fp16"])
    assert not bad.passed and "image score differs by" in bad.failures[0]


def test_labelled_verification_images(tmp_path):
    write_images(tmp_path / "test" / "good", 3)
    write_images(tmp_path / "test" / "scratch", 2, seed=1)
    images = load_images(tmp_path / "test")
    assert [(im.name, im.label) for im in images] == [
        ("good/img000.png", 0), ("good/img001.png", 0), ("good/img002.png", 0),
        ("scratch/img000.png", 1), ("scratch/img001.png", 1)]
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="holds no readable image"):
        load_images(tmp_path / "empty")


# -- export-engine trt on a machine without TensorRT / GPU ----------------------------------------------
def test_export_engine_trt_without_tensorrt(bundle_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setattr("linecam.runtime.device.load_cudart", lambda: (_ for _ in ()).throw(ImportError("no cuda")))
    # 3: a backend this machine lacks, as for `linecam run` (README exit codes)
    assert export_main(["trt", "--bundle", str(bundle_dir)]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: export-engine trt needs the TensorRT Python package")
    assert "no pip wheel exists for Tegra" in err[0] and "keep using the bundle's ONNX model" in err[0]


def test_export_engine_trt_option_errors_come_before_any_build(bundle_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendUnavailable, match="has no usable NVIDIA GPU"):
        build_bundle_engine(bundle_dir, facts=CPU_ONLY.with_(tensorrt="10.3.0.30"), echo=lambda _: None)
    with pytest.raises(BundleError, match="DLA runs FP16 or INT8 only"):
        build_bundle_engine(bundle_dir, TrtBuildOptions(precision="fp32", dla_core=0), facts=ORIN,
                            echo=lambda _: None)
    with pytest.raises(BundleError, match="no verification images: .* pass --images"):
        build_bundle_engine(bundle_dir, facts=ORIN, echo=lambda _: None)
    with pytest.raises(BundleError, match="has no int8 ONNX model .* add an INT8 ONNX with symmetric Q/DQ"):
        build_bundle_engine(bundle_dir, TrtBuildOptions(precision="int8", images=write_images(tmp_path / "i", 2)),
                            facts=ORIN, echo=lambda _: None)
    # Everything checked: the build itself is where TensorRT is needed.
    with pytest.raises(BackendUnavailable, match="export-engine trt needs the TensorRT Python package"):
        build_bundle_engine(bundle_dir, TrtBuildOptions(images=tmp_path / "i"), facts=ORIN, echo=lambda _: None)
    assert "trt_fp16" not in "".join(read_manifest(bundle_dir)["files"])  # nothing registered


# -- device facts ----------------------------------------------------------------------------------------
def test_parse_jetson_versions():
    text = ("# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64, "
            "DATE: Fri Sep 13 04:36:44 UTC 2024\n# KERNEL_VARIANT: oot\n")
    assert parse_nv_tegra_release(text) == "36.4.0"
    assert parse_nv_tegra_release("# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref") == "35.4.1"
    assert parse_nv_tegra_release("garbage") is None
    assert parse_jetpack_version("6.1+b123") == "6.1"
    assert parse_jetpack_version("5.1.2-b104") == "5.1.2"
    assert parse_jetpack_version("") is None
    assert version_from_int(12060) == "12.6" and version_from_int(11080) == "11.8"


def test_probe_device_here(tmp_path):
    rel = tmp_path / "nv_tegra_release"
    rel.write_text("# R36 (release), REVISION: 3.0, GCID: 36191598, BOARD: generic, EABI: aarch64\n")
    facts = probe_device(rel)
    assert facts.l4t == "36.3.0" and facts.is_jetson
    assert "CPUExecutionProvider" in facts.ort_providers
    plain = probe_device(tmp_path / "absent")
    assert plain.l4t is None and plain.jetpack is None
    if plain.gpu is None:
        assert plain.compute_capability is None and plain.gpu_error
        assert plain.engine_target() == ({"tensorrt": plain.tensorrt} if plain.tensorrt else {}) | {
            "platform": plain.platform}


def test_runtime_side_imports_without_tensorrt_and_torch():
    code = (
        "import sys\n"
        "class _Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'tensorrt', 'cuda'):\n"
        "            raise ImportError(name + ' is blocked in this test')\n"
        "sys.meta_path.insert(0, _Block())\n"
        "import linecam.runtime.backends.tensorrt, linecam.runtime.backends.select, linecam.runtime.device\n"
        "import linecam.runtime.backends.onnxruntime, linecam.export.trt, linecam.export.trt_verify\n"
        "from linecam.runtime.device import probe_device\n"
        "f = probe_device()\n"
        "assert f.tensorrt is None and not f.cuda_python, f\n"
        "assert not any(m.split('.')[0] in ('torch', 'tensorrt') for m in sys.modules)\n"
        "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_read_sidecar_roundtrip(bundle_dir):
    role = add_engine(bundle_dir, H100, precision="fp32")
    entry, side = read_sidecar(load_bundle(bundle_dir), role)
    assert side.source.role == "onnx_fp32" and side.source.derived_from is None
    assert side.build.strongly_typed and side.build.builder_flags == []
    assert rebuild_command(bundle_dir, side.precision, side.build) == \
        f"export-engine trt --bundle {bundle_dir} --precision fp32"


def test_cpu_only_torch_is_no_device_buffer_fallback(monkeypatch):
    import importlib.metadata

    from linecam.runtime import device

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "torch" else None)
    for version, usable in (("2.13.0+cpu", False), ("2.13.0", True), ("2.5.0a0+872d972e41.nv24.08", True)):
        monkeypatch.setattr(importlib.metadata, "version", lambda name, v=version: v)
        assert device.torch_with_cuda() is usable, version
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert device.torch_with_cuda() is False
