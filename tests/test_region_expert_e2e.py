"""The workstation workflow end to end on a generated MVTec-AD-layout category:
good images → scratch teacher → distilled student → FP16 + INT8 behind the accuracy gate →
``linecam evaluate`` of the INT8 bundle on defect kinds never seen in training.
"""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402

from mvtec_synth import make_category  # noqa: E402

from linecam.bundle import load_bundle  # noqa: E402
from linecam.errors import BundleError  # noqa: E402
from linecam.export.cli import cli as export_cli  # noqa: E402
from linecam.export.distil import DistilOptions, distil  # noqa: E402
from linecam.export.teachers import BundleTeacher  # noqa: E402

SIZE = 128


@pytest.fixture(scope="module")
def workflow(tmp_path_factory):
    root = tmp_path_factory.mktemp("workflow")
    cat = make_category(root / "data", seed=0, size=SIZE)
    out, work = root / "bundle", root / "work"
    res = CliRunner().invoke(export_cli, [
        "distil", "--teacher", "scratch", "--teacher-steps", "600", "--images", str(cat / "train" / "good"),
        "--out", str(out), "--work-dir", str(work), "--size", str(SIZE), "--steps", "800", "--pool-size", "384",
        "--threads", "2", "-q"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return cat, out, work


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_int8_student_reaches_the_accuracy_bar_on_unseen_defects(workflow, tmp_path):
    from linecam.evaluate import evaluate_bundle

    cat, out, _ = workflow
    bundle = load_bundle(out)
    assert {"onnx_fp32", "onnx_fp16", "onnx_int8"} <= set(bundle.manifest.files)
    gate = json.loads((out / "gate.json").read_text())
    assert gate["passed"] and not gate["forced"], gate
    report = evaluate_bundle(out, cat, tmp_path / "eval", precision="int8", progress=False)
    m = report.metrics
    assert m["image_auroc"] >= 0.97, m
    assert m["pixel_auroc"] >= 0.95, m
    assert m["aupro"] > 0.5, m
    assert (tmp_path / "eval" / "report.json").is_file() and (tmp_path / "eval" / "roc.png").is_file()
    per_type = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert set(per_type["per_defect"]) == {"scratch", "stain", "hole", "contamination"}


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_blank_calibration_trips_the_gate_and_force_records_it(workflow, tmp_path):
    cat, out, work = workflow
    blank = tmp_path / "blank"
    blank.mkdir()
    # Blank frames of the dataset's mean grey: after normalisation the network sees nothing at all.
    # (Black frames are not blank to a zero-padded conv net: their border is the strongest edge it ever
    # sees, and the ranges they give can be usable.)
    for i in range(16):
        cv2.imwrite(str(blank / f"{i:02d}.png"), np.full((SIZE, SIZE, 3), 118, np.uint8))
    teacher = BundleTeacher(next(work.glob("teacher-scratch-*")), kind="scratch")
    # Same work dir and options as the CLI run: teacher, pool and student come from the cache,
    # only the INT8 calibration differs.
    # Blank and nothing painted on them (--calib-anomalies 0): every activation range is what a
    # featureless frame produces.
    opts = DistilOptions(steps=800, pool_size=384, threads=2, calib_anomaly_ratio=0.0)
    with pytest.raises(BundleError, match="accuracy gate"):
        distil(teacher, cat / "train" / "good", tmp_path / "broken", work_dir=work, options=opts,
               calib_images=blank, progress=False)
    assert not (tmp_path / "broken" / "manifest.json").exists(), "a failed gate writes no bundle"
    opts.force = True
    distil(teacher, cat / "train" / "good", tmp_path / "forced", work_dir=work, options=opts,
           calib_images=blank, progress=False)
    gate = json.loads((tmp_path / "forced" / "gate.json").read_text())
    assert gate["forced"] and not gate["passed"]
    m = load_bundle(tmp_path / "forced").manifest
    assert m.extra["calibration_sha256"] != load_bundle(out).manifest.extra["calibration_sha256"]
