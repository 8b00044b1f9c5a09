"""Synthetic anomaly recipes: deterministic, and the mask says exactly where the image changed."""

from __future__ import annotations

import numpy as np
import pytest

from linecam.export import anomalies as A


def _texture(rng: np.random.Generator, n: int = 96, channels: int = 3) -> np.ndarray:
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    g = 120 + 35 * np.sin(xx / 2.5 + rng.uniform(0, 6)) * np.sin(yy / 2.5) + rng.normal(0, 6, (n, n))
    img = np.stack([g, g * 0.9 + 10, g * 0.8 + 20], 2)[:, :, :channels]
    return np.clip(img, 0, 255).astype(np.uint8)


ALL = sorted(A.RECIPES)


@pytest.mark.parametrize("recipe", ALL + ["synthesize"])
def test_deterministic_given_rng(recipe: str) -> None:
    f = A.synthesize if recipe == "synthesize" else A.RECIPES[recipe][0]
    base = np.random.default_rng(7)
    img, donor = _texture(base), _texture(base)
    a_img, a_mask = f(np.random.default_rng(123), img, donor)
    b_img, b_mask = f(np.random.default_rng(123), img, donor)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_mask, b_mask)
    # ...and the rng really drives it: other seeds give other anomalies.
    others = [f(np.random.default_rng(s), img, donor)[1] for s in range(5)]
    assert any(not np.array_equal(a_mask, o) for o in others)


@pytest.mark.parametrize("recipe", ALL)
@pytest.mark.parametrize("seed", range(15))
def test_mask_matches_changed_pixels(recipe: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    img, donor = _texture(rng), _texture(rng)
    before = img.copy()
    out, mask = A.RECIPES[recipe][0](rng, img, donor)
    np.testing.assert_array_equal(img, before)  # input untouched
    assert out.shape == img.shape and out.dtype == img.dtype
    assert mask.shape == img.shape[:2] and mask.dtype == np.float32
    assert 0.0 <= mask.min() and mask.max() <= 1.0
    changed = np.abs(out.astype(np.int32) - img).max(axis=2) > 0
    # Nothing changes outside the mask...
    assert not np.any(changed & (mask == 0))
    # ...and the labelled region really is altered (not a silent no-op labelled "bad").
    inside = mask >= 0.5
    assert inside.sum() >= 4
    assert changed[inside].mean() > 0.8
    assert mask.mean() < 0.5  # an anomaly is a part of the image, not all of it


@pytest.mark.parametrize("shape,dtype", [((80, 120, 1), np.uint8), ((64, 64, 1), np.uint16), ((70, 90, 3), np.uint16)])
def test_mono_and_16_bit(shape: tuple[int, int, int], dtype: type) -> None:
    rng = np.random.default_rng(0)
    maxv = np.iinfo(dtype).max
    img = (rng.uniform(0.3, 0.6, shape) * maxv).astype(dtype)
    donor = (rng.uniform(0.0, 1.0, (50, 50, 3)) * 255).astype(np.uint8)  # other size, depth, channels
    for _ in range(20):
        out, mask = A.synthesize(rng, img, donor)
        assert out.shape == shape and out.dtype == dtype
        assert mask.shape == shape[:2]
        changed = np.abs(out.astype(np.int64) - img).max(axis=2) > 0
        assert not np.any(changed & (mask == 0))
        assert mask.max() > 0


def test_perlin_mask_area_and_binary() -> None:
    rng = np.random.default_rng(3)
    for _ in range(30):
        m = A.perlin_mask(rng, (100, 150))
        assert m.shape == (100, 150)
        assert set(np.unique(m)) <= {0.0, 1.0}
        assert 0.002 <= m.mean() <= 0.35


def test_perlin_noise_range_and_smoothness() -> None:
    n = A.perlin_noise(np.random.default_rng(0), (64, 96), (4, 4))
    assert n.shape == (64, 96) and np.all(np.abs(n) <= 1.0 + 1e-5)
    # Gradient noise: neighbouring pixels are close compared with the overall spread.
    assert np.abs(np.diff(n, axis=1)).mean() < 0.1 * n.std() * 4


def test_recipe_weights() -> None:
    rng = np.random.default_rng(0)
    img = _texture(rng)
    # Only rectangles: every label fills (almost all of) an axis-aligned rectangle.
    for _ in range(10):
        _, m = A.synthesize(rng, img, None, weights={"cutpaste": 1.0})
        ys, xs = np.nonzero(m)
        assert (m[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] > 0).mean() > 0.95
    with pytest.raises(ValueError, match="unknown anomaly recipe"):
        A.synthesize(rng, img, None, weights={"bogus": 1.0})
    with pytest.raises(ValueError, match="zero"):
        A.synthesize(rng, img, None, weights={"perlin": 0.0})


def test_cutpaste_rect_area_fraction() -> None:
    rng = np.random.default_rng(5)
    img = _texture(rng, 128)
    areas = [A.cutpaste_rect(rng, img)[1].mean() for _ in range(50)]
    assert 0.015 <= min(areas) and max(areas) <= 0.16


def test_visible_label_discounts_invisible_changes() -> None:
    rng = np.random.default_rng(0)
    img = _texture(rng)
    mask = np.zeros(img.shape[:2], np.float32)
    mask[20:50, 30:70] = 1.0
    # "Altered" but identical: not an anomaly.
    assert A.visible_label(img, img.copy(), mask).max() == 0.0
    # A strong change (60 grey levels) is fully visible inside the mask, nothing outside.
    out = img.astype(np.int32)
    out[20:50, 30:70] -= 60
    lab = A.visible_label(img, np.clip(out, 0, 255).astype(np.uint8), mask)
    assert lab[25:45, 35:65].min() == pytest.approx(1.0)
    assert lab[mask == 0].max() == 0.0
    # A faint one (5 levels) gets a low label.
    out = img.astype(np.int32)
    out[20:50, 30:70] += 5
    lab = A.visible_label(img, np.clip(out, 0, 255).astype(np.uint8), mask)
    assert 0.1 < lab[30:40, 40:60].mean() < 0.4


def test_synthesize_labels_are_visible() -> None:
    rng = np.random.default_rng(11)
    for _ in range(40):
        img, donor = _texture(rng), _texture(rng)
        out, lab = A.synthesize(rng, img, donor)
        assert lab.max() >= 0.5
        changed = np.abs(out.astype(np.int32) - img).max(axis=2) > 0
        assert not np.any((lab > 0) & ~changed & (cv2_dilate(changed) == 0))


def cv2_dilate(a: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.dilate(a.astype(np.uint8), np.ones((9, 9), np.uint8))
