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


def _threshold_inputs(images: Path, m: object) -> np.ndarray:
    """The preprocessed good images ``fit`` fitted the bundle's thresholds on (eval_set)."""
    from linecam.export.eval_set import EVAL_GOOD, eval_set
    from linecam.export.images import list_images

    d = m.provenance.details  # type: ignore[attr-defined]
    hold = [s for s in list_images(images) if s.path.name in d["holdout_files"]]
    return eval_set(hold, m.preprocess, d["seed"], EVAL_GOOD, 0).x  # type: ignore[attr-defined]


def _scores_x(bundle_dir: Path, x: np.ndarray) -> np.ndarray:
    b = load_bundle(bundle_dir)
    sess = ort.InferenceSession(str(b.path("onnx_fp32")), providers=["CPUExecutionProvider"])
    name, score = b.manifest.input.name, b.manifest.outputs.image_score.name
    return np.array([float(sess.run([score], {name: x[i:i + 1]})[0][0]) for i in range(len(x))])


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

    # Thresholds were fitted on the 10 held-out good images and 54 jittered copies of them, run
    # through the *exported* model: recompute them from onnxruntime scores (64 < 1/0.01 images:
    # lowest + 3 x (max - lowest), or the isolated-score rule).
    from linecam.calibration.thresholds import fit_image_threshold

    th = m.thresholds
    assert th.n_good == 64 and th.target_frr == 0.01 and th.method == "good_max_margin"
    s = _scores_x(out, _threshold_inputs(images, m))
    held = _scores(out, [read_image(images / f)[0] for f in d["holdout_files"]])
    np.testing.assert_allclose(s[:10], held, rtol=1e-5, atol=1e-6)  # the originals come first
    assert th.image == pytest.approx(fit_image_threshold(s).value, rel=1e-5, abs=1e-7) and th.image > s.max()
    # ... and it says loudly that 10 distinct images cannot show 1 %: the bound over those alone.
    w = th.details["warning"]
    assert "10 held out + 54 augmented" in w and "299 good images" in w
    assert f"{1 - 0.05 ** (1 / 10):.1%} (95% confidence, over the 10 distinct images" in w
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


# --------------------------------------------------------------------------- issue 21: scores saturate


def test_exported_map_keeps_growing_with_the_logits() -> None:
    """The map is strictly increasing and unbounded in the logits (a sigmoid map is 1.0 at both 20
    and 40), and below the decision boundary it is the old sigmoid map exactly."""
    import torch

    from linecam.export.scratch import PIXEL_THRESHOLD_CAP, expert_map

    z = torch.tensor([-30.0, -8.0, -1.0, -1e-3, 0.0, 1e-3, 1.0, 8.0, 20.0, 40.0])
    m = expert_map(z)
    assert torch.all(m[1:] > m[:-1]), m
    assert float(m[-1]) > 40.0
    assert torch.equal(m[:4], torch.sigmoid(z[:4]))
    assert float(m[4]) == PIXEL_THRESHOLD_CAP  # the cap is the map at the decision boundary


def test_the_probability_behind_a_scratch_map_is_recovered() -> None:
    import torch

    from linecam.export.scratch import expert_map
    from linecam.export.teachers import sigmoid_of_scratch_map

    z = torch.linspace(-20, 60, 20001)
    got = sigmoid_of_scratch_map(expert_map(z).numpy())
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, torch.sigmoid(z).numpy(), atol=1e-7)


def _constant_logit_expert(logit: float):
    """A tiny untrained ScratchExpert whose logits are ``logit`` at every pixel."""
    import torch

    from linecam.export.scratch import ScratchExpert

    model = ScratchExpert(base_width=4, score_pool=3).eval()
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.fill_(logit)
    return model


def test_exported_score_grows_with_the_logits_through_onnxruntime(tmp_path: Path) -> None:
    """Through the exported graph as the daemon runs it: a stronger response gives a larger raw score
    and a larger published (normalised) score; none of them stops at the sigmoid's 1.0."""
    from linecam.export.onnx_export import export_onnx
    from linecam.runtime.postprocess import Postprocessor

    threshold = 0.05  # a fitted image threshold's order of magnitude
    scores = []
    for i, logit in enumerate((-6.0, 2.0, 10.0, 30.0)):
        path = export_onnx(_constant_logit_expert(logit), tmp_path / f"m{i}.onnx", (32, 32))
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        amap, score = sess.run(None, {"image": np.zeros((1, 3, 32, 32), np.float32)})
        assert float(amap.max()) == pytest.approx(1 / (1 + np.exp(-logit)) + max(0.0, logit), rel=1e-5)
        scores.append(float(score[0]))
    published = np.array(scores) / threshold  # the outbox's score = score_raw / threshold
    assert np.all(np.diff(published) > 0), published
    assert scores[-1] > 2 * scores[-2] > 2.0, scores  # logit 30 vs 10: not one saturated value
    post = Postprocessor(pixel_threshold=0.5, image_threshold=threshold)
    assert [post.verdict(s) for s in scores] == ["OK", "NG", "NG", "NG"]


def _inspector(bundle_dir: Path):
    from linecam.runtime.backends import make_runner
    from linecam.runtime.inspector import Inspector

    b = load_bundle(bundle_dir)
    return Inspector(b, make_runner(b, "onnxruntime", intra_op_threads=1), regions_always=True)


def _blobs(rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray]]:
    """One good texture and the same texture with a dark blob at one place, ever larger and darker."""
    good = _texture(rng)
    bad = []
    for radius, grey in ((3, 90), (6, 50), (11, 15)):
        img = good.copy()
        cv2.circle(img, (SIZE // 2, SIZE // 2), radius, (grey, grey, grey), -1, cv2.LINE_AA)
        bad.append(img)
    return good, bad


@pytest.mark.slow
def test_published_score_ranks_defects_by_strength(fitted: tuple[Path, Path]) -> None:
    """Issue 21: on the daemon's path (Inspector, score published as raw / threshold) a stronger
    defect on the same part publishes a strictly larger score and region score, and the strongest
    goes past 1.0 raw, where the sigmoid map stopped (every defect published 1 / threshold)."""
    _, out = fitted
    ins = _inspector(out)
    thr = load_bundle(out).manifest.thresholds
    assert load_bundle(out).manifest.extra["map_scale"] == "sigmoid+relu_logit"
    for seed in (5, 6):
        good, bad = _blobs(np.random.default_rng(seed))
        runs = [ins.inspect(img) for img in [good, *bad]]
        published = [r.score_raw / thr.image for r in runs]
        region = [max((x.max_score for x in r.regions), default=0.0) / thr.pixel for r in runs]
        # The faintest blob may pass (it is below the threshold); the other two are defects.
        assert runs[0].verdict == "OK" and [r.verdict for r in runs[2:]] == ["NG"] * 2, published
        assert np.all(np.diff(published) > 0), published
        assert np.all(np.diff(region[1:]) > 0), region
        assert runs[-1].score_raw > 1.0 and published[-1] > 1.5 * published[-2], published


@pytest.mark.slow
def test_a_sigmoid_bundle_from_before_issue_21_still_loads_and_gives_the_same_verdicts(
        fitted: tuple[Path, Path], tmp_path: Path) -> None:
    """A bundle exported before the change (sigmoid map, thresholds fitted on it, no map_scale in its
    manifest) runs as it did: same thresholds where good pixels stay below logit 0, same verdicts."""
    import shutil

    import onnx

    from linecam.bundle import file_entry, write_manifest
    from linecam.calibration.thresholds import fit_image_threshold, fit_pixel_threshold, to_thresholds
    from linecam.export.gate import run_expert

    images, out = fitted
    old = tmp_path / "old"
    shutil.copytree(out, old)
    model = onnx.load(str(old / "model.onnx"))  # back to the old graph: the map is the sigmoid alone
    producer = {o: n for n in model.graph.node for o in n.output}
    add = producer["anomaly_map"]
    (sig,) = [i for i in add.input if producer[i].op_type == "Sigmoid"]
    add.op_type = "Identity"
    del add.input[:]
    add.input.append(sig)
    onnx.save(model, str(old / "model.onnx"))
    m = load_bundle(out).manifest
    maps, scores = run_expert(old / "model.onnx", _threshold_inputs(images, m))  # the old fit, on the old map
    maps = list(maps)
    assert float(np.max(maps)) <= 1.0
    th = to_thresholds(fit_image_threshold(scores), fit_pixel_threshold(maps))
    th = th.model_copy(update={"pixel": min(th.pixel, 0.5)})
    extra = {k: v for k, v in m.extra.items() if k != "map_scale"} | {"map_range": [0.0, 1.0]}
    write_manifest(old, m.model_copy(update={"thresholds": th, "extra": extra,
                                            "files": {"onnx_fp32": file_entry(old, "model.onnx")}}))
    assert th.image == pytest.approx(m.thresholds.image, rel=1e-6)  # good images: logits below 0

    new_ins, old_ins = _inspector(out), _inspector(old)
    rng = np.random.default_rng(77)
    imgs = [_texture(rng) for _ in range(6)]
    imgs += [_paint_defect(rng, _texture(rng), "blob" if i % 2 else "scratch") for i in range(6)]
    for seed in (5, 6):
        imgs += list(_blobs(np.random.default_rng(seed))[1])
    new_v = [new_ins.inspect(i).verdict for i in imgs]
    old_runs = [old_ins.inspect(i) for i in imgs]
    assert [r.verdict for r in old_runs] == new_v
    assert all(r.score_raw <= 1.0 for r in old_runs)  # the old scale, as it was
    # As a distillation teacher, the new bundle hands the student the probability the old one did
    # (an unbounded target fails the INT8 gate), and the student's provenance says so.
    from linecam.export.teachers import BundleTeacher

    old_t, new_t = BundleTeacher(old, kind="scratch"), BundleTeacher(out, kind="scratch")
    pre = Preprocessor(m.preprocess)
    x = np.stack([pre(i, copy=True)[0] for i in imgs[-8:]])
    assert float(new_ins.inspect(imgs[-1]).anomaly_map.max()) > 1.0  # the converted maps do exceed 0.5
    np.testing.assert_allclose(new_t.maps(x), old_t.maps(x), atol=2e-6)
    assert old_t.describe()["map_scale"] == "sigmoid" and "student_learns" not in old_t.describe()
    assert new_t.describe()["map_scale"] == "sigmoid+relu_logit" and new_t.describe()["student_learns"] == "sigmoid"


@pytest.mark.slow
def test_the_demo_refits_a_cached_scratch_bundle_from_before_issue_21(
        fitted: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    import linecam.camera.synthetic as synthetic
    import linecam.export.scratch as scratch
    from linecam import demo

    work = tmp_path / "demo"
    shutil.copytree(fitted[1], work / "bundle")
    (work / "bundle.key").write_text(demo._fit_key() + "\n")
    fits: list[Path] = []
    monkeypatch.setattr(synthetic, "write_good_images", lambda *a, **k: None)
    monkeypatch.setattr(scratch, "fit_scratch_expert", lambda images, out, **k: fits.append(out))
    assert demo.ensure_demo_bundle(work) == work / "bundle" and fits == []  # current: reused
    manifest = json.loads((work / "bundle" / "manifest.json").read_text())
    del manifest["extra"]["map_scale"]
    (work / "bundle" / "manifest.json").write_text(json.dumps(manifest))
    assert demo.ensure_demo_bundle(work) == work / "bundle" and fits == [work / "bundle"]


def test_augmented_good_copies_never_clip_highlights():
    """A brighter copy of a good image must not clip: a clipped highlight is a texture-less plateau,
    i.e. a defect painted onto a "good" training / threshold image."""
    from linecam.export.sampler import AnomalySampler
    from linecam.preprocess import PreprocessSpec

    rng = np.random.default_rng(0)
    img = rng.integers(150, 251, (64, 64, 3), dtype=np.uint8)  # bright, nothing at full scale
    sampler = AnomalySampler([], PreprocessSpec(input_size=(64, 64)), np.random.default_rng(1), max_gain=0.2)
    outs = [sampler._augment(img, 8) for _ in range(40)]
    # At most the input's brightest pixels (1 % of them are 250) may reach full scale; clipping at
    # gain 1.2 would put every pixel above 212 there (~38 %).
    assert max(float((o == 255).mean()) for o in outs) <= 0.02
    assert max(float(o.mean()) for o in outs) > img.mean() + 1  # brighter copies still happen
    assert min(float(o.mean()) for o in outs) < img.mean() - 5  # and darker ones


def test_fit_warns_when_the_size_stretches_the_images(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Images 96 wide and 64 high, model input 64x64: every frame would be squeezed 1.5x; `fit`
    says so and suggests a size with the images' shape (48x80: about 64x64's pixel count)."""
    from linecam.export.scratch import fit_scratch_expert

    folder = tmp_path / "wide"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(12):
        cv2.imwrite(str(folder / f"{i}.png"), rng.integers(0, 255, (64, 96, 3), dtype=np.uint8))
    with caplog.at_level("WARNING", logger="linecam.export.scratch"):
        fit_scratch_expert(folder, tmp_path / "b", input_size=(64, 64), steps=1, base_width=4, progress=False,
                           threads=1)
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("SIZE:")]
    assert "96x64" in line and "--size 48x80" in line
