"""linecam.calibration.metrics on cases small enough to check by hand."""

from __future__ import annotations

import numpy as np
import pytest

from linecam.calibration.metrics import (
    aupro,
    auroc,
    auroc_difference,
    f1_at,
    false_reject_rate,
    miss_rate,
    pixel_auroc,
    pro_curve,
    rates_at,
    roc_curve,
    trapezoid_to,
)

# --------------------------------------------------------------------------- image level


def test_auroc_perfect_inverted_constant():
    y = np.array([0, 0, 0, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    assert auroc(y, s) == 1.0
    assert auroc(y, -s) == 0.0
    assert auroc(y, np.full(5, 0.7)) == 0.5  # a constant model is a coin, never a lucky 1.0


def test_auroc_ties_by_hand():
    # pairs (pos, neg): (.5,.1)=1 (.5,.5)=1/2 (.9,.1)=1 (.9,.5)=1 -> 3.5 / 4
    assert auroc([0, 0, 1, 1], [0.1, 0.5, 0.5, 0.9]) == pytest.approx(0.875)


def test_auroc_random_scores_near_half():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 20000)
    assert abs(auroc(y, rng.random(20000)) - 0.5) < 0.02


def _delong_by_pairs(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """DeLong's paired difference and its standard error from the m x n kernel matrices (the
    textbook form, no ranks): what auroc_difference computes in O(N log N)."""
    se_parts, diffs = [], []
    psis = []
    for s in (a, b):
        p, q = s[y == 1][:, None], s[y == 0][None, :]
        psis.append((p > q) + 0.5 * (p == q))
    v10 = [k.mean(axis=1) for k in psis]
    v01 = [k.mean(axis=0) for k in psis]
    m, n = len(v10[0]), len(v01[0])
    diffs = psis[0].mean() - psis[1].mean()
    for v, k in ((v10, m), (v01, n)):
        c = np.cov(np.vstack(v))
        se_parts.append((c[0, 0] + c[1, 1] - 2 * c[0, 1]) / k)
    return float(diffs), float(np.sqrt(sum(se_parts)))


def test_auroc_difference_is_delongs_paired_test():
    rng = np.random.default_rng(3)
    y = (np.arange(90) % 3 == 0).astype(int)
    a = np.round(rng.normal(size=90) + 1.2 * y, 1)  # rounded: ties, which DeLong counts as 1/2
    b = np.round(a + rng.normal(0, 0.4, 90), 1)
    d, lo, hi = auroc_difference(y, a, b)
    want_d, want_se = _delong_by_pairs(y, a, b)
    assert d == pytest.approx(auroc(y, a) - auroc(y, b)) == pytest.approx(want_d)
    assert (hi - lo) / 2 == pytest.approx(1.959964 * want_se, rel=1e-9)
    assert auroc_difference(y, a, a) == (0.0, 0.0, 0.0)
    assert all(np.isnan(auroc_difference(np.zeros(5), a[:5], b[:5])))


def test_auroc_difference_interval_matches_the_spread_between_draws():
    """Its standard error is what independent draws of as many images really scatter by."""
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(64), np.ones(64)].astype(int)
    drops, ses = [], []
    for _ in range(300):
        a = rng.normal(size=128) + 1.3 * y
        b = a + rng.normal(0, 0.3, 128)
        d, lo, hi = auroc_difference(y, a, b)
        drops.append(d)
        ses.append((hi - lo) / 2 / 1.959964)
    assert np.mean(ses) == pytest.approx(np.std(drops), rel=0.25)


def test_roc_curve_matches_the_textbook_example():
    # sklearn's documented example: fpr [0, 0, .5, .5, 1], tpr [0, .5, .5, 1, 1]
    fpr, tpr, thr = roc_curve([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
    np.testing.assert_allclose(thr, [np.inf, 0.8, 0.4, 0.35, 0.1])


def test_roc_curve_ties_go_diagonally_and_integrate_to_auroc():
    y, s = [0, 0, 1, 1], [0.1, 0.5, 0.5, 0.9]
    fpr, tpr, thr = roc_curve(y, s)
    np.testing.assert_allclose(thr, [np.inf, 0.9, 0.5, 0.1])  # one point per distinct score
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 1, 1])
    assert np.trapezoid(tpr, fpr) == pytest.approx(auroc(y, s)) == pytest.approx(0.875)
    rng = np.random.default_rng(1)
    y2, s2 = rng.integers(0, 2, 500), np.round(rng.random(500), 1)  # many ties
    f2, t2, _ = roc_curve(y2, s2)
    assert np.trapezoid(t2, f2) == pytest.approx(auroc(y2, s2), abs=1e-12)


def test_roc_curve_rejects_nan_and_mismatch():
    with pytest.raises(ValueError, match="NaN"):
        roc_curve([0, 1], [0.1, np.nan])
    with pytest.raises(ValueError, match="differ"):
        roc_curve([0, 1, 1], [0.1, 0.2])


def test_rates_at_threshold_by_hand():
    y = [0, 0, 0, 1, 1]
    s = [0.1, 0.6, 0.2, 0.7, 0.3]
    r = rates_at(y, s, 0.5)  # good 0.6 falsely rejected; defect 0.3 missed
    assert (r.tp, r.fp, r.tn, r.fn) == (1, 1, 2, 1)
    assert r.false_reject_rate == pytest.approx(1 / 3) == false_reject_rate(y, s, 0.5)
    assert r.miss_rate == pytest.approx(1 / 2) == miss_rate(y, s, 0.5)
    assert r.precision == r.recall == 0.5
    assert f1_at(y, s, 0.5) == pytest.approx(0.5)  # 2*1 / (2*1 + 1 + 1)
    # score == threshold is NG (the daemon's rule)
    assert rates_at([1], [0.5], 0.5).tp == 1 and rates_at([0], [0.5], 0.5).fp == 1
    assert f1_at(y, s, 0.25) == pytest.approx(2 * 2 / (2 * 2 + 1 + 0))  # 0.3 caught, 0.6 still flagged
    assert np.isnan(f1_at([0, 0], [0.1, 0.2], 0.5))  # nothing defective, nothing flagged
    assert np.isnan(miss_rate([0, 0], [0.1, 0.9], 0.5)) and np.isnan(false_reject_rate([1], [0.9], 0.5))


# --------------------------------------------------------------------------- pixel level


def _blob_masks() -> np.ndarray:
    m = np.zeros((3, 16, 16), bool)
    m[0, 2:6, 3:9] = True
    m[0, 10:13, 10:15] = True  # a second region in the same image
    m[1, 7:9, 1:3] = True
    return m  # image 2 is good (no defect)


def test_pixel_auroc_perfect_inverted_and_histogram():
    m = _blob_masks()
    perfect = m.astype(np.float32) + 0.01 * np.random.default_rng(0).random(m.shape)
    assert pixel_auroc(m, perfect) == 1.0
    assert pixel_auroc(m, -perfect) == 0.0
    assert pixel_auroc(m, list(perfect)) == 1.0  # a list of (h, w) maps works too
    assert pixel_auroc(m, perfect, max_exact=0) == pytest.approx(1.0, abs=1e-4)  # histogram path
    assert np.isnan(pixel_auroc(np.zeros((2, 4, 4), bool), np.zeros((2, 4, 4))))


def test_pixel_auroc_histogram_close_to_exact():
    rng = np.random.default_rng(3)
    m = rng.random((10, 32, 32)) < 0.1
    maps = rng.normal(size=m.shape) + 1.2 * m
    exact = pixel_auroc(m, maps)
    approx = pixel_auroc(m, maps, max_exact=100, bins=1024)
    assert 0.7 < exact < 0.95
    assert approx == pytest.approx(exact, abs=2e-3)
    # ties stay ties in the histogram: a coarsely quantised map gives the exact answer
    q = np.round(maps)
    assert pixel_auroc(m, q, max_exact=100, bins=1024) == pytest.approx(pixel_auroc(m, q), abs=1e-12)


def test_aupro_perfect_is_one_and_covering_nothing_is_zero():
    m = _blob_masks()
    assert aupro(m, m.astype(np.float32)) == pytest.approx(1.0)
    # high only on background: every region is found only after all background pixels
    nothing = np.where(m, 0.0, 1.0 + np.random.default_rng(1).random(m.shape))
    assert aupro(m, nothing) == pytest.approx(0.0)
    assert aupro(m, m.astype(np.float32), max_exact=0) == pytest.approx(1.0)  # histogram path


def test_aupro_of_a_constant_map_is_the_diagonal():
    # one threshold: (0, 0) -> (1, 1); area up to 0.3 is 0.3 * 0.3 / 2 = 0.045; / 0.3 = 0.15
    m = _blob_masks()
    assert aupro(m, np.zeros(m.shape)) == pytest.approx(0.15)


def test_aupro_by_hand():
    # one row of 10 pixels: region A = pixels 0-1 (size 2), region B = pixel 3; 7 background pixels
    mask = np.array([[1, 1, 0, 1, 0, 0, 0, 0, 0, 0]], bool)
    amap = np.array([[0.9, 0.5, 0.8, 0.7, 0.3, 0.2, 0.1, 0.05, 0.04, 0.03]])
    fpr, pro = pro_curve([mask], [amap])
    # t=.9: A half -> PRO .25 | t=.8: one bg -> FPR 1/7 | t=.7: B -> .75 | t=.5: A whole -> 1 | t=.3: 2/7 ...
    np.testing.assert_allclose(fpr[:7], [0, 0, 1 / 7, 1 / 7, 1 / 7, 2 / 7, 3 / 7])
    np.testing.assert_allclose(pro[:7], [0, 0.25, 0.25, 0.75, 1, 1, 1])
    # area to 0.3: 0.25 * 1/7 + 1.0 * (0.3 - 1/7) = 0.3 - 3/28; normalised: 1 - 5/14 = 9/14
    assert aupro([mask], [amap]) == pytest.approx(9 / 14)
    assert aupro([mask], [amap], fpr_limit=1 / 7) == pytest.approx(0.25)


def test_aupro_regions_are_8_connected_and_weighted_equally():
    # (0,0) touches (1,1) diagonally: ONE region of 3 pixels; 4-connectivity would give two (PRO .5)
    mask = np.zeros((4, 4), bool)
    mask[0, 0] = mask[1, 1] = mask[1, 2] = True
    amap = np.full((4, 4), 0.5)
    amap[mask] = 0.0
    amap[0, 0] = 1.0
    assert aupro([mask], [amap]) == pytest.approx(1 / 3)


def test_aupro_counts_background_of_good_images():
    # perfect on the defect image, but a good image has pixels above every defect: FPR > 0 at once
    m = np.zeros((2, 4, 4), bool)
    m[0, :2, :2] = True
    maps = m.astype(np.float64)
    assert aupro(m, maps) == pytest.approx(1.0)
    maps[1, 0, 0] = 2.0  # 1 of 28 background pixels beats the region
    fpr, pro = pro_curve(m, maps)
    np.testing.assert_allclose(fpr[:3], [0, 1 / 28, 1 / 28])
    np.testing.assert_allclose(pro[:3], [0, 0, 1])
    assert aupro(m, maps) == pytest.approx((0.3 - 1 / 28) / 0.3)


def test_aupro_histogram_close_to_exact_and_nan_without_regions():
    rng = np.random.default_rng(5)
    m = np.zeros((8, 32, 32), bool)
    for i in range(4):
        y, x = rng.integers(0, 24, 2)
        m[i, y:y + 6, x:x + 5] = True
    maps = rng.normal(size=m.shape) + 1.5 * m
    exact = aupro(m, maps)
    assert 0.3 < exact < 0.95
    assert aupro(m, maps, max_exact=100, bins=4096) == pytest.approx(exact, abs=2e-3)
    assert np.isnan(aupro(np.zeros((2, 4, 4), bool), maps[:2, :4, :4]))


def test_pixel_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="same 2-d shape"):
        aupro([np.zeros((4, 4), bool)], [np.zeros((4, 5))])
    with pytest.raises(ValueError, match="NaN"):
        pixel_auroc([np.ones((2, 2), bool)], [np.full((2, 2), np.nan)])
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro([np.ones((2, 2), bool)], [np.ones((2, 2))], fpr_limit=0)


def test_trapezoid_to_interpolates_at_the_limit():
    assert trapezoid_to([0, 1], [0, 1], 0.5) == pytest.approx(0.125)
    assert trapezoid_to([0, 0.5, 1], [1, 1, 0], 1.0) == pytest.approx(0.75)
    assert trapezoid_to([0, 0, 0.2, 1], [0, 1, 1, 1], 0.3) == pytest.approx(0.3)  # vertical first step
