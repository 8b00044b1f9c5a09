"""``linecam evaluate`` on a tiny generated MVTec-AD-layout dataset with hand-built ONNX bundles.

The bundles' model is "darkness" (tests/bundles.py): dark blobs and scratches on a bright
texture are what it sees, so it is a meaningful expert here (image AUROC 1) and a dataset
whose masks are moved away from the defects must score a low AU-PRO. The parity test runs
the real daemon on the same images through a real mosquitto and compares published scores.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from bundles import MEAN, STD, darkness_model, make_tiny_bundle
from linecam.bundle import Manifest, OutputsSpec, TensorSpec, Thresholds, file_entry, load_bundle, \
    new_provenance, write_manifest
from linecam.errors import BundleError, LinecamError
from linecam.evaluate import DatasetError, ImageRecord, evaluate_bundle, mask_to_map, worst_cases
from linecam.preprocess import CropSpec, Preprocessor, PreprocessSpec

SIZE = 64
DEFECTS = ("scratch", "spot")


# --------------------------------------------------------------------------- data


def _texture(rng: np.random.Generator, h: int = SIZE, w: int = SIZE) -> np.ndarray:
    """A smooth bright RGB texture (uint8), different per image."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    p = rng.uniform(0, 2 * np.pi, 2)
    base = 190 + 22 * np.sin(xx / 5.0 + p[0]) * np.cos(yy / 7.0 + p[1]) + rng.normal(0, 3, (h, w))
    rgb = np.stack([base + 6, base, base - 6], axis=2)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _defect(rng: np.random.Generator, kind: str, h: int = SIZE, w: int = SIZE) -> np.ndarray:
    """A uint8 mask (255 = defect) of a dark spot or a short scratch inside [14, 50)."""
    mask = np.zeros((h, w), np.uint8)
    if kind == "spot":
        cx, cy = (int(v) for v in rng.integers(18, 46, 2))
        cv2.circle(mask, (cx, cy), int(rng.integers(4, 7)), 255, -1)
    else:
        x0, y0 = (int(v) for v in rng.integers(14, 26, 2))
        x1, y1 = x0 + int(rng.integers(12, 24)), y0 + int(rng.integers(-4, 24))
        cv2.line(mask, (x0, y0), (x1, min(max(y1, 14), 49)), 255, 3)
    return mask


def _write_rgb(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def make_dataset(root: Path, n_good: int = 6, n_bad: int = 4, seed: int = 0,
                 mask_shift: tuple[int, int] | None = None) -> Path:
    """An MVTec AD category: train/good, test/good, test/<defect>, ground_truth/<defect>/*_mask.png.
    ``mask_shift`` moves every mask (np.roll) away from its defect."""
    rng = np.random.default_rng(seed)
    for i in range(2):
        _write_rgb(root / "train" / "good" / f"{i:03d}.png", _texture(rng))
    for i in range(n_good):
        _write_rgb(root / "test" / "good" / f"{i:03d}.png", _texture(rng))
    for kind in DEFECTS:
        for i in range(n_bad):
            img = _texture(rng)
            mask = _defect(rng, kind)
            img[mask > 0] = (38, 34, 30)
            _write_rgb(root / "test" / kind / f"{i:03d}.png", img)
            if mask_shift is not None:
                mask = np.roll(mask, mask_shift, axis=(0, 1))
            (root / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
            assert cv2.imwrite(str(root / "ground_truth" / kind / f"{i:03d}_mask.png"), mask)
    return root


def make_cropped_bundle(root: Path, image_threshold: float = 0.5) -> Path:
    """The darkness model behind a crop and a non-square resize (linear): 56x48 of the
    64x64 frame at (4, 6) -> 48x32 model input."""
    h, w = 32, 48
    root.mkdir(parents=True, exist_ok=True)
    onnx.save(darkness_model(h, w), str(root / "model.onnx"))
    spec = PreprocessSpec(input_size=(h, w), interpolation="linear",
                          crop=CropSpec(top=6, left=4, height=48, width=56), mean=MEAN, std=STD)
    manifest = Manifest(
        name="tiny-darkness-crop",
        input=TensorSpec(name="image", shape=[1, 3, h, w], layout="NCHW"),
        preprocess=spec,
        outputs=OutputsSpec(anomaly_map=TensorSpec(name="anomaly_map", shape=[1, 1, h, w]),
                            image_score=TensorSpec(name="score_out", shape=[1])),
        thresholds=Thresholds(image=image_threshold, pixel=0.5, method="manual"),
        files={"onnx_fp32": file_entry(root, "model.onnx")},
        provenance=new_provenance(details={"purpose": "tests"}),
    )
    write_manifest(root, manifest)
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("mvtec") / "widget")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("b") / "tiny", size=SIZE, image_threshold=0.5)


@pytest.fixture(scope="module")
def cropped(tmp_path_factory) -> Path:
    return make_cropped_bundle(tmp_path_factory.mktemp("b") / "crop")


# --------------------------------------------------------------------------- metrics


def test_a_meaningful_expert_scores_high(bundle, data):
    rep = evaluate_bundle(bundle, data, progress=False)
    m = rep.metrics
    assert (m.n_images, m.n_good, m.n_bad) == (14, 6, 8)
    assert m.image_auroc == 1.0
    assert m.pixel_auroc > 0.97 and m.aupro > 0.9, m
    assert m.f1 == 1.0 and m.false_reject_rate == 0.0 and m.miss_rate == 0.0
    assert m["aupro"] == m.aupro and m["n_bad"] == 8  # the report.json keys work too
    with pytest.raises(KeyError):
        m["nope"]
    assert set(rep.per_defect) == set(DEFECTS)
    for d in DEFECTS:
        pd = rep.per_defect[d]
        assert (pd.n_good, pd.n_bad) == (6, 4) and pd.image_auroc == 1.0 and pd.aupro > 0.85
    assert rep.backend == "onnxruntime" and rep.role == "onnx_fp32"
    assert rep.model_sha256 == load_bundle(bundle).model_sha256
    assert rep.image_size == (SIZE, SIZE) and rep.map_size == (SIZE, SIZE)
    assert [r.path for r in rep.images[:2]] == ["test/good/000.png", "test/good/001.png"]
    for r in rep.images:
        assert r.score == pytest.approx(r.score_raw / 0.5)
        assert r.verdict == ("NG" if r.score_raw >= 0.5 else "OK")
        assert (r.defect_px > 0) == (r.label == 1) and r.label == (r.defect != "good")
    assert rep.out_dir is None and rep.files == []


def test_masks_moved_off_the_defects_give_a_low_aupro(bundle, tmp_path):
    shifted = make_dataset(tmp_path / "widget", mask_shift=(32, 32))
    rep = evaluate_bundle(bundle, shifted, progress=False)
    assert rep.metrics.image_auroc == 1.0  # labels come from the folders: still right
    assert rep.metrics.aupro < 0.3 and rep.metrics.pixel_auroc < 0.7, rep.metrics


def test_thresholds_decide_f1_frr_and_miss_rate(tmp_path, data):
    # a threshold no defect reaches: everything passes, every defect is missed
    high = make_tiny_bundle(tmp_path / "high", size=SIZE, image_threshold=5.0)
    m = evaluate_bundle(high, data, progress=False).metrics
    assert (m.tp, m.fp, m.fn) == (0, 0, 8) and m.miss_rate == 1.0 and m.f1 == 0.0
    assert m.image_auroc == 1.0  # the ranking does not depend on the threshold
    # a threshold every image reaches: every good part is rejected
    low = make_tiny_bundle(tmp_path / "low", size=SIZE, image_threshold=0.0001)
    m = evaluate_bundle(low, data, progress=False).metrics
    assert m.false_reject_rate == 1.0 and m.miss_rate == 0.0 and m.f1 == pytest.approx(16 / 22)


def test_masks_follow_the_crop_and_resize():
    pre = Preprocessor(PreprocessSpec(input_size=(4, 4), crop=CropSpec(top=2, left=4, height=8, width=8)))
    mask = np.zeros((12, 16), bool)
    mask[2:4, 4:6] = True  # crop (0..1, 0..1): exactly map pixel (0, 0)
    mask[6, 8] = True  # crop (4, 4): a quarter of map pixel (2, 2): not enough
    mask[0:2, :] = True  # above the crop: gone
    got = mask_to_map(mask, pre, (4, 4))
    want = np.zeros((4, 4), bool)
    want[0, 0] = True
    np.testing.assert_array_equal(got, want)
    mask[7, 9] = mask[6, 9] = True  # now 3 of map pixel (2, 2)'s 4 source pixels
    assert mask_to_map(mask, pre, (4, 4))[2, 2]


def test_worst_cases_pick_high_good_and_low_bad():
    def rec(label: int, s: float | None) -> ImageRecord:
        return ImageRecord("x", "good" if label == 0 else "d", label, s, s, None, 0)

    recs = [rec(0, 0.1), rec(0, 0.9), rec(0, 0.5), rec(1, 0.2), rec(1, 0.8), rec(0, None), rec(1, None)]
    assert worst_cases(recs, 4) == [1, 2, 3, 4]
    assert worst_cases(recs, 3) == [1, 2, 3]
    assert worst_cases(recs[:4], 4) == [1, 2, 0, 3]  # one defect: good ones fill in
    assert worst_cases(recs, 0) == []


# --------------------------------------------------------------------------- files


def test_report_and_plots(bundle, data, tmp_path):
    out = tmp_path / "out"
    rep = evaluate_bundle(bundle, data, out, worst=4, progress=False)
    doc = json.loads((out / "report.json").read_text())
    assert rep.report_path == out / "report.json"
    assert doc["bundle"]["name"] == "tiny-darkness" and doc["bundle"]["model_sha256"] == rep.model_sha256
    assert doc["backend"]["name"] == "onnxruntime" and doc["backend"]["role"] == "onnx_fp32"
    assert doc["dataset"]["path"] == str(data) and doc["dataset"]["n_good"] == 6
    assert doc["metrics"]["image_auroc"] == 1.0 and doc["metrics"]["aupro"] == pytest.approx(rep.metrics.aupro)
    assert set(doc["per_defect"]) == set(DEFECTS)
    assert len(doc["images"]) == 14
    first = doc["images"][0]
    assert set(first) >= {"path", "defect", "label", "score_raw", "score"}
    assert first["score"] == pytest.approx(first["score_raw"] / doc["bundle"]["thresholds"]["image"])
    worst = sorted(p.name for p in out.glob("worst_*.png"))
    assert len(worst) == 4
    assert worst[0].startswith("worst_01_good_") and worst[-1].startswith("worst_04_")
    assert sorted(doc["files"]) == sorted(["roc.png", "scores_hist.png", *worst])
    for name in doc["files"]:
        img = cv2.imread(str(out / name))
        assert img is not None and img.shape[0] > 100, name


def test_without_matplotlib_the_json_is_still_written(bundle, data, tmp_path, monkeypatch, caplog):
    for name in [k for k in sys.modules if k == "matplotlib" or k.startswith("matplotlib.")] + \
            ["matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"]:
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="linecam.evaluate"):
        rep = evaluate_bundle(bundle, data, out, progress=False)
    assert (out / "report.json").is_file() and not list(out.glob("*.png")) and rep.files == []
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "pip install linecam[plots]" in warnings[0]


# --------------------------------------------------------------------------- one-line errors


def _break(kind: str, root: Path) -> None:
    if kind == "missing_mask":
        (root / "ground_truth" / "spot" / "001_mask.png").unlink()
    elif kind == "mask_size":
        cv2.imwrite(str(root / "ground_truth" / "spot" / "000_mask.png"), np.zeros((32, 32), np.uint8))
    elif kind == "image_size":
        _write_rgb(root / "test" / "spot" / "002.png", np.full((SIZE, 60, 3), 200, np.uint8))
    elif kind == "no_test":
        shutil.rmtree(root / "test")
    elif kind == "no_images":
        for p in (root / "test").rglob("*.png"):
            p.unlink()


@pytest.mark.parametrize("kind, pattern", [
    ("missing_mask", r"defect image test/spot/001\.png has no mask: expected ground_truth/spot/001_mask\.png"),
    ("mask_size", r"mask ground_truth/spot/000_mask\.png is 32x32 but its image test/spot/000\.png is 64x64"),
    ("image_size", r"image test/spot/002\.png is 60x64 but test/good/000\.png is 64x64.*resize or remove it"),
    ("no_test", r"has no test/ folder: an MVTec AD category has test/good"),
    ("no_images", r"has no images"),
])
def test_bad_datasets_get_one_line(bundle, tmp_path, kind, pattern):
    root = make_dataset(tmp_path / "widget", n_good=3, n_bad=3)
    _break(kind, root)
    with pytest.raises(DatasetError, match=pattern) as e:
        evaluate_bundle(bundle, root, tmp_path / "out", progress=False)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out" / "report.json").exists()


def test_missing_dataset_and_mvtec_root(bundle, tmp_path):
    with pytest.raises(DatasetError, match="does not exist: point --data at one MVTec AD category"):
        evaluate_bundle(bundle, tmp_path / "nope", progress=False)
    make_dataset(tmp_path / "mvtec" / "widget", n_good=1, n_bad=1)
    with pytest.raises(DatasetError, match=r"holds categories \(widget\): point --data at one of them"):
        evaluate_bundle(bundle, tmp_path / "mvtec", progress=False)


def test_bundle_errors(data, tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        evaluate_bundle(tmp_path / "no-bundle", data, progress=False)
    b = make_tiny_bundle(tmp_path / "b", size=SIZE)
    with pytest.raises(BundleError, match="no onnxruntime/int8 model"):
        evaluate_bundle(b, data, precision="int8", progress=False)
    with pytest.raises(LinecamError, match="unknown backend"):
        evaluate_bundle(b, data, backend="openvino", progress=False)
    zero = make_tiny_bundle(tmp_path / "zero", size=SIZE, image_threshold=0.0)
    with pytest.raises(BundleError, match="cannot be run on the line: thresholds must be positive"):
        evaluate_bundle(zero, data, progress=False)
    (b / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(BundleError, match="fails its sha256 check") as e:
        evaluate_bundle(b, data, progress=False)
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- command line


def test_cli_prints_the_table_and_where_the_report_is(bundle, data, tmp_path):
    from linecam.cli import cli

    out = tmp_path / "eval"
    res = CliRunner().invoke(cli, ["evaluate", "--bundle", str(bundle), "--data", str(data), "--out", str(out),
                                   "--worst", "0", "--threads", "1", "-q"])
    assert res.exit_code == 0, res.output
    assert "img AUROC" in res.output and "AU-PRO" in res.output and "spot" in res.output
    assert f"report: {out / 'report.json'}" in res.output
    assert json.loads((out / "report.json").read_text())["metrics"]["image_auroc"] == 1.0


def test_cli_error_is_one_line_with_exit_code(bundle, tmp_path):
    from linecam.cli import cli

    res = CliRunner().invoke(cli, ["evaluate", "--bundle", str(bundle), "--data", str(tmp_path / "nope"), "-q"])
    assert res.exit_code == 1
    assert res.stderr.strip().splitlines() == [res.stderr.strip()]
    assert res.stderr.startswith("error: dataset folder ") and "does not exist" in res.stderr
    res = CliRunner().invoke(cli, ["evaluate", "--bundle", str(tmp_path / "nob"), "--data", str(tmp_path), "-q"])
    assert res.exit_code == 3 and res.stderr.startswith("error: bundle folder ")


def test_evaluates_with_torch_blocked(bundle, data):
    from helpers import BLOCK_TORCH

    code = BLOCK_TORCH + (
        "from linecam.evaluate import evaluate_bundle\n"
        f"rep = evaluate_bundle({str(bundle)!r}, {str(data)!r}, progress=False)\n"
        "assert 'torch' not in sys.modules\n"
        "print(rep.metrics.image_auroc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "1.0"


# --------------------------------------------------------------------------- parity with the daemon


def test_daemon_publishes_the_same_raw_scores(cropped, data, broker, tmp_path):
    """The line daemon on a replay of the test images, through a real mosquitto: its published
    score_raw equals evaluate's for every image (bundle with a crop and a non-square resize)."""
    from linecam.config import parse_config
    from linecam.events import subscribe
    from linecam.runtime.service import run_service

    rep = evaluate_bundle(cropped, data, progress=False)
    assert rep.map_size == (48, 32)
    replay = tmp_path / "replay"
    replay.mkdir()
    for i, r in enumerate(rep.images):  # the replay source reads a folder in sorted-name order
        shutil.copy(data / r.path, replay / f"{i:03d}_{r.defect}_{Path(r.path).name}")
    cfg = parse_config({
        "line": "t", "camera_id": "ev",
        "camera": {"kind": "replay", "path": str(replay)},
        "model": {"bundle": str(cropped)},
        "mqtt": {"host": "127.0.0.1", "port": broker.port},
        "runtime": {"queue_size": 64},
        "output": {"snapshots_dir": str(tmp_path / "snaps")},
        "spool": {"path": str(tmp_path / "spool.db")},
    }, tmp_path / "line.yaml")
    verdicts: dict[int, dict] = {}
    with subscribe("127.0.0.1", broker.port, prefix="linecam/t/ev", types=("verdict",)) as sub:
        summary = run_service(cfg)
        deadline = time.monotonic() + 10.0
        while len(verdicts) < len(rep.images) and time.monotonic() < deadline:
            ev = sub.poll(timeout=0.2)
            if ev is not None:
                verdicts[ev.payload["frame_id"]] = ev.payload
    assert summary.counters["frames"] == len(rep.images)
    assert sorted(verdicts) == list(range(len(rep.images)))
    for i, r in enumerate(rep.images):
        v = verdicts[i]
        assert v["verdict"] == r.verdict, (r.path, v)
        assert abs(v["score_raw"] - r.score_raw) <= 1e-6, (r.path, v["score_raw"], r.score_raw)
        assert v["score"] == pytest.approx(r.score, abs=1e-6) and v["threshold"] == rep.image_threshold
        assert v["model"]["sha256"] == rep.model_sha256 and v["model"]["file"] == rep.role
    # The crop matters: without it the same images score differently, so agreement means something.
    import onnxruntime as ort

    no_crop = Preprocessor(load_bundle(cropped).manifest.preprocess.model_copy(update={"crop": None}))
    sess = ort.InferenceSession(str(cropped / "model.onnx"), providers=["CPUExecutionProvider"])
    from linecam.preprocess import read_image

    diffs = [abs(float(sess.run(["score_out"], {"image": no_crop(*read_image(data / r.path))})[0][0]) - r.score_raw)
             for r in rep.images]
    assert max(diffs) > 1e-3


def test_images_of_another_shape_than_the_bundle_get_a_size_warning(bundle, data, tmp_path, caplog):
    """Test images twice as wide as high on a square bundle are stretched 2x: evaluate still
    measures them (it is legal) but asks whether this is the bundle's dataset; square ones: silent."""
    rng = np.random.default_rng(5)
    wide = tmp_path / "wide"
    for i in range(3):
        _write_rgb(wide / "test" / "good" / f"{i:03d}.png", _texture(rng, SIZE, 2 * SIZE))
    img = _texture(rng, SIZE, 2 * SIZE)
    mask = np.zeros((SIZE, 2 * SIZE), np.uint8)
    mask[10:20, 30:50] = 255
    img[mask > 0] = (38, 34, 30)
    _write_rgb(wide / "test" / "dark" / "000.png", img)
    (wide / "ground_truth" / "dark").mkdir(parents=True)
    assert cv2.imwrite(str(wide / "ground_truth" / "dark" / "000_mask.png"), mask)
    with caplog.at_level("WARNING", logger="linecam.evaluate"):
        rep = evaluate_bundle(bundle, wide, progress=False)
        square = len(caplog.records)
        evaluate_bundle(bundle, data, progress=False)
    assert rep.metrics.n_images == 4
    (line,) = [r.getMessage() for r in caplog.records[:square] if r.getMessage().startswith("SIZE:")]
    assert f"{2 * SIZE}x{SIZE}" in line and f"input is {SIZE}x{SIZE}" in line and "made for" in line
    assert not [r for r in caplog.records[square:] if r.getMessage().startswith("SIZE:")]
