"""``linecam bench engines`` (linecam/bench/engines.py): the engine benchmark's machinery (issue 4).

On a machine without a GPU: the CPU rows are measured for real, every GPU backend is recorded as
skipped with its reason, the headline says "not measured", the files are written, and bad input
gives one ``error:`` line. What to expect of the GPU rows is decided from ``probe_device()``, so
the same tests hold on a GPU box; the full GPU run is ``test_full_run_on_the_gpu`` (marked ``gpu``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bundles import make_tiny_bundle
from linecam.bundle import file_entry, load_bundle, write_manifest
from linecam.runtime.device import DeviceFacts, probe_device

from linecam.bench import engines as eb

ROOT = Path(__file__).resolve().parent.parent
COMMAND = [sys.executable, "-m", "linecam", "bench", "engines"]

FACTS = probe_device()
TORCH = eb.torch_info()
BLOCKERS = eb.gpu_blockers(FACTS, TORCH)
STATUSES = {"measured", "skipped", "not applicable", "failed"}
NO_TORCH = pytest.mark.skipif(TORCH["version"] is None, reason="the random-weight student needs torch")


def _row(data: dict, backend: str, precision: str) -> dict:
    rows = [r for r in data["rows"] if r["backend"] == backend and r["precision"] == precision]
    assert len(rows) == 1, (backend, precision)
    return rows[0]


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[Path, dict]:
    """One --quick run at 64x64 (a random-weight student exported, quantized and timed)."""
    if TORCH["version"] is None:
        pytest.skip("the random-weight student needs torch")
    out = tmp_path_factory.mktemp("engines")
    assert eb.main(["--quick", "--size", "64", "--out", str(out)]) == 0
    stem = f"engines-{eb.device_slug(FACTS)}-quick"
    return out / stem, json.loads((out / f"{stem}.json").read_text())


# --------------------------------------------------------------------------- pure logic


def test_gpu_blockers_name_every_missing_piece():
    bare = DeviceFacts(gpu=None, gpu_error="no cuda-python and no nvidia-smi", tensorrt=None,
                       tensorrt_error="No module named 'tensorrt'", cuda_python=False,
                       cuda_python_error="No module named 'cuda'", ort_providers=("CPUExecutionProvider",))
    cpu_torch = {"version": "2.13.0+cpu", "cuda": None, "cuda_available": False, "error": None}
    b = eb.gpu_blockers(bare, cpu_torch)
    assert "tensorrt not installed" in b["tensorrt"] and "no CUDA device" in b["tensorrt"]
    assert "no cuda-python" in b["tensorrt"]
    assert "CUDAExecutionProvider" in b["onnxruntime-cuda"] and "no CUDA device" in b["onnxruntime-cuda"]
    assert b["torch-cuda"] == "torch 2.13.0+cpu has no CUDA; no CUDA device (no cuda-python and no nvidia-smi)"
    assert b["onnxruntime"] is None and b["torch-cpu"] is None
    assert all("\n" not in v for v in b.values() if v)

    full = DeviceFacts(gpu="NVIDIA H100 80GB HBM3", compute_capability="9.0", tensorrt="10.13.0.35",
                       cuda_python=True, ort_providers=("CUDAExecutionProvider", "CPUExecutionProvider"))
    cuda_torch = {"version": "2.13.0+cu128", "cuda": "12.8", "cuda_available": True, "error": None}
    assert all(v is None for v in eb.gpu_blockers(full, cuda_torch).values())
    # A GPU, TensorRT, but the CPU-only onnxruntime wheel: only ORT CUDA is blocked, and says why.
    part = eb.gpu_blockers(full.with_(ort_providers=("CPUExecutionProvider",)), cuda_torch)
    assert part["tensorrt"] is None and part["torch-cuda"] is None
    assert part["onnxruntime-cuda"] == "onnxruntime has no CUDAExecutionProvider (onnxruntime-gpu not installed)"
    assert eb.gpu_blockers(full, {"version": None, "cuda": None, "cuda_available": False,
                                  "error": "No module named 'torch'"})["torch-cpu"].startswith("torch not installed")
    assert eb.device_slug(full) == "h100-80gb-hbm3" and eb.device_slug(bare) == "cpu"


def _rows(fp16: dict | None, int8: dict | None, cpu32: float = 4.0, cpu8: float = 2.0) -> list[dict]:
    rows = []
    for b in eb.BACKENDS:
        for p in eb.PRECISIONS:
            rows.append({"backend": b, "precision": p, "status": "skipped", "reason": "x", "ms": None})
    for (b, p), ms in {("tensorrt", "fp16"): fp16, ("tensorrt", "int8"): int8,
                       ("onnxruntime", "fp32"): {"p50": cpu32, "p99": cpu32}, ("onnxruntime", "int8"):
                       {"p50": cpu8, "p99": cpu8}}.items():
        if ms is not None:
            r = next(r for r in rows if r["backend"] == b and r["precision"] == p)
            r.update(status="measured", reason=None, ms=ms)
    return rows


def test_headline_target_and_int8_verdicts():
    h100 = DeviceFacts(gpu="NVIDIA H100 80GB HBM3", compute_capability="9.0", tensorrt="10.13.0.35")
    h = eb.headline(_rows({"p50": 0.5, "p99": 0.8}, {"p50": 0.4, "p99": 0.7}), h100, 256)
    assert h["fp16_p99_target"]["status"] == "met" and h["fp16_p99_target"]["caveats"] == []
    assert h["int8_vs_fp16"]["status"] == "int8 no slower" and h["int8_vs_fp16"]["ratio_p50"] == pytest.approx(0.8)
    assert h["cpu"]["fp32_over_int8_p50"] == pytest.approx(2.0)

    h = eb.headline(_rows({"p50": 0.9, "p99": 1.2}, {"p50": 1.08, "p99": 1.3}), h100.with_(gpu="Orin"), 224)
    assert h["fp16_p99_target"]["status"] == "not met" and "+0.200 ms" in h["fp16_p99_target"]["line"]
    assert len(h["fp16_p99_target"]["caveats"]) == 2  # not 256x256, not an H100-class GPU
    line = h["int8_vs_fp16"]["line"]
    assert h["int8_vs_fp16"]["status"] == "int8 slower" and "SLOWER" in line and "FP16 stays the default" in line

    h = eb.headline(_rows(None, None), DeviceFacts(gpu=None, gpu_error="none"), 256)
    assert h["fp16_p99_target"]["status"] == "not measured" and "(no GPU)" in h["fp16_p99_target"]["line"]
    assert h["int8_vs_fp16"]["status"] == "not measured" and h["int8_vs_fp16"]["ratio_p50"] is None
    # On a GPU box where the INT8 build failed, the reason is carried into the headline.
    rows = _rows({"p50": 0.5, "p99": 0.8}, None)
    next(r for r in rows if r["backend"] == "tensorrt" and r["precision"] == "int8").update(
        status="failed", reason="BundleError: the int8 engine disagrees with the bundle's model")
    h = eb.headline(rows, h100, 256)
    assert h["int8_vs_fp16"]["status"] == "not measured" and "disagrees" in h["int8_vs_fp16"]["line"]


# --------------------------------------------------------------------------- a real quick run


@NO_TORCH
def test_quick_run_has_every_row_and_measures_the_cpu(quick):
    _, data = quick
    assert [(r["backend"], r["precision"]) for r in data["rows"]] == [
        (b, p) for b in eb.BACKENDS for p in eb.PRECISIONS]
    for r in data["rows"]:
        assert r["status"] in STATUSES, r
        if r["status"] == "measured":
            assert r["reason"] is None and r["ms"]["n"] == 5
        else:
            assert r["ms"] is None and r["reason"] and "\n" not in r["reason"], r
    for p in ("fp32", "fp16", "int8"):  # ONNX Runtime CPU runs all three (FP16 with casts)
        ms = _row(data, "onnxruntime", p)["ms"]
        assert ms is not None, _row(data, "onnxruntime", p)
        assert 0 < ms["min"] <= ms["p50"] <= ms["p90"] <= ms["p99"] <= ms["max"], ms
    assert _row(data, "onnxruntime", "int8")["model"] == "onnx_int8"
    assert _row(data, "torch-cpu", "fp32")["status"] == "measured"
    for b in ("torch-cpu", "torch-cuda"):
        assert _row(data, b, "int8")["status"] == "not applicable"
    assert data["input"] == [1, 3, 64, 64] and data["quick"] is True
    assert data["command"] == "linecam bench engines --quick --size 64 --out " + str(
        quick[0].parent)
    v = data["versions"]
    assert v["onnxruntime"] and v["torch"] == TORCH["version"] and v["tensorrt"] == FACTS.tensorrt
    assert data["cpu"]["model"] and data["device"]["gpu"] == FACTS.gpu
    assert data["model"]["int8"]["qdq_pairs"] > 0 and set(data["model"]["files"]) >= {
        "onnx_fp32", "onnx_fp16", "onnx_int8"}


@NO_TORCH
def test_gpu_backends_are_skipped_with_the_reason_when_missing(quick):
    _, data = quick
    h = data["headline"]
    for b in eb.GPU_BACKENDS:
        for p in eb.PRECISIONS:
            r = _row(data, b, p)
            if (b, p) in eb.NOT_APPLICABLE:
                continue
            if BLOCKERS[b]:
                assert r["status"] == "skipped" and r["reason"] == BLOCKERS[b], r
                assert r["runs_on"] == "GPU"
            else:  # this machine has what the backend needs: it must have run
                assert r["status"] == "measured", r
    if FACTS.gpu is None:
        assert data["device"]["slug"] == "cpu" and data["device"]["name"].startswith("CPU only")
        for b in eb.GPU_BACKENDS:
            assert "no CUDA device" in _row(data, b, "fp32")["reason"]
        assert h["fp16_p99_target"]["status"] == "not measured" and "no GPU" in h["fp16_p99_target"]["line"]
        assert h["int8_vs_fp16"]["status"] == "not measured"
    if FACTS.tensorrt is None:
        assert "tensorrt not installed" in _row(data, "tensorrt", "fp16")["reason"]
    if "CUDAExecutionProvider" not in FACTS.ort_providers:
        assert "CUDAExecutionProvider" in _row(data, "onnxruntime-cuda", "fp16")["reason"]


@NO_TORCH
def test_markdown_is_written(quick):
    stem, data = quick
    text = stem.with_suffix(".md").read_text()
    assert data["device"]["name"] in text and "--quick" in text
    for key in ("fp16_p99_target", "int8_vs_fp16", "cpu"):
        assert data["headline"][key]["line"] in text
    for label in eb.LABELS.values():
        assert f"| {label} |" in text
    cpu = _row(data, "onnxruntime", "fp32")["ms"]
    assert f"{cpu['p50']:.3f}" in text and f"{cpu['p99']:.3f}" in text
    assert text.count("\n| ") == 2 + len(eb.BACKENDS) * len(eb.PRECISIONS)  # header, rule, one line per row


def test_a_bundle_is_benchmarked_from_a_copy_and_not_changed(tmp_path):
    """--bundle on a tiny non-student bundle (FP32 only): FP16 cast in the copy, no INT8 or torch rows."""
    bundle = make_tiny_bundle(tmp_path / "tiny", size=32)
    before = (bundle / "manifest.json").read_bytes()
    out = tmp_path / "out"
    assert eb.main(["--bundle", str(bundle), "--quick", "--backends", "onnxruntime,torch-cpu",
                    "--out", str(out)]) == 0
    data = json.loads((out / f"engines-{eb.device_slug(FACTS)}-quick.json").read_text())
    assert (bundle / "manifest.json").read_bytes() == before and sorted(p.name for p in bundle.iterdir()) == [
        "manifest.json", "model.onnx"]
    assert data["model"]["source"] == "bundle" and data["model"]["fp16_derived"] is True
    assert _row(data, "onnxruntime", "fp32")["status"] == "measured"
    assert _row(data, "onnxruntime", "fp16")["status"] == "measured"
    assert _row(data, "onnxruntime", "int8")["reason"] == "the bundle has no int8 ONNX model"
    if TORCH["version"] is not None:
        assert "not a distilled student" in _row(data, "torch-cpu", "fp32")["reason"]
    assert _row(data, "tensorrt", "fp16")["reason"].startswith("not selected")


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*COMMAND, *args], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)


def test_bad_input_gives_one_error_line(tmp_path):
    missing = tmp_path / "no-such-bundle"
    p = _run_cli("--bundle", str(missing), "--out", str(tmp_path / "out"))
    assert p.returncode != 0 and p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --bundle") and "does not exist" in lines[0], p.stderr
    assert not (tmp_path / "out").exists()

    cases = []
    empty = tmp_path / "empty"
    empty.mkdir()
    cases.append((["--bundle", str(empty)], "manifest.json is missing"))
    # A bundle whose only model is FP16: the benchmark needs the FP32 ONNX.
    b = make_tiny_bundle(tmp_path / "fp16only", size=32)
    m = load_bundle(b).manifest
    write_manifest(b, m.model_copy(update={"files": {"onnx_fp16": file_entry(b, "model.onnx", precision="fp16")}}))
    cases.append((["--bundle", str(b)], "has no FP32 ONNX model"))
    cases.append((["--bundle", str(make_tiny_bundle(tmp_path / "t32", size=32)), "--size", "64"],
                  "does not match the bundle's input 32x32"))
    cases.append((["--size", "100"], "multiple of 8"))
    cases.append((["--backends", "tensorrt,cuda"], "--backends"))
    for argv, want in cases:
        p = _run_cli(*argv, "--quick", "--out", str(tmp_path / "out"))
        lines = p.stderr.strip().splitlines()
        assert p.returncode != 0, (argv, p.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: ") and want in lines[0], (argv, p.stderr)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- on a GPU


@NO_TORCH
@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(BLOCKERS["tensorrt"] is not None,
                    reason=f"needs an NVIDIA GPU with TensorRT: {BLOCKERS['tensorrt']}")
def test_full_run_on_the_gpu(tmp_path):
    """The real thing at 256x256 (few calls): engines built and verified, every GPU row measured."""
    assert eb.main(["--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / f"engines-{eb.device_slug(FACTS)}-quick.json").read_text())
    for b in eb.GPU_BACKENDS:
        for p in eb.PRECISIONS:
            r = _row(data, b, p)
            if (b, p) in eb.NOT_APPLICABLE or BLOCKERS[b]:
                continue
            assert r["status"] == "measured", r
            assert 0 < r["ms"]["p50"] <= r["ms"]["p99"]
    for p in eb.PRECISIONS:
        eng = _row(data, "tensorrt", p)["engine"]
        assert eng["role"].startswith(f"trt_{p}_") and eng["built_here"] is True
    h = data["headline"]
    assert h["fp16_p99_target"]["status"] in ("met", "not met")
    assert h["int8_vs_fp16"]["status"] in ("int8 no slower", "int8 slower")
    assert data["device"]["gpu"] == FACTS.gpu and data["device"]["slug"] != "cpu"
