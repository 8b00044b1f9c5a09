"""Decision thresholds for a region expert, fitted on its *deployed* outputs (numpy only).

Good images only (the usual case on a line): the image threshold is the
``1 - target_frr`` quantile of the good scores. That quantile cannot be estimated
from fewer than ``1 / target_frr`` images; then the threshold is the lowest good score plus a margin
(default 3) times the good scores' height above it, ``floor + 3 x (max - floor)``, for the
non-negative scores linecam experts produce: ``3 x max`` for a probability map (floor ~0),
and a threshold that catches defects for a feature-distance map, whose good floor is far
from zero — except that one good score standing alone far above the rest (more than
``ISOLATED_RATIO`` times as high above the floor as the second largest: an odd part, a
mislabelled defect, an augmentation artefact) counts only as that high, and the threshold
stays just above it — and ``details`` states what the data can actually promise: a one-sided
Clopper-Pearson upper bound on the true false-reject rate (``≈ 3 / n`` when no good
image exceeds the threshold, the "rule of three").

With defective examples as well, the threshold is the F1-optimal one (defective =
positive), placed in the middle of the optimal interval.

``sensitivity`` (> 0, default 1) is the operator's knob: the threshold's distance
above the median good score is divided by it, so ``sensitivity > 1`` lowers the
threshold (more parts rejected, fewer defects missed) and ``< 1`` raises it. It is
monotone and independent of the score's scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from linecam.bundle import Thresholds

#: Confidence of the stated false-reject-rate upper bounds.
CONFIDENCE = 0.95
#: Small-sample fallback: threshold = lowest good + this margin x (max good - lowest good)
#: (see ``_good_only``).
SMALL_N_MARGIN = 3.0
#: A largest good score this many times as high above the good floor as the second largest is
#: *isolated*: the margin is taken on ``ISOLATED_RATIO x`` the second's height instead, so one
#: image cannot triple the threshold.
#: 2, not less: near-zero probability scores vary by 1.5-1.8x between good images by chance (the
#: demo's own fit), which is no reason to warn.
ISOLATED_RATIO = 2.0


@dataclass(frozen=True)
class ThresholdFit:
    """One fitted threshold and how it was obtained (``details`` goes into the bundle)."""

    value: float
    method: str
    n_good: int
    n_bad: int = 0
    target_frr: float | None = None
    details: dict[str, Any] = field(default_factory=dict)


def frr_upper_bound(n_exceed: int, n: int, confidence: float = CONFIDENCE) -> float:
    """One-sided Clopper-Pearson upper bound on a rate after ``n_exceed`` hits in ``n`` trials.

    Solves ``P(Binomial(n, p) <= n_exceed) = 1 - confidence`` for ``p`` (bisection on the
    exact binomial CDF). For ``n_exceed == 0`` this is ``1 - (1 - confidence)**(1/n)``.
    """
    if n <= 0:
        return 1.0
    if not 0 <= n_exceed <= n:
        raise ValueError(f"n_exceed must be within [0, {n}], got {n_exceed}")
    if n_exceed == n:
        return 1.0
    alpha = 1.0 - confidence
    if n_exceed == 0:
        return 1.0 - alpha ** (1.0 / n)

    def cdf(p: float) -> float:
        # log-space terms: exact and stable for large n
        lp, lq = math.log(p), math.log1p(-p)
        logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq
                for i in range(n_exceed + 1)]
        m = max(logs)
        return math.exp(m) * sum(math.exp(v - m) for v in logs)

    lo, hi = n_exceed / n, 1.0 - 1e-15
    for _ in range(100):  # cdf decreases in p
        mid = 0.5 * (lo + hi)
        if cdf(mid) > alpha:
            lo = mid
        else:
            hi = mid
    return hi


def good_images_needed(target_frr: float, confidence: float = CONFIDENCE) -> int:
    """Good images needed, none of them above the threshold, for the Clopper-Pearson bound to
    show ``target_frr`` (``ln(1 - confidence) / ln(1 - target_frr)``: 299 for 1 % at 95 %)."""
    return int(math.ceil(math.log(1.0 - confidence) / math.log1p(-target_frr)))


def evidence_warning(fit: ThresholdFit, what: str = "good images", independent: int | None = None) -> str | None:
    """One loud line when ``fit`` rests on fewer good images than it takes to show its target
    rate even with none of them rejected (:func:`good_images_needed`). ``independent``: how many
    of ``fit.n_good`` are distinct parts (the rest jittered copies of them, which show a margin
    but no new part): the stated bound is then over those alone, since copies of one image are
    not independent trials."""
    needed = good_images_needed(fit.target_frr) if fit.target_frr is not None else 0
    n = fit.n_good if independent is None else min(independent, fit.n_good)
    if fit.target_frr is None or n >= needed:
        return None
    exceeding = int(fit.details.get("good_exceeding", 0))
    bound = (float(fit.details.get("frr_upper_bound", 1.0)) if n == fit.n_good
             else frr_upper_bound(min(exceeding, n), n))  # every exceeding one may be an original
    over = "" if n == fit.n_good else f", over the {n} distinct images: a copy is not a new part"
    return (f"the threshold rests on {fit.n_good} {what}: the false-reject rate on new good parts is only "
            f"bounded by {bound:.1%} ({CONFIDENCE:.0%} confidence{over}), not the {fit.target_frr:.1%} target; "
            f"showing {fit.target_frr:.1%} needs {needed} good images none of which is "
            f"rejected: give more good images, or check the false rejects on the line before trusting it")


def isolated_warning(fit: ThresholdFit, what: str = "good image") -> str | None:
    """One line when the fit found one isolated good score (see ``ISOLATED_RATIO``): the user
    should look at that image — a defective part in the good folder is the usual cause."""
    if "isolated_max" not in fit.details:
        return None
    return (f"one {what} scores {fit.details['isolated_max']:.4g}, far above all the others: the threshold "
            f"({fit.value:.4g}) is set from the rest and just accepts it; check that this image is really "
            "good (a defect in the good folder makes the line blind to it)")


def threshold_warning(fit: ThresholdFit, what: str = "good images", isolated: str = "good image",
                      independent: int | None = None) -> str | None:
    """The warnings an exporter logs and stores with its thresholds: too little evidence for the
    target rate (``what`` the fit rests on, ``independent`` of them distinct parts), and an
    isolated good score (``isolated``: which image, where the exporter knows); ``None`` when
    there is nothing to say."""
    lines = [w for w in (evidence_warning(fit, what, independent), isolated_warning(fit, isolated)) if w]
    return "; ".join(lines) or None


def _check(values: Any, what: str) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64).ravel()
    if a.size == 0:
        raise ValueError(f"no {what} given: fit thresholds on at least one image")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{what} contain NaN or inf: the model output is broken, re-export it")
    return a


def _apply_sensitivity(t: float, median_good: float, sensitivity: float) -> float:
    if not sensitivity > 0:
        raise ValueError(f"sensitivity must be > 0, got {sensitivity}")
    return float(median_good + (t - median_good) / sensitivity)


def _good_only(good: np.ndarray, target_frr: float, margin: float) -> tuple[float, str, dict[str, Any]]:
    if not margin >= 1:
        raise ValueError(f"margin must be >= 1, got {margin}")
    n = good.size
    med = float(np.median(good))
    gmax = float(good.max())
    if n >= math.ceil(1.0 / target_frr):
        # Empirical quantile as an order statistic: exactly k = floor(target_frr * n) good
        # scores lie at or above the threshold, placed midway to the next lower score.
        s = np.sort(good)
        k = int(math.floor(target_frr * n + 1e-9))
        lo, hi = float(s[n - k - 1]), float(s[n - k]) if k else float("inf")
        t = 0.5 * (lo + hi) if math.isfinite(hi) and hi > lo else float(np.nextafter(lo, np.inf))
        return t, "good_quantile", {"k_allowed": k}
    if good.min() >= 0:
        # Non-negative scores (every linecam expert's): a relative margin on the height above
        # the good floor (the lowest good score): t = floor + margin x (max - floor). For a
        # probability map the floor is ~0 and this is max x margin; a feature-distance map
        # (the cnn teacher's students) never goes near 0 for good parts, and margin x max there
        # put the threshold above every real defect (all missed, none rejected).
        # Observed tails of good scores are heavy (rare poses, glints) and 30-50 held-out
        # images do not show them: hence a margin, not the max itself.
        # One isolated good score would otherwise set the threshold alone: a student that
        # flags a glint on one augmented copy at 3x the others' scores put the threshold at
        # 9x the good bulk and above most real defects. It still stays accepted (t > gmax).
        floor = float(good.min())
        ref, rule = gmax, f"lowest good + {margin} x (max good - lowest good)"
        second = float(np.partition(good, n - 2)[n - 2]) if n >= 2 else 0.0
        if second > floor and gmax - floor > ISOLATED_RATIO * (second - floor):
            # Heights above the floor, like the margin: the same test for both kinds of map.
            ref = floor + ISOLATED_RATIO * (second - floor)
            rule = (f"lowest good + {margin} x {ISOLATED_RATIO} x (second-largest good - lowest good), not "
                    f"below the largest: the largest good score ({gmax:.4g}) stands "
                    f"{(gmax - floor) / (second - floor):.1f}x as high above the lowest ({floor:.4g}) as the "
                    f"second ({second:.4g}), isolated")
        t = max(floor + margin * (ref - floor), float(np.nextafter(gmax, np.inf)))
    else:  # scores with no natural zero: the same margin on the spread above the median
        spread = gmax - med if gmax > med else abs(gmax) * 0.05 or 1e-6
        t = gmax + (margin - 1.0) * spread
        rule = f"max good + {margin - 1.0} x (max - median)"
    note = (f"only {n} good images: the {1 - target_frr:.4g} quantile needs >= "
            f"{math.ceil(1 / target_frr)}; threshold = {rule}")
    details: dict[str, Any] = {"note": note, "margin": margin}
    if "isolated" in rule:
        details["isolated_max"] = gmax
    return t, "good_max_margin", details


def _fit(good: np.ndarray, bad: np.ndarray | None, target_frr: float, sensitivity: float,
         margin: float, what: str) -> ThresholdFit:
    if not 0 < target_frr < 1:
        raise ValueError(f"target_frr must be in (0, 1), got {target_frr}")
    med = float(np.median(good))
    t, method, details = _good_only(good, target_frr, margin)
    n_bad = 0
    if bad is not None and bad.size:
        n_bad = int(bad.size)
        details["good_only_threshold"] = t
        t, f1 = _f1_optimal(good, bad)
        method = "f1_optimal"
        details["f1"] = f1
    t = _apply_sensitivity(t, med, sensitivity)
    n_exceed = int(np.count_nonzero(good >= t))
    details.update({
        "score": what,
        "sensitivity": sensitivity,
        "good_median": med,
        "good_min": float(good.min()),
        "good_max": float(good.max()),
        "good_exceeding": n_exceed,
        "frr_observed": n_exceed / good.size,
        "frr_upper_bound": frr_upper_bound(n_exceed, good.size),
        "frr_upper_bound_confidence": CONFIDENCE,
    })
    if bad is not None and bad.size:
        details["recall_observed"] = float(np.count_nonzero(bad >= t) / bad.size)
    return ThresholdFit(value=float(t), method=method, n_good=int(good.size), n_bad=n_bad,
                        target_frr=target_frr, details=details)


def _f1_optimal(good: np.ndarray, bad: np.ndarray) -> tuple[float, float]:
    """Threshold maximising F1 (bad = positive, ``score >= t`` is positive)."""
    values = np.unique(np.concatenate([good, bad]))
    # Candidates between consecutive distinct scores, plus one above everything.
    cands = np.concatenate([[values[0]], (values[:-1] + values[1:]) / 2, [np.nextafter(values[-1], np.inf)]])
    gs, bs = np.sort(good), np.sort(bad)
    tp = bs.size - np.searchsorted(bs, cands, side="left")
    fp = gs.size - np.searchsorted(gs, cands, side="left")
    fn = bs.size - tp
    f1 = 2 * tp / np.maximum(2 * tp + fp + fn, 1)
    best = np.flatnonzero(f1 == f1.max())
    return float(cands[best[len(best) // 2]]), float(f1.max())


def fit_image_threshold(
    good_scores: Iterable[float] | np.ndarray,
    bad_scores: Iterable[float] | np.ndarray | None = None,
    target_frr: float = 0.01,
    sensitivity: float = 1.0,
    *,
    margin: float = SMALL_N_MARGIN,
) -> ThresholdFit:
    """Image-score threshold (``score >= value`` is NG); see the module docstring."""
    good = _check(good_scores, "good scores")
    bad = None if bad_scores is None else np.asarray(bad_scores, dtype=np.float64).ravel()
    if bad is not None and bad.size:
        bad = _check(bad, "bad scores")
    return _fit(good, bad, target_frr, sensitivity, margin, "image")


def fit_pixel_threshold(
    good_maps: Iterable[np.ndarray] | np.ndarray,
    target_frr: float = 0.01,
    sensitivity: float = 1.0,
    *,
    margin: float = SMALL_N_MARGIN,
) -> ThresholdFit:
    """Anomaly-map threshold such that good images produce no region.

    Fitted like the image threshold on each good map's *maximum* pixel: with it, at
    most about ``target_frr`` of good images show any pixel at or above the threshold.
    """
    maps = good_maps if isinstance(good_maps, np.ndarray) and good_maps.ndim >= 1 else list(good_maps)
    if isinstance(maps, np.ndarray):
        maxima = maps.reshape(maps.shape[0], -1).max(axis=1) if maps.ndim > 1 else maps
    else:
        if not maps:
            raise ValueError("no good anomaly maps given: fit thresholds on at least one image")
        maxima = np.asarray([float(np.max(m)) for m in maps])
    return _fit(_check(maxima, "good anomaly maps"), None, target_frr, sensitivity, margin, "pixel_max")


def to_thresholds(image: ThresholdFit, pixel: ThresholdFit, *, pooled_score: bool = False) -> Thresholds:
    """Both fits in the bundle's :class:`linecam.bundle.Thresholds` form.

    ``pooled_score``: the image score is the max of a mean-pooled anomaly map, hence never above
    the map's own max. A pixel threshold above the image threshold would then leave some NG frames
    without any region to show (the two are fitted on different statistics of the same good
    images: a small-sample margin on the spikier pixel maxima can land higher); it is capped at
    the image threshold, so that every NG frame has at least the region around its peak."""
    details_px = {"method": pixel.method, **pixel.details}
    pixel_value = pixel.value
    if pooled_score and pixel_value > image.value:
        details_px.update(fitted=pixel_value, capped_at_image_threshold=image.value)
        pixel_value = image.value
    return Thresholds(
        image=image.value,
        pixel=pixel_value,
        method=image.method,
        n_good=image.n_good,
        n_bad=image.n_bad,
        target_frr=image.target_frr,
        details={"image": {"method": image.method, **image.details}, "pixel": details_px},
    )


def fit_thresholds(
    good_scores: Iterable[float] | np.ndarray,
    good_maps: Iterable[np.ndarray] | np.ndarray,
    bad_scores: Iterable[float] | np.ndarray | None = None,
    target_frr: float = 0.01,
    sensitivity: float = 1.0,
) -> Thresholds:
    """Image and pixel thresholds in one call, as the bundle stores them."""
    return to_thresholds(
        fit_image_threshold(good_scores, bad_scores, target_frr, sensitivity),
        fit_pixel_threshold(good_maps, target_frr, sensitivity),
    )
