"""Real-photo evaluation data: MVTec layout, masks that match the painted change, and defect
code that shares nothing with the trainer's synthetic anomalies."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("skimage")

import linecam.realdata.defects as defects  # noqa: E402
from linecam.evaluate import scan_dataset  # noqa: E402
from linecam.realdata import build_category  # noqa: E402


def test_category_is_mvtec_layout_with_every_defect_kind(tmp_path):
    r = build_category("gravel", tmp_path, per_kind=2, n_train=5, n_test_good=3)
    samples = scan_dataset(r.root)
    kinds = {s.defect for s in samples}
    assert kinds == {"good", *defects.PAINTERS}
    assert len(list((r.root / "train" / "good").glob("*.png"))) == 5
    meta = json.loads((r.root / "defects.json").read_text())
    assert {d["soft"] for d in meta["defects"]} == {True, False}
    for d in meta["defects"]:
        mask = cv2.imread(str(r.root / "ground_truth" / d["kind"] / Path(d["file"]).name.replace(".png", "_mask.png")), 0)
        assert mask.shape == (128, 128) and (mask > 127).sum() == d["mask_px"] > 0
    mtime = (r.root / "defects.json").stat().st_mtime_ns
    build_category("gravel", tmp_path, per_kind=2, n_train=5, n_test_good=3)  # same parameters: reused
    assert (r.root / "defects.json").stat().st_mtime_ns == mtime


@pytest.mark.parametrize("kind", sorted(defects.PAINTERS))
def test_each_defect_changes_the_image_inside_its_mask(kind):
    rng = np.random.default_rng(0)
    img = np.full((128, 128, 3), 0.5, np.float32) + rng.normal(0, 0.02, (128, 128, 3)).astype(np.float32)
    for soft in (True, False):
        d = defects.paint(kind, img, rng, soft)
        diff = np.abs(d.image - img).max(axis=2)
        assert diff[d.mask].mean() > 3 * max(diff[~d.mask].mean(), 1e-3), (kind, soft)


def test_defect_code_is_independent_of_the_trainers_anomalies():
    for mod in ("defects", "build"):
        tree = ast.parse(Path(defects.__file__).with_name(f"{mod}.py").read_text())
        names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
            a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not any(n and n.startswith("linecam.export") for n in names), names
    code = "import sys, linecam.realdata; print('linecam.export.anomalies' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_thin_defects_scale_their_contrast_with_the_surfaces_texture():
    """A soft groove must stay visible on grass-like texture, not only on a smooth surface."""
    rng = np.random.default_rng(1)
    smooth = np.full((128, 128, 3), 0.5, np.float32)
    busy = np.clip(0.5 + rng.normal(0, 0.2, (128, 128, 1)), 0, 1).repeat(3, axis=2).astype(np.float32)
    assert defects.contrast_gain(smooth) == 1.0
    assert defects.contrast_gain(busy) > 2
    for kind in ("scratch", "crack", "dent"):
        d_smooth = defects.paint(kind, smooth, np.random.default_rng(5), True)
        d_busy = defects.paint(kind, busy, np.random.default_rng(5), True)
        # same shape (same draws), more contrast on the busy surface
        assert (d_smooth.mask == d_busy.mask).all(), kind
        c_smooth = np.abs(d_smooth.image - smooth)[d_smooth.mask].mean()
        c_busy = np.abs(d_busy.image - busy)[d_busy.mask].mean()
        assert c_busy > 1.5 * c_smooth, (kind, c_smooth, c_busy)
