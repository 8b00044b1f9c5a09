"""End to end: good images -> `export-engine fit` -> bundle -> onnxruntime finds painted defects."""

from __future__ import annotations

import hashlib
import inspect
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from linecam.bundle import load_bundle, sha256_file
from linecam.preprocess import Preprocessor, read_image

pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from linecam.export.cli import main  # noqa: E402

SIZE = 128


def _texture(rng: np.random.Generator) -> np.ndarray:
    """A woven-looking periodic texture with random phase and sensor noise (RGB uint8)."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    px, py = rng.uniform(0, 2 * np.pi, 2)
    g = 120 + 35 * np.sin(2 * np.pi * xx / 16 + px) * np.sin(2 * np.pi * yy / 16 + py)
    g = g + rng.normal(0, 6, (SIZE, SIZE))
    return np.clip(np.stack([g, g * 0.9 + 10, g * 0.8 + 20], 2), 0, 255).astype(np.uint8)


def _paint_defect(rng: np.random.Generator, img: np.ndarray, kind: str) -> np.ndarray:
    """Defects unlike the training recipes: a drawn dark blob, a drawn bright scratch."""
    out = img.copy()
    if kind == "blob":
        c = tuple(int(v) for v in rng.integers(20, SIZE - 20, 2))
        cv2.circle(out, c, int(rng.integers(4, 8)), (30, 30, 30), -1, cv2.LINE_AA)
    else:
        p = [int(v) for v in rng.integers(12, SIZE - 12, 4)]
        while abs(p[0] - p[2]) + abs(p[1] - p[3]) < 30:
            p = [int(v) for v in rng.integers(12, SIZE - 12, 4)]
        cv2.line(out, (p[0], p[1]), (p[2], p[3]), (235, 235, 235), 2, cv2.LINE_AA)
    return out


def _write(folder: Path, n: int, seed: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        cv2.imwrite(str(folder / f"good_{i:03d}.png"), cv2.cvtColor(_texture(rng), cv2.COLOR_RGB2BGR))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("scratch")
    images, out = root / "good", root / "bundle"
    _write(images, 40, seed=1)
    rc = main(["fit", "--images", str(images), "--out", str(out), "--size", str(SIZE), "--steps", "300",
               "--batch-size", "8", "--base-width", "8", "--seed", "0", "--holdout", "0.25",
               # One thread: on a shared CI CPU, oversubscribed threads are several times slower.
               "--threads", "1", "--quiet"])
    assert rc == 0
    return images, out


def _scores(bundle_dir: Path, images: list[np.ndarray]) -> np.ndarray:
    b = load_bundle(bundle_dir)
    sess = ort.InferenceSession(str(b.path("onnx_fp32")), providers=["CPUExecutionProvider"])
    pre = Preprocessor(b.manifest.preprocess)
    name = b.manifest.input.name
    return np.array([float(sess.run([b.manifest.outputs.image_score.name], {name: pre(im)})[0][0])
                     for im in images])


@pytest.mark.slow
def test_fitted_expert_finds_painted_defects(fitted: tuple[Path, Path]) -> None:
    images, out = fitted
    m = load_bundle(out).manifest
    rng = np.random.default_rng(1234)  # a different stream from the training images
    held_out = [read_image(images / f)[0] for f in m.provenance.details["holdout_files"]]
    fresh = [_texture(rng) for _ in range(20)]
    good = np.concatenate([_scores(out, held_out), _scores(out, fresh)])
    bad_imgs = [_paint_defect(rng, _texture(rng), "blob" if i % 2 else "scratch") for i in range(20)]
    bad = _scores(out, bad_imgs)

    t = m.thresholds.image
    auroc = float(np.mean(bad[:, None] > good[None, :]) + 0.5 * np.mean(bad[:, None] == good[None, :]))
    assert auroc >= 0.9, (auroc, good, bad)
    assert np.mean(bad >= t) >= 0.9, (t, bad)
    assert np.mean(good < t) >= 0.8, (t, good)


@pytest.mark.slow
def test_manifest_is_consistent(fitted: tuple[Path, Path]) -> None:
    images, out = fitted
    b = load_bundle(out)  # verifies the schema and every file's sha256
    m = b.manifest
    assert m.kind == "region_expert" and m.name == "bundle"
    assert m.files["onnx_fp32"].sha256 == sha256_file(out / "model.onnx")
    assert m.input.shape == [1, 3, SIZE, SIZE] and m.input.name == "image"
    assert tuple(m.preprocess.input_size) == (SIZE, SIZE)
    assert m.outputs.anomaly_map.shape == [1, 1, SIZE, SIZE] and m.outputs.image_score.shape == [1]

    # The ONNX graph has exactly the declared interface.
    sess = ort.InferenceSession(str(b.path("onnx_fp32")), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape) for i in sess.get_inputs()] == [("image", [1, 3, SIZE, SIZE])]
    assert {o.name: o.shape for o in sess.get_outputs()} == {"anomaly_map": [1, 1, SIZE, SIZE], "score": [1]}

    # Source hash: sha256 over the sorted per-image sha256s of every image used.
    files = sorted(images.glob("*.png"))
    digests = sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in files)
    assert m.provenance.source_sha256 == hashlib.sha256("\n".join(digests).encode()).hexdigest()
    d = m.provenance.details
    assert d["n_train"] + d["n_holdout"] == 40 and d["n_holdout"] == 10
    assert d["seed"] == 0 and d["steps"] == 300 and np.isfinite(d["final_loss"])
    assert {"torch", "onnx", "onnxruntime"} <= set(m.provenance.tool_versions)

    # Thresholds were fitted on the held-out good images run through the *exported* model:
    # recompute them from onnxruntime scores (10 < 1/0.01 images: max good x 3).
    th = m.thresholds
    assert th.n_good == 10 and th.target_frr == 0.01 and th.method == "good_max_margin"
    s = _scores(out, [read_image(images / f)[0] for f in d["holdout_files"]])
    assert th.image == pytest.approx(3 * s.max(), rel=1e-5, abs=1e-7)
    assert th.details["image"]["frr_upper_bound"] == pytest.approx(1 - 0.05 ** (1 / 10))
    assert th.image <= th.pixel <= 0.5  # pixel maxima >= pooled maxima; capped at the net's 0.5
    train = json.loads((out / "training.json").read_text())
    assert len(train["losses"]) == 300 and sorted(train["holdout_scores"]) == sorted(d["holdout_files"])


def test_cli_too_few_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write(tmp_path / "few", 5, seed=0)
    (tmp_path / "few" / "notes.png").write_text("not an image")  # unreadable: skipped, not counted
    rc = main(["fit", "--images", str(tmp_path / "few"), "--out", str(tmp_path / "b"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 3  # BundleError.exit_code
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "5 readable image" in err and "at least 10" in err
    assert not (tmp_path / "b" / "manifest.json").exists()


def test_cli_usage_error_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fit", "--images", str(tmp_path), "--out", str(tmp_path / "b"), "--size", "12y"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--size" in err and err.count("\n") == 1
    assert main(["fit", "--out", str(tmp_path / "b")]) == 2


def test_cli_defaults_match_the_library() -> None:
    from linecam.export.cli import fit
    from linecam.export.scratch import fit_scratch_expert

    lib = inspect.signature(fit_scratch_expert).parameters
    opts = {p.name: p.default for p in fit.params}
    assert opts["size"] == "256" and lib["input_size"].default == (256, 256)
    for name in ("steps", "batch_size", "lr", "base_width", "seed", "holdout", "target_frr", "sensitivity",
                 "threads"):
        assert opts[name] == lib[name].default, name


def test_export_package_imports_without_torch() -> None:
    code = ("import sys, linecam.export, linecam.export.cli, linecam.export.anomalies, linecam.calibration; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr
