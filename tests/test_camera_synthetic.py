"""The simulated production line: determinism, defect statistics, ground truth, pacing."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest

from linecam.camera.base import SourceExhausted
from linecam.camera.synthetic import DEFECT_KINDS, SyntheticLineSource, render_part, write_good_images
from linecam.errors import CameraError

W = H = 320


def _frames(src: SyntheticLineSource, n: int):
    with src:
        return [src.read(timeout=1.0) for _ in range(n)]


def test_same_seed_same_frames_different_seed_different():
    a = _frames(SyntheticLineSource(fps=None, seed=7, defect_rate=0.5), 20)
    b = _frames(SyntheticLineSource(fps=None, seed=7, defect_rate=0.5), 20)
    c = _frames(SyntheticLineSource(fps=None, seed=8, defect_rate=0.5), 20)
    for fa, fb in zip(a, b):
        assert fa.frame_id == fb.frame_id
        np.testing.assert_array_equal(fa.image, fb.image)
        assert fa.truth == fb.truth and fa.meta == fb.meta
    assert any(not np.array_equal(fa.image, fc.image) for fa, fc in zip(a, c))
    assert [f.frame_id for f in a] == list(range(20))
    # reopening restarts the same line
    src = SyntheticLineSource(fps=None, seed=7, defect_rate=0.5)
    _frames(src, 3)
    np.testing.assert_array_equal(_frames(src, 1)[0].image, a[0].image)


def test_frame_layout():
    f = _frames(SyntheticLineSource(width=256, height=192, fps=None), 1)[0]
    assert f.image.shape == (192, 256, 3) and f.image.dtype == np.uint8 and f.image.flags.c_contiguous
    assert f.bit_depth == 8 and f.clock == "host_monotonic" and f.timestamp_ns == f.host_ns


def test_defect_rate_and_truths_over_500_frames():
    frames = _frames(SyntheticLineSource(fps=None, seed=3, defect_rate=0.3), 500)
    truths = [f.truth for f in frames]
    n_bad = sum(truths)
    # binomial(500, 0.3): mean 150, sd ~10.2 -> 4 sd either side
    assert 110 <= n_bad <= 190, n_bad
    kinds = []
    for f in frames:
        assert f.truth is (len(f.meta["defects"]) > 0)
        for d in f.meta["defects"]:
            assert d["kind"] in DEFECT_KINDS
            x, y, w, h = d["bbox"]
            assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= W and y + h <= H
            kinds.append(d["kind"])
    counts = {k: kinds.count(k) for k in DEFECT_KINDS}
    assert all(c >= 10 for c in counts.values()), counts


@pytest.mark.parametrize("rate,expected", [(0.0, False), (1.0, True)])
def test_defect_rate_extremes(rate, expected):
    assert all(f.truth is expected for f in _frames(SyntheticLineSource(fps=None, defect_rate=rate), 30))


def _texture_noise(img: np.ndarray) -> float:
    """Std of the fine texture on the part (image minus its local mean), in grey levels."""
    g = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float32)
    hp = g - cv2.GaussianBlur(g, (0, 0), 2.0)
    yy, xx = np.mgrid[0:H, 0:W]
    r = np.hypot(yy - H / 2, xx - W / 2)
    ring = (r > 0.22 * W) & (r < 0.35 * W)  # well inside the washer band
    return float(hp[ring].std())


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_defect_changes_pixels_inside_its_bbox_only(kind):
    for seed in range(12):
        good, none = render_part(np.random.default_rng(seed), W, H, None)
        bad, defects = render_part(np.random.default_rng(seed), W, H, kind)
        assert none == [] and len(defects) == 1 and defects[0]["kind"] == kind
        x, y, w, h = defects[0]["bbox"]
        assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= W and y + h <= H
        diff = np.abs(good.astype(int) - bad.astype(int)).max(axis=2)
        inside = np.zeros((H, W), bool)
        inside[y : y + h, x : x + w] = True
        # visibly significant: >= 0.2 % of the image changed by more than 10 levels...
        changed = diff > 10
        assert changed.sum() >= 0.002 * W * H, (kind, seed, changed.sum())
        # ...all of it inside the bbox, nothing but rounding outside
        assert changed[inside].sum() == changed.sum()
        assert diff[~inside].max() <= 5, (kind, seed)
        # and clearly above the texture noise of the part
        assert np.percentile(diff[changed], 90) > 6 * _texture_noise(good), (kind, seed)


def test_good_parts_vary_but_stay_alike():
    imgs = [render_part(np.random.default_rng(s), W, H, None)[0].astype(np.float32) for s in range(6)]
    for a, b in zip(imgs, imgs[1:]):
        d = np.abs(a - b).mean()
        assert 1.0 < d < 25.0, d


def test_frames_budget_then_exhausted():
    src = SyntheticLineSource(fps=None, frames=3)
    with src:
        assert [src.read(timeout=1.0).frame_id for _ in range(3)] == [0, 1, 2]
        with pytest.raises(SourceExhausted):
            src.read(timeout=1.0)


def test_mono_option():
    colour = _frames(SyntheticLineSource(fps=None, seed=5), 2)
    mono = _frames(SyntheticLineSource(fps=None, seed=5, mono=True), 2)
    for c, m in zip(colour, mono):
        assert m.image.shape == (H, W, 1) and m.image.dtype == np.uint8
        np.testing.assert_array_equal(m.image[:, :, 0], cv2.cvtColor(c.image, cv2.COLOR_RGB2GRAY))
        assert m.truth == c.truth and m.meta == c.meta


def test_pacing_and_timeout():
    fps = 50.0
    with SyntheticLineSource(fps=fps) as src:
        src.read(timeout=1.0)
        t0 = time.monotonic()
        for _ in range(10):
            assert src.read(timeout=1.0) is not None
        ratio = (time.monotonic() - t0) / (10 / fps)
    assert 0.7 < ratio < 2.0, ratio
    with SyntheticLineSource(fps=2.0) as src:
        src.read(timeout=1.0)
        assert src.read(timeout=0.05) is None


def test_render_speed():
    rng = np.random.default_rng(0)
    render_part(rng, W, H, None)  # textures are built once per size
    t0 = time.perf_counter()
    n = 50
    for i in range(n):
        render_part(rng, W, H, DEFECT_KINDS[i % len(DEFECT_KINDS)] if i % 2 else None)
    per_frame = (time.perf_counter() - t0) / n
    assert per_frame < 0.02, per_frame  # ~2 ms here; generous for a loaded CI machine


def test_write_good_images(tmp_path):
    paths = write_good_images(tmp_path / "good", 4, 160, 128, seed=1)
    assert [p.name for p in paths] == [f"good_{i:05d}.png" for i in range(4)]
    imgs = [cv2.imread(str(p)) for p in paths]
    assert all(i is not None and i.shape == (128, 160, 3) for i in imgs)
    assert not np.array_equal(imgs[0], imgs[1])
    again = write_good_images(tmp_path / "again", 1, 160, 128, seed=1)
    np.testing.assert_array_equal(cv2.imread(str(again[0])), imgs[0])


def test_errors():
    with pytest.raises(ValueError, match="unknown defect kind"):
        render_part(np.random.default_rng(0), W, H, "dent")
    with pytest.raises(CameraError, match="defect_rate"):
        SyntheticLineSource(defect_rate=1.5)
    with pytest.raises(CameraError, match="too small"):
        SyntheticLineSource(width=16, height=16)
    with pytest.raises(CameraError, match="fps"):
        SyntheticLineSource(fps=-1)
    with pytest.raises(CameraError, match="not open"):
        SyntheticLineSource().read(timeout=0.1)
