"""The workstation workflow end to end on a generated MVTec-AD-layout category:
good images → scratch teacher → distilled student → FP16 + INT8 behind the accuracy gate →
``linecam evaluate`` of the INT8 bundle on defect kinds never seen in training.
"""

from __future__ import annotations

import json
from pathlib import Path

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
        "--threads", "2", "-q",
        # The plain student. On this generated fabric the encoder teacher scores brightened good
        # copies (the threshold set's light jitter) as defects (probability up to 0.8-1.1 at 600
        # and at 1500 teacher steps); the lite0 student reproduces that, the threshold rises to 3x
        # those copies and only 9-11 of 40 defects pass it (README, real-photo section). This test
        # is about the daemon running what evaluate measured, not about that open problem.
        "--student", "s"])
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
    # int8_max_float=0: this is about the gate tripping; the float-layer search (tested in
    # test_int8_search.py) rescues even this calibration by keeping convolutions in float.
    opts = DistilOptions(steps=800, pool_size=384, threads=2, calib_anomaly_ratio=0.0, int8_max_float=0)
    import shutil

    shutil.copytree(out, tmp_path / "broken")  # re-exporting over a good bundle
    with pytest.raises(BundleError, match="accuracy gate"):
        distil(teacher, cat / "train" / "good", tmp_path / "broken", work_dir=work, options=opts,
               calib_images=blank, progress=False)
    assert not (tmp_path / "broken" / "manifest.json").exists(), "a failed gate leaves no bundle behind"
    assert not json.loads((tmp_path / "broken" / "gate.json").read_text())["passed"]
    opts.force = True
    distil(teacher, cat / "train" / "good", tmp_path / "forced", work_dir=work, options=opts,
           calib_images=blank, progress=False)
    gate = json.loads((tmp_path / "forced" / "gate.json").read_text())
    assert gate["forced"] and not gate["passed"]
    m = load_bundle(tmp_path / "forced").manifest
    assert m.extra["calibration_sha256"] != load_bundle(out).manifest.extra["calibration_sha256"]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_daemon_runs_the_int8_student_as_evaluated(workflow, broker, tmp_path):
    """The distilled INT8 bundle on the line daemon (replay of the test images, real mosquitto): the
    published raw scores equal `linecam evaluate`'s, and the regions of the coarse (1/8) map land
    on the defects in source pixels."""
    import shutil
    import time

    from linecam.config import parse_config
    from linecam.evaluate import evaluate_bundle
    from linecam.events import subscribe
    from linecam.runtime.service import run_service

    cat, out, _ = workflow
    rep = evaluate_bundle(out, cat, progress=False, precision="int8")
    replay = tmp_path / "replay"
    replay.mkdir()
    for i, r in enumerate(rep.images):
        shutil.copy(cat / r.path, replay / f"{i:03d}.png")
    cfg = parse_config({
        "line": "t", "camera_id": "st",
        "camera": {"kind": "replay", "path": str(replay)},
        "model": {"bundle": str(out), "precision": "int8"},
        "mqtt": {"host": "127.0.0.1", "port": broker.port},
        "runtime": {"queue_size": 128},
        "output": {"snapshots_dir": str(tmp_path / "snaps")},
        "spool": {"path": str(tmp_path / "spool.db")},
    }, tmp_path / "line.yaml")
    verdicts: dict[int, dict] = {}
    defects: dict[int, dict] = {}
    with subscribe("127.0.0.1", broker.port, prefix="linecam/t/st", types=("verdict", "defect")) as sub:
        run_service(cfg)
        deadline = time.monotonic() + 15.0
        n_ng = sum(r.verdict == "NG" for r in rep.images)
        while (len(verdicts) < len(rep.images) or len(defects) < n_ng) and time.monotonic() < deadline:
            ev = sub.poll(timeout=0.2)
            if ev is not None:
                (verdicts if ev.type == "verdict" else defects)[ev.payload["frame_id"]] = ev.payload
    assert sorted(verdicts) == list(range(len(rep.images)))
    hits = 0
    for i, r in enumerate(rep.images):
        v = verdicts[i]
        assert v["model"]["file"] == "onnx_int8"
        assert abs(v["score_raw"] - r.score_raw) <= 1e-5, (r.path, v["score_raw"], r.score_raw)
        if r.label and v["verdict"] == "NG":
            mask = cv2.imread(str(cat / "ground_truth" / r.defect / (Path(r.path).stem + "_mask.png")), 0) > 127
            regions = defects[i]["regions"]
            assert regions, r.path
            x, y, w, h = regions[0]["bbox"]  # the strongest region, in source pixels
            hits += bool(mask[int(y):int(y + h) + 1, int(x):int(x + w) + 1].any())
    n_caught = sum(1 for i, r in enumerate(rep.images) if r.label and verdicts[i]["verdict"] == "NG")
    assert n_caught >= 0.9 * sum(r.label for r in rep.images)
    assert hits >= 0.9 * n_caught, (hits, n_caught)
