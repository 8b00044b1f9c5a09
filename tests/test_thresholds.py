"""Threshold fitting on samples whose answers are known."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from linecam.bundle import Thresholds
from linecam.calibration import (
    fit_image_threshold,
    fit_pixel_threshold,
    fit_thresholds,
    frr_upper_bound,
    to_thresholds,
)


def test_quantile_with_enough_good_images() -> None:
    good = np.arange(1000) / 1000.0  # 0.000 .. 0.999
    fit = fit_image_threshold(good, target_frr=0.01)
    assert fit.method == "good_quantile"
    # Exactly 10 of 1000 good scores (0.990 .. 0.999) may be rejected: the threshold
    # lies between 0.989 and 0.990.
    assert 0.989 < fit.value <= 0.990
    assert int(np.sum(good >= fit.value)) == 10
    assert fit.details["frr_observed"] == pytest.approx(0.01)
    assert fit.n_good == 1000 and fit.target_frr == 0.01
    # Order of the input does not matter.
    assert fit_image_threshold(good[::-1].copy(), target_frr=0.01).value == fit.value


def test_quantile_other_rate() -> None:
    good = np.arange(200, dtype=float)
    fit = fit_image_threshold(good, target_frr=0.05)  # 10 of 200 allowed
    assert fit.value == pytest.approx(189.5)
    assert fit.details["good_exceeding"] == 10


def test_small_n_falls_back_to_max_with_margin_and_states_uncertainty() -> None:
    good = np.linspace(0.1, 0.3, 30)  # 30 < 1 / 0.01
    fit = fit_image_threshold(good, target_frr=0.01)
    assert fit.method == "good_max_margin"
    assert fit.value == pytest.approx(0.1 + 3 * 0.2)  # lowest good + 3 x (max - lowest) (non-negative scores)
    assert fit.details["good_exceeding"] == 0
    # 0 rejects in 30: the true FRR is only known to be below 1 - 0.05**(1/30) (~ rule of three).
    ub = fit.details["frr_upper_bound"]
    assert ub == pytest.approx(1 - 0.05 ** (1 / 30))
    assert 0.09 < ub < 3 / 30
    assert "only 30 good images" in fit.details["note"]


def test_one_isolated_good_score_does_not_triple_the_threshold() -> None:
    from linecam.calibration.thresholds import isolated_warning, threshold_warning

    bulk = np.linspace(0.1, 0.3, 63)
    # 0.9 stands 0.8 above the lowest good (0.1): 4x as high as the second largest (0.3, 0.2 above).
    fit = fit_image_threshold(np.append(bulk, 0.9), target_frr=0.01)
    # The margin applies to 2 x the second's height (0.4), not to the isolated 0.8 (-> 2.5).
    assert fit.value == pytest.approx(0.1 + 3 * 2 * 0.2)
    assert fit.details["good_exceeding"] == 0  # still accepted
    assert fit.details["isolated_max"] == pytest.approx(0.9)
    assert "isolated" in fit.details["note"]
    assert "0.9" in isolated_warning(fit) and "really good" in threshold_warning(fit)
    # Just above the threshold it would otherwise give, the isolated score sets it itself.
    assert fit_image_threshold(np.append(bulk, 2.5)).value == pytest.approx(np.nextafter(2.5, 3))
    # Not isolated (<= 2 x the second's height; the demo's fit had 1.8x at scores ~0.005): the plain
    # rule, no warning.
    plain = fit_image_threshold(np.append(bulk, 0.45))
    assert plain.value == pytest.approx(0.1 + 3 * 0.35) and isolated_warning(plain) is None
    # Continuous at the boundary: a hair either side of 2 x the second's height gives the same threshold.
    lo, hi = (fit_image_threshold(np.append(bulk, 0.5 + d)).value for d in (-1e-9, 1e-9))
    assert lo == pytest.approx(hi, abs=1e-6)


def test_a_distance_map_with_a_floor_gets_a_threshold_defects_can_reach() -> None:
    """A kNN feature-distance map (the cnn teacher's students) scores good parts around a floor
    far from zero: 3 x the largest good put the threshold at ~2.6 here, above real defects
    (~1.1: a real-photo student missed all of them). The margin is on the height above the floor,
    so the threshold moves with an offset of the map and scales with it."""
    good = np.linspace(0.80, 0.86, 64)
    fit = fit_image_threshold(good)
    assert fit.value == pytest.approx(0.80 + 3 * 0.06)
    assert good.max() < fit.value < 1.1
    for c in (0.0, 5.0, 100.0):
        assert fit_image_threshold(good + c).value == pytest.approx(fit.value + c)
    assert fit_image_threshold(good * 10).value == pytest.approx(fit.value * 10)


def test_small_n_margin_for_scores_without_a_natural_zero() -> None:
    good = np.linspace(-1.0, 1.0, 21)  # median 0, max 1
    fit = fit_image_threshold(good, margin=3.0)
    assert fit.value == pytest.approx(3.0)  # max + (3 - 1) x (max - median)
    assert fit_image_threshold(good, margin=1.5).value == pytest.approx(1.5)
    with pytest.raises(ValueError, match="margin"):
        fit_image_threshold(good, margin=0.5)


def test_clopper_pearson_known_values() -> None:
    # Reference values from scipy.stats.beta.ppf(0.95, k + 1, n - k).
    assert frr_upper_bound(10, 1000) == pytest.approx(0.0169031751, rel=1e-6)
    assert frr_upper_bound(1, 20) == pytest.approx(0.2161061642, rel=1e-6)
    assert frr_upper_bound(0, 100) == pytest.approx(1 - 0.05 ** 0.01)
    assert frr_upper_bound(5, 5) == 1.0
    assert frr_upper_bound(0, 0) == 1.0


def test_f1_with_separable_bad_scores_lies_between_classes() -> None:
    rng = np.random.default_rng(0)
    good = rng.uniform(0.0, 0.4, 50)
    bad = rng.uniform(0.6, 1.0, 20)
    fit = fit_image_threshold(good, bad, target_frr=0.01)
    assert fit.method == "f1_optimal" and fit.n_bad == 20
    assert good.max() < fit.value <= bad.min()
    assert fit.details["f1"] == 1.0
    assert fit.details["recall_observed"] == 1.0 and fit.details["good_exceeding"] == 0
    assert fit.value == pytest.approx((good.max() + bad.min()) / 2)


def test_f1_overlapping_hand_computed() -> None:
    # t=0.4: tp 3, fp 1 -> F1 6/7; t=0.55: 4/6; t=0.65: 4/5; so the optimum is 0.4.
    fit = fit_image_threshold([0.1, 0.2, 0.3, 0.6], [0.5, 0.7, 0.8])
    assert fit.value == pytest.approx(0.4)
    assert fit.details["f1"] == pytest.approx(6 / 7)


@pytest.mark.parametrize("with_bad", [False, True])
@pytest.mark.parametrize("n_good", [20, 500])
def test_sensitivity_is_monotone(with_bad: bool, n_good: int) -> None:
    rng = np.random.default_rng(1)
    good = rng.gamma(2.0, 0.05, n_good)
    bad = rng.uniform(0.5, 1.0, 10) if with_bad else None
    values = [fit_image_threshold(good, bad, sensitivity=s).value for s in (0.5, 0.8, 1.0, 1.5, 3.0, 10.0)]
    assert all(a > b for a, b in zip(values, values[1:]))  # more sensitive -> lower threshold
    assert values[-1] > np.median(good)  # never below the median good score
    base = fit_image_threshold(good, bad)
    assert base.value == values[2]
    with pytest.raises(ValueError):
        fit_image_threshold(good, sensitivity=0.0)


def test_pixel_threshold_from_per_image_max() -> None:
    maps = np.zeros((40, 1, 16, 16), np.float32)
    for i in range(40):
        maps[i, 0, i % 16, (3 * i) % 16] = 0.01 * (i + 1)  # one hot pixel per image: max 0.01 .. 0.40
    fit = fit_pixel_threshold(maps)
    assert fit.value == pytest.approx(0.01 + 3 * 0.39)  # above every good maximum: no good image shows a region
    assert fit.details["score"] == "pixel_max" and fit.n_good == 40
    # Same from a list of 2-D maps.
    assert fit_pixel_threshold([m[0] for m in maps]).value == fit.value
    big = fit_pixel_threshold(np.concatenate([maps] * 5), target_frr=0.05)  # 200 maps: quantile
    assert big.method == "good_quantile" and big.details["good_exceeding"] == 10


def test_to_thresholds_is_bundle_thresholds() -> None:
    good = np.linspace(0, 1, 50)
    t = fit_thresholds(good, [np.full((4, 4), v) for v in good * 2])
    assert isinstance(t, Thresholds)
    assert t.image == pytest.approx(3.0) and t.pixel == pytest.approx(6.0)
    assert t.n_good == 50 and t.target_frr == 0.01 and t.method == "good_max_margin"
    again = Thresholds.model_validate(json.loads(json.dumps(t.model_dump(mode="json"))))
    assert again == t
    assert to_thresholds(fit_image_threshold(good), fit_pixel_threshold(good[:, None])).image == t.image


def test_a_pooled_score_caps_the_pixel_threshold_so_every_ng_frame_has_a_region() -> None:
    """Image score = max of the mean-pooled map <= the map's max: with the pixel threshold at most
    the image threshold, a frame over the image threshold has a pixel over the pixel threshold."""
    good = np.linspace(0, 1, 50)
    image, pixel = fit_image_threshold(good), fit_pixel_threshold(good[:, None] * 2)  # 3.0 and 6.0
    assert to_thresholds(image, pixel).pixel == pytest.approx(6.0)  # scores of another kind: untouched
    t = to_thresholds(image, pixel, pooled_score=True)
    assert t.pixel == t.image == pytest.approx(3.0)
    assert t.details["pixel"]["fitted"] == pytest.approx(6.0)
    assert t.details["pixel"]["capped_at_image_threshold"] == pytest.approx(3.0)
    low = fit_pixel_threshold(good[:, None] * 0.5)  # below the image threshold: as fitted, no note
    t = to_thresholds(image, low, pooled_score=True)
    assert t.pixel == pytest.approx(low.value) and "capped_at_image_threshold" not in t.details["pixel"]


@pytest.mark.parametrize("bad_input", [[], [0.1, math.nan], [0.1, math.inf]])
def test_rejects_empty_and_non_finite(bad_input: list[float]) -> None:
    with pytest.raises(ValueError):
        fit_image_threshold(bad_input)


def test_rejects_bad_target_frr() -> None:
    with pytest.raises(ValueError, match="target_frr"):
        fit_image_threshold([0.1, 0.2], target_frr=0.0)


def test_good_images_needed_and_the_loud_warning_when_the_evidence_is_short():
    from linecam.calibration.thresholds import evidence_warning, good_images_needed

    assert good_images_needed(0.01) == 299  # rule of three: 3 / 0.01, exactly from Clopper-Pearson
    assert good_images_needed(0.05) == 59
    few = fit_image_threshold(np.linspace(0, 1, 12), target_frr=0.01)
    msg = evidence_warning(few)
    assert msg is not None and "299 good images" in msg and "12 good images" in msg
    assert evidence_warning(fit_image_threshold(np.linspace(0, 1, 298), target_frr=0.01)) is not None
    assert evidence_warning(fit_image_threshold(np.linspace(0, 1, 299), target_frr=0.01)) is None


def test_evidence_warning_bounds_over_distinct_images_not_jittered_copies() -> None:
    """64 good scores, 10 of them distinct parts: the stated bound is the one 10 images give
    (25.9 %), not 64's (4.6 %); copies of one part are not independent trials."""
    from linecam.calibration.thresholds import evidence_warning, frr_upper_bound, threshold_warning

    fit = fit_image_threshold(np.linspace(0.1, 0.2, 64))
    plain = evidence_warning(fit, "good images")
    assert f"{frr_upper_bound(0, 64):.1%}" in plain and "distinct" not in plain
    w = threshold_warning(fit, "good images (10 held out + 54 augmented copies of them)", independent=10)
    assert f"bounded by {frr_upper_bound(0, 10):.1%} (95% confidence, over the 10 distinct images" in w and "299 good images" in w
    assert frr_upper_bound(0, 10) > 5 * frr_upper_bound(0, 64)  # the difference the wording carries
    # Enough distinct images: no warning, whatever the copies.
    big = fit_image_threshold(np.linspace(0.1, 0.2, 400))
    assert evidence_warning(big, independent=300) is None and evidence_warning(big, independent=100) is not None
