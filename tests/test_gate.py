"""The accuracy gate on hand-built ONNX graphs (no torch, no training): each candidate is the
reference with one known defect, and the gate must name it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

pytest.importorskip("onnxruntime")

from linecam.errors import BundleError  # noqa: E402
from linecam.export.gate import compare  # noqa: E402

SIZE = 32


def darkness_model(path: Path, gain: float = 1.0, offset: float = 0.0, noise: float = 0.0) -> Path:
    """anomaly_map = gain * darkness + offset (+ a fixed noise pattern * noise); score = max of
    the 4x4 mean-pooled map. darkness = 1 - channel mean of the input (inputs in [0, 1])."""
    pattern = np.random.default_rng(5).standard_normal((1, 1, SIZE, SIZE)).astype(np.float32) * noise
    nodes = [
        helper.make_node("ReduceMean", ["image", "axes_c"], ["m"], keepdims=1),
        helper.make_node("Sub", ["one", "m"], ["dark"]),
        helper.make_node("Mul", ["dark", "gain"], ["g"]),
        helper.make_node("Add", ["g", "offset"], ["o"]),
        helper.make_node("Add", ["o", "pattern"], ["anomaly_map"]),
        helper.make_node("AveragePool", ["anomaly_map"], ["pooled"], kernel_shape=[4, 4], strides=[1, 1]),
        helper.make_node("ReduceMax", ["pooled", "axes_all"], ["s"], keepdims=0),
        helper.make_node("Reshape", ["s", "shape1"], ["score"]),
    ]
    inits = [
        helper.make_tensor("axes_c", TensorProto.INT64, [1], [1]),
        helper.make_tensor("axes_all", TensorProto.INT64, [4], [0, 1, 2, 3]),
        helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
        helper.make_tensor("gain", TensorProto.FLOAT, [], [gain]),
        helper.make_tensor("offset", TensorProto.FLOAT, [], [offset]),
        onnx.numpy_helper.from_array(pattern, "pattern"),
        helper.make_tensor("shape1", TensorProto.INT64, [1], [1]),
    ]
    graph = helper.make_graph(
        nodes, "darkness",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, [1, 1, SIZE, SIZE]),
         helper.make_tensor_value_info("score", TensorProto.FLOAT, [1])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def dataset(n: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bright noisy images; odd ones carry a dark disc of random size and depth (mask = the disc)."""
    rng = np.random.default_rng(seed)
    x = np.clip(0.8 + rng.normal(0, 0.03, (n, 3, SIZE, SIZE)), 0, 1).astype(np.float32)
    y = np.arange(n) % 2
    masks = np.zeros((n, SIZE, SIZE), np.float32)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for i in np.flatnonzero(y):
        cy, cx = rng.integers(6, SIZE - 6, 2)
        r = rng.uniform(2, 5)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        x[i, :, disc] -= rng.uniform(0.05, 0.5)
        masks[i] = disc
    return np.clip(x, 0, 1), y, masks


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("gate")
    return {
        "ref": darkness_model(d / "ref.onnx"),
        "same": darkness_model(d / "same.onnx"),
        "slightly_noisy": darkness_model(d / "slightly_noisy.onnx", noise=0.001),
        # Ranking kept (AUROC identical, Pearson 1) but the map's contrast collapsed: the
        # failure of INT8 calibrated on good images only. Only the score bound sees it.
        "collapsed": darkness_model(d / "collapsed.onnx", gain=0.2, offset=0.1),
        "constant": darkness_model(d / "constant.onnx", gain=0.0, offset=0.3),
        "noisy": darkness_model(d / "noisy.onnx", noise=0.3),
    }


def test_identical_and_slightly_noisy_candidates_pass(models: dict[str, Path]) -> None:
    x, y, m = dataset()
    rep = compare(models["ref"], {"same": models["same"], "slightly_noisy": models["slightly_noisy"]}, x, y, m)
    rep.enforce()
    same = rep.candidates["same"]
    assert rep.reference_auroc == pytest.approx(1.0)
    assert same.auroc_drop == 0 and same.pearson == pytest.approx(1.0) and same.map_max_rel_diff == 0
    assert same.pixel_auroc == pytest.approx(rep.reference_pixel_auroc)
    noisy = rep.candidates["slightly_noisy"]
    assert 0.99 < noisy.pearson < 1 and 0 < noisy.map_p99_rel_diff < 0.02
    assert rep.passed and rep.to_dict()["passed"] is True


def test_contrast_collapse_fails_on_scores_although_auroc_and_pearson_hold(models: dict[str, Path]) -> None:
    x, y, m = dataset()
    rep = compare(models["ref"], {"collapsed": models["collapsed"]}, x, y, m)
    c = rep.candidates["collapsed"]
    assert c.auroc_drop == pytest.approx(0.0) and c.pearson == pytest.approx(1.0, abs=1e-6)
    assert c.score_max_rel_diff > 0.3
    with pytest.raises(BundleError) as e:
        rep.enforce()
    msg = str(e.value)
    assert "\n" not in msg and "collapsed" in msg and "scores differ" in msg and "--force" in msg
    # The score bound is configurable like the others.
    assert rep.evaluate(max_score_diff=1.0)


def test_constant_map_fails_map_agreement_not_silently_passes(models: dict[str, Path]) -> None:
    x, y, m = dataset()
    rep = compare(models["ref"], {"constant": models["constant"]}, x, y, m)
    c = rep.candidates["constant"]
    assert c.pearson is None  # NaN is not a number that passes "< bound" checks by accident
    assert c.auroc == pytest.approx(0.5)  # exact ties: a constant score is a coin flip, not 1.0
    v = rep.verdicts()[0]
    assert not v.passed and any("not measurable" in r for r in v.reasons)
    d = rep.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["candidates"]["constant"]["pearson"] is None


def test_enforce_message_names_model_points_and_override(models: dict[str, Path]) -> None:
    x, y, m = dataset()
    rep = compare(models["ref"], {"noisy": models["noisy"], "same": models["same"]}, x, y, m)
    c = rep.candidates["noisy"]
    assert c.auroc_drop > 0.5 and c.pearson < 0.9
    with pytest.raises(BundleError) as e:
        rep.enforce(max_auroc_drop=0.5)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("accuracy gate failed for noisy:")
    assert f"-{c.auroc_drop:.2f} points > 0.5 allowed" in msg
    assert "--max-auroc-drop" in msg and "--force" in msg and "same" not in msg.split(":")[0]
    table = rep.table()
    assert "noisy" in table and "FAIL" in table and "pass" in table


def test_force_logs_a_warning_and_records_it(models: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    x, y, m = dataset()
    rep = compare(models["ref"], {"noisy": models["noisy"]}, x, y, m)
    with caplog.at_level(logging.WARNING, logger="linecam.export.gate"):
        assert rep.enforce(force=True) is rep
    assert rep.forced and "--force" in caplog.text and "noisy" in caplog.text
    d = rep.to_dict()
    assert d["forced"] is True and d["passed"] is False
    assert d["bounds"] == {"max_auroc_drop": 0.5, "min_map_pearson": 0.9, "max_score_diff": 0.1,
                           "max_pixel_auroc_drop": None}


def test_only_good_images_falls_back_to_map_agreement_and_says_so(models: dict[str, Path]) -> None:
    x, y, m = dataset()
    good = y == 0
    rep = compare(models["ref"], {"same": models["same"], "noisy": models["noisy"]}, x[good], y[good])
    assert rep.reference_auroc is None and not rep.auroc_measurable
    assert rep.candidates["same"].auroc is None and rep.candidates["same"].auroc_drop is None
    assert any("image AUROC not measurable" in n for n in rep.notes)
    d = rep.to_dict()
    assert d["basis"].startswith("map and score agreement only")
    assert d["verdicts"]["same"]["passed"] is True
    with pytest.raises(BundleError, match=r"judged on map and score agreement.*noisy: map Pearson"):
        rep.enforce()


def test_small_sets_get_a_resolution_note(models: dict[str, Path]) -> None:
    x, y, m = dataset(12)
    rep = compare(models["ref"], {"same": models["same"]}, x, y)
    assert rep.auroc_step == pytest.approx(100 / 36)
    assert any("one swapped pair moves it" in n for n in rep.to_dict()["notes"])


def test_input_checks(models: dict[str, Path]) -> None:
    x, y, m = dataset(8)
    with pytest.raises(BundleError, match="8 inputs but 7 labels"):
        compare(models["ref"], {"same": models["same"]}, x, y[:7])
    with pytest.raises(BundleError, match=r"masks have shape \[8, 16, 16\], expected \[8, 32, 32\]"):
        compare(models["ref"], {"same": models["same"]}, x, y, m[:, :16, :16])
    with pytest.raises(BundleError, match=r"\[N, 3, H, W\]"):
        compare(models["ref"], {"same": models["same"]}, x[:, 0], y)
    with pytest.raises(BundleError, match="at least one candidate"):
        compare(models["ref"], {}, x, y)


def test_auroc_drop_comes_with_an_interval_that_says_when_the_set_is_too_small(tmp_path: Path) -> None:
    """A 0.1-noise candidate 'drops' ~6 points on 40 images but ~0.1 on 200: the small set's
    interval must say it cannot tell, and the failure must point to --gate-images; a candidate
    that really is worse (an inverted map) must not be excused as noise."""
    ref = darkness_model(tmp_path / "ref.onnx")
    wobbly = darkness_model(tmp_path / "wobbly.onnx", noise=0.1)
    inverted = darkness_model(tmp_path / "inverted.onnx", gain=-1.0)
    x, y, m = dataset(40)
    rep = compare(ref, {"wobbly": wobbly, "inverted": inverted}, x, y, m)
    w, inv = rep.candidates["wobbly"], rep.candidates["inverted"]
    assert w.auroc_drop > 2 and w.auroc_drop_ci95[0] < 0.5 < w.auroc_drop < w.auroc_drop_ci95[1]
    assert inv.auroc_drop_ci95[0] > 20
    assert rep._drop_within_noise("wobbly") and not rep._drop_within_noise("inverted")
    with pytest.raises(BundleError) as e:
        compare(ref, {"inverted": inverted}, x, y, m).enforce()
    assert "--gate-images" not in str(e.value) and "95 % interval on this set" in str(e.value)
    with pytest.raises(BundleError) as e:
        rep.enforce(min_pearson=-1)
    assert "within this set's noise" in str(e.value) and "--gate-images" in str(e.value)
    assert json.loads(json.dumps(rep.to_dict(), allow_nan=False))["candidates"]["wobbly"]["auroc_drop_ci95"][0] < 0.5
    # More images: the same candidate's drop shrinks into its (narrower) interval and passes.
    x, y, m = dataset(200)
    big = compare(ref, {"wobbly": wobbly}, x, y, m).candidates["wobbly"]
    assert big.auroc_drop < 0.5
    assert big.auroc_drop_ci95[1] - big.auroc_drop_ci95[0] < 0.25 * (w.auroc_drop_ci95[1] - w.auroc_drop_ci95[0])
