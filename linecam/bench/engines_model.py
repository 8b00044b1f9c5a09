"""The engine benchmark's model: a random-weight student bundle (or a given one) and its images."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from linecam.errors import BundleError, LinecamError


class BenchError(LinecamError):
    """Bad command-line input: printed as one ``error:`` line, exit status 2."""

    exit_code = 2


# --------------------------------------------------------------------------- the model


def synthetic_images(folder: Path, n: int, size: int, seed: int = 0) -> Path:
    """``n`` smooth random RGB textures, every other one with a dark blob (scores differ)."""
    import cv2

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        low = rng.uniform(90, 200, (max(2, size // 16), max(2, size // 16), 3)).astype(np.float32)
        img = cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC)
        img += rng.normal(0, 6, img.shape).astype(np.float32)
        if i % 2:
            r = int(rng.integers(size // 16 + 1, size // 6 + 2))
            cy, cx = (int(v) for v in rng.integers(r, size - r, 2))
            cv2.circle(img, (cx, cy), r, (20.0, 20.0, 20.0), -1)
        cv2.imwrite(str(folder / f"synthetic_{i:03d}.png"), np.clip(img, 0, 255).astype(np.uint8))
    return folder


def random_student_bundle(root: Path, size: int, student: str, *, n_images: int, seed: int = 0,
                          log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write a distilled-student bundle with random weights at ``root``: FP32, FP16 and INT8 ONNX,
    as ``export-engine distil`` names and registers them; verification / calibration images in
    ``root.parent / "images"``. Returns what it made (for the results)."""
    import torch

    from linecam.bundle import Thresholds, file_entry, new_provenance, write_manifest
    from linecam.bench.machine import library_versions
    from linecam.export import quantize
    from linecam.export.distil import FP16_FILE, FP32_FILE, INT8_FILE, student_manifest
    from linecam.export.gate import run_expert
    from linecam.export.onnx_export import export_onnx
    from linecam.export.student import make_student
    from linecam.preprocess import PreprocessSpec, Preprocessor, read_image

    spec = PreprocessSpec(input_size=(size, size))
    images = synthetic_images(root.parent / "images", n_images, size, seed)
    pre = Preprocessor(spec)
    x = np.concatenate([pre(*read_image(p), copy=True) for p in sorted(images.glob("*.png"))])
    torch.manual_seed(seed)
    model = make_student(student).eval()
    with torch.no_grad():
        # Activations of O(1) through the depth, as in a trained network (torch's default init shrinks
        # them layer by layer), and the head centred on these images: else ReLU clamps the map to zeros.
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        model.head.bias -= model.raw(torch.from_numpy(x)).median()
    log(f"random-weight student '{student}' at {size}x{size}: exporting FP32, FP16 and INT8 ONNX")
    root.mkdir(parents=True, exist_ok=True)
    fp32 = export_onnx(model, root / FP32_FILE, (size, size), seed=seed)
    quantize.to_fp16(fp32, root / FP16_FILE)
    q = quantize.to_int8(fp32, root / INT8_FILE, quantize.calibration_batch(x, spec))
    # Thresholds from the FP32 model on the synthetic images: TensorRT's verification measures
    # its tolerances against them (a random model has no meaningful ones of its own).
    maps, scores = run_expert(fp32, x, threads=1)
    pixel = float(np.quantile(maps, 0.99))
    thresholds = Thresholds(image=float(np.median(scores)) or 1.0, pixel=pixel if pixel > 0 else 1.0,
                            method="manual", details={"note": "random-weight benchmark model: median score and "
                                                              "99th-percentile pixel of the FP32 model on the "
                                                              "synthetic images"})
    files = {"onnx_fp32": file_entry(root, FP32_FILE), "onnx_fp16": file_entry(root, FP16_FILE, precision="fp16"),
             "onnx_int8": file_entry(root, INT8_FILE, precision="int8")}
    manifest = student_manifest(
        f"engine-bench-student-{student}-{size}", spec, student, model.score_pool, thresholds, files,
        new_provenance(tool_versions={k: v for k, v in library_versions().items() if v},
                       details={"purpose": "linecam bench engines: random weights, speed only",
                                "images": str(images.resolve()),
                                "holdout_files": sorted(p.name for p in images.glob("*.png"))}),
        random_weights=True)
    write_manifest(root, manifest)
    source = ("random-weight student" if student != "lite0"
              else "student 'lite0': ImageNet EfficientNet-Lite0 encoder, random head")
    return {"source": source, "student": student, "bundle": None, "images": str(images),
            "int8": {k: v for k, v in q.to_dict().items() if k != "path"}}


def open_bundle(path: Path, work: Path, size: int | None, log: Callable[[str], None] = print) -> tuple[Any, dict]:
    """Copy ``path`` to ``work`` and load it; an FP16 ONNX missing from it is cast from FP32 in the
    copy (as ``export-engine trt`` does). Raises one-line errors for anything unusable."""
    from linecam.bundle import file_entry, load_bundle, write_manifest

    src = load_bundle(path)  # the bundle's own one-line errors: missing manifest, bad hash ...
    files = src.manifest.files
    if not any(e.backend == "onnxruntime" and e.precision == "fp32" for e in files.values()):
        have = ", ".join(f"{r} ({e.backend}/{e.precision})" for r, e in files.items()) or "none"
        raise BundleError(f"bundle {path} has no FP32 ONNX model (it has: {have}): the benchmark needs the "
                          f"bundle's FP32 ONNX (re-export it with export-engine distil)")
    shape = src.manifest.input.shape
    if len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in shape[2:]):
        raise BundleError(f"bundle {path} declares input shape {shape}: the benchmark needs a fixed [1, 3, H, W]")
    if size is not None and tuple(shape[2:]) != (size, size):
        raise BenchError(f"--size {size} does not match the bundle's input {shape[2]}x{shape[3]}: drop --size "
                         f"with --bundle")
    dst = work / "bundle"
    shutil.copytree(path, dst, symlinks=False)
    bundle = load_bundle(dst)
    info: dict[str, Any] = {"source": "bundle", "bundle": str(Path(path).resolve()),
                            "student": bundle.manifest.extra.get("student_size"), "fp16_derived": False}
    if not any(e.backend == "onnxruntime" and e.precision == "fp16" for e in bundle.manifest.files.values()):
        from linecam.export.quantize import to_fp16

        fp32 = bundle.path(bundle.pick("onnxruntime", "fp32"))
        log("the bundle has no FP16 ONNX: casting its FP32 model to FP16 in the copy (inputs/outputs stay FP32)")
        to_fp16(fp32, dst / "model_fp16.onnx")
        new = dict(bundle.manifest.files)
        new["onnx_fp16"] = file_entry(dst, "model_fp16.onnx", precision="fp16")
        write_manifest(dst, bundle.manifest.model_copy(update={"files": new}))
        bundle = load_bundle(dst)
        info["fp16_derived"] = True
    return bundle, info
