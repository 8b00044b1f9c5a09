"""Detection metrics for region experts (numpy only, no sklearn; OpenCV is imported lazily
for connected components in :func:`aupro`): used on the workstation and the edge, e.g. by
``linecam evaluate``.

Ties are handled exactly (AUROC is the Mann-Whitney U statistic with average ranks),
so a model that outputs one constant score gets 0.5, never a lucky 1.0.

Image level: :func:`auroc` (:func:`auroc_difference`: two scorings compared, with an interval), :func:`roc_curve`, :func:`rates_at` (F1, false-reject rate on
good items, miss rate on defective ones at a threshold; score >= threshold is NG, the
daemon's rule). Pixel level (MVTec AD conventions): :func:`pixel_auroc` and :func:`aupro`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def _ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    order = np.argsort(values, kind="mergesort")
    sorted_v = values[order]
    ranks = np.empty(values.size, dtype=np.float64)
    # Boundaries of runs of equal values.
    edges = np.flatnonzero(np.diff(sorted_v)) + 1
    starts = np.concatenate([[0], edges])
    ends = np.concatenate([edges, [values.size]])
    avg = (starts + ends + 1) / 2.0  # mean of ranks start+1 .. end
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve; ``labels`` 1 = defective (positive). NaN if one class is absent."""
    y = np.asarray(labels).ravel().astype(bool)
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in length")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = _ranks(s)
    u = r[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def auroc_difference(labels: np.ndarray, a: np.ndarray, b: np.ndarray, *, z: float = 1.959964) -> tuple[float, float, float]:
    """``AUROC(a) - AUROC(b)`` of two scorings of the same images, with DeLong's standard error
    for *paired* AUROCs (DeLong, DeLong & Clarke-Pearson 1988; the fast rank form of Sun & Xu 2014):
    ``(difference, low, high)``, the interval ``difference ± z·se`` (z = 1.96: 95 %).

    Why: a quantized model's AUROC drop measured on a few dozen images moves by about a point
    from one equally valid draw of those images to the next; the interval says whether a drop
    is larger than that noise. All NaN if one class is absent."""
    y = np.asarray(labels).ravel().astype(bool)
    m, n = int(y.sum()), int((~y).sum())
    if m == 0 or n == 0:
        return float("nan"), float("nan"), float("nan")
    v10, v01, aucs = [], [], []
    for s in (a, b):
        s = np.asarray(s, dtype=np.float64).ravel()
        if s.shape != y.shape:
            raise ValueError(f"labels {y.shape} and scores {s.shape} differ in length")
        r_all, r_pos, r_neg = _ranks(s), _ranks(s[y]), _ranks(s[~y])
        # Structural components: each defective image's share of good images it outranks, and
        # each good image's share of defective images that outrank it (ties count one half).
        v10.append((r_all[y] - r_pos) / n)
        v01.append(1.0 - (r_all[~y] - r_neg) / m)
        aucs.append(float(v10[-1].mean()))
    d = aucs[0] - aucs[1]
    var = 0.0
    for v, k in ((v10, m), (v01, n)):
        if k > 1:
            c = np.cov(np.vstack(v))
            var += (c[0, 0] + c[1, 1] - 2 * c[0, 1]) / k
    se = float(np.sqrt(max(var, 0.0)))
    return d, d - z * se, d + z * se


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two arrays (flattened); NaN if either is constant."""
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"arrays {x.shape} and {y.shape} differ in size")
    x = x - x.mean()
    y = y - y.mean()
    den = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / den) if den > 0 else float("nan")


# --------------------------------------------------------------------------- image level


def _check_pair(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).ravel().astype(bool)
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in length")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or Inf")
    return y, s


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve, ``labels`` 1 = defective, a score >= threshold counts as defective.

    Returns ``(fpr, tpr, thresholds)``: one point per distinct score, thresholds
    decreasing, preceded by ``(0, 0)`` at threshold ``+inf`` (sklearn's convention,
    without dropping collinear points). Tied scores move the curve diagonally, so
    ``np.trapezoid(tpr, fpr)`` equals :func:`auroc`. A class that is absent makes its
    rate NaN.
    """
    y, s = _check_pair(labels, scores)
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    # Last index of every run of equal scores: the point after all of them count as positive.
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), s_sorted.size - 1] if s.size else np.zeros(0, int)
    tps = np.cumsum(y_sorted)[last].astype(np.float64)
    fps = (last + 1) - tps
    n_pos, n_neg = float(y.sum()), float(y.size - y.sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = np.r_[0.0, tps] / n_pos if n_pos else np.full(tps.size + 1, np.nan)
        fpr = np.r_[0.0, fps] / n_neg if n_neg else np.full(fps.size + 1, np.nan)
    thresholds = np.r_[np.inf, s_sorted[last]]
    return fpr, tpr, thresholds


@dataclass(frozen=True)
class Rates:
    """The confusion at one threshold (score >= threshold: NG); rates NaN when undefined."""

    threshold: float
    tp: int  # defective, flagged NG
    fp: int  # good, flagged NG (false reject)
    tn: int
    fn: int  # defective, passed OK (missed)

    @property
    def false_reject_rate(self) -> float:
        """Share of good items flagged NG."""
        n = self.fp + self.tn
        return self.fp / n if n else float("nan")

    @property
    def miss_rate(self) -> float:
        """Share of defective items passed OK (1 - recall)."""
        n = self.tp + self.fn
        return self.fn / n if n else float("nan")

    @property
    def precision(self) -> float:
        n = self.tp + self.fp
        return self.tp / n if n else float("nan")

    @property
    def recall(self) -> float:
        n = self.tp + self.fn
        return self.tp / n if n else float("nan")

    @property
    def f1(self) -> float:
        """``2 TP / (2 TP + FP + FN)``; NaN when there is nothing defective and nothing flagged."""
        n = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / n if n else float("nan")

    def as_dict(self) -> dict[str, float | int]:
        return {"threshold": self.threshold, "tp": self.tp, "fp": self.fp, "tn": self.tn, "fn": self.fn,
                "f1": self.f1, "precision": self.precision, "recall": self.recall,
                "false_reject_rate": self.false_reject_rate, "miss_rate": self.miss_rate}


def rates_at(labels: np.ndarray, scores: np.ndarray, threshold: float) -> Rates:
    """Counts and rates at ``threshold`` (the daemon's rule: score >= threshold is NG)."""
    y, s = _check_pair(labels, scores)
    ng = s >= threshold
    tp = int(np.sum(ng & y))
    fp = int(np.sum(ng & ~y))
    return Rates(float(threshold), tp=tp, fp=fp, tn=int(np.sum(~y)) - fp, fn=int(np.sum(y)) - tp)


def f1_at(labels: np.ndarray, scores: np.ndarray, threshold: float) -> float:
    """F1 of "defective" at ``threshold`` (score >= threshold is NG); see :attr:`Rates.f1`."""
    return rates_at(labels, scores, threshold).f1


def false_reject_rate(labels: np.ndarray, scores: np.ndarray, threshold: float) -> float:
    """Share of good items (label 0) scoring >= ``threshold``."""
    return rates_at(labels, scores, threshold).false_reject_rate


def miss_rate(labels: np.ndarray, scores: np.ndarray, threshold: float) -> float:
    """Share of defective items (label 1) scoring below ``threshold``."""
    return rates_at(labels, scores, threshold).miss_rate


# --------------------------------------------------------------------------- pixel level
#
# ``masks`` / ``maps``: an (N, h, w) array or a sequence of (h, w) arrays (sizes may differ
# between items, not within a pair); a mask is truthy on defect pixels. Pixel metrics pool
# the pixels of all images, good and defective, as MVTec AD's evaluation does.

#: Up to this many pixels in all, pixel metrics are exact (a sort over every pixel, about
#: 40 bytes per pixel at the peak); above it they use a histogram (see :func:`pixel_auroc`).
MAX_EXACT_PIXELS = 10_000_000
#: Histogram bins above :data:`MAX_EXACT_PIXELS`.
HIST_BINS = 1 << 16


def _pairs(masks: Sequence[np.ndarray] | np.ndarray,
           maps: Sequence[np.ndarray] | np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    if len(masks) != len(maps):
        raise ValueError(f"{len(masks)} masks but {len(maps)} maps")
    out = []
    for i, (m, a) in enumerate(zip(masks, maps)):
        m, a = np.asarray(m), np.asarray(a)
        if m.shape != a.shape or a.ndim != 2:
            raise ValueError(f"item {i}: mask {m.shape} and map {a.shape} must be the same 2-d shape")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"item {i}: the map contains NaN or Inf")
        out.append((m.astype(bool, copy=False), a))
    return out


def _hist_edges(maps: list[np.ndarray], bins: int, sample: int = 1_000_000) -> np.ndarray:
    """Increasing bin edges from the quantiles of an evenly strided (deterministic) sample of
    all map values, plus the global minimum, so that every value falls in a bin. Equal values
    always share a bin, so ties stay ties."""
    n = sum(a.size for a in maps)
    step = max(1, n // sample)
    pooled = np.concatenate([a.ravel()[::step] for a in maps])
    lo = min(float(a.min()) for a in maps)
    q = np.quantile(pooled.astype(np.float64), np.linspace(0.0, 1.0, bins + 1)[1:-1])
    return np.unique(np.r_[lo, q])


def _bin_index(edges: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Index k of the bin [edges[k], edges[k+1]) holding each value (the last bin is open)."""
    return np.searchsorted(edges, values.ravel(), side="right") - 1


def pixel_auroc(masks: Sequence[np.ndarray] | np.ndarray, maps: Sequence[np.ndarray] | np.ndarray, *,
                max_exact: int = MAX_EXACT_PIXELS, bins: int = HIST_BINS) -> float:
    """AUROC of all pixels pooled (defect pixels positive); NaN if one class is absent.

    Up to ``max_exact`` pixels: exact (:func:`auroc`, ties averaged). Above: pixels are
    counted in ``bins`` bins whose edges are quantiles of a deterministic strided sample,
    image by image (memory stays one image plus the histograms), and the AUROC is the
    Mann-Whitney statistic of the two histograms with pixels of the same bin counted as
    ties. Its error is at most half the share of (defect, background) pixel pairs that
    share a bin, i.e. ``0.5 * sum_k pos_k * neg_k / (P * N)`` (about ``0.5 / bins`` for
    well-spread scores).
    """
    pairs = _pairs(masks, maps)
    n = sum(a.size for _, a in pairs)
    if n == 0:
        return float("nan")
    if n <= max_exact:
        return auroc(np.concatenate([m.ravel() for m, _ in pairs]),
                     np.concatenate([a.ravel() for _, a in pairs]))
    edges = _hist_edges([a for _, a in pairs], bins)
    pos = np.zeros(edges.size, np.float64)
    neg = np.zeros(edges.size, np.float64)
    for m, a in pairs:
        k = _bin_index(edges, a)
        mm = m.ravel()
        pos += np.bincount(k[mm], minlength=edges.size)
        neg += np.bincount(k[~mm], minlength=edges.size)
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    neg_below = np.cumsum(neg) - neg  # background pixels in lower bins
    return float((pos * (neg_below + 0.5 * neg)).sum() / (n_pos * n_neg))


def _region_weights(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """(per-pixel label of its connected defect region (0 = background), number of regions);
    8-connectivity, as MVTec AD's evaluation (``scipy.ndimage.label`` with a 3x3 structure)."""
    import cv2

    n, lab = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    return lab, n - 1


def pro_curve(masks: Sequence[np.ndarray] | np.ndarray, maps: Sequence[np.ndarray] | np.ndarray, *,
              max_exact: int = MAX_EXACT_PIXELS, bins: int = HIST_BINS) -> tuple[np.ndarray, np.ndarray]:
    """The per-region-overlap curve ``(fpr, pro)``, fpr increasing, starting at (0, 0) and
    ending at (1, 1) (MVTec AD's ``compute_pro``).

    At a threshold t (a pixel >= t is anomalous): PRO = mean over every connected defect
    region of every mask of the share of its pixels >= t; FPR = share of the background
    pixels of all images >= t. Exact (one point per distinct map value, via one sort) up
    to ``max_exact`` pixels; above, one point per histogram edge (``bins`` quantile edges,
    see :func:`pixel_auroc`), which is exact at those thresholds. Empty arrays when there
    is no defect region or no background pixel.
    """
    pairs = _pairs(masks, maps)
    labelled = [_region_weights(m) for m, _ in pairs]
    n_regions = sum(k for _, k in labelled)
    n_bg = sum(int((~m).sum()) for m, _ in pairs)
    if n_regions == 0 or n_bg == 0:
        return np.zeros(0), np.zeros(0)

    def pixel_weights(lab: np.ndarray, k: int) -> np.ndarray:
        # Each defect pixel carries 1 / (regions * its region's size): summed over the pixels
        # >= t, that is the mean over regions of each region's overlap.
        sizes = np.bincount(lab.ravel(), minlength=k + 1).astype(np.float64)
        w = np.zeros(k + 1, np.float64)
        w[1:] = 1.0 / (n_regions * sizes[1:])
        return w[lab.ravel()]

    n = sum(a.size for _, a in pairs)
    if n <= max_exact:
        scores = np.concatenate([a.ravel() for _, a in pairs])
        pro_w = np.concatenate([pixel_weights(lab, k) for lab, k in labelled])
        bg = np.concatenate([(lab.ravel() == 0) for lab, _ in labelled])
        order = np.argsort(-scores, kind="mergesort")
        s_sorted = scores[order]
        del scores
        pro = np.cumsum(pro_w[order])
        del pro_w
        fp = np.cumsum(bg[order])
        last = np.r_[np.flatnonzero(np.diff(s_sorted)), s_sorted.size - 1]
        pro, fpr = pro[last], fp[last] / n_bg
    else:
        edges = _hist_edges([a for _, a in pairs], bins)
        pro_h = np.zeros(edges.size, np.float64)
        bg_h = np.zeros(edges.size, np.float64)
        for (_, a), (lab, k) in zip(pairs, labelled):
            idx = _bin_index(edges, a)
            flat = lab.ravel()
            pro_h += np.bincount(idx, weights=pixel_weights(lab, k), minlength=edges.size)
            bg_h += np.bincount(idx[flat == 0], minlength=edges.size)
        # Pixels >= edges[j] are those of bins j..end: cumulative sums from the top.
        pro = np.cumsum(pro_h[::-1])
        fpr = np.cumsum(bg_h[::-1]) / n_bg
    np.clip(pro, None, 1.0, out=pro)
    np.clip(fpr, None, 1.0, out=fpr)
    return np.r_[0.0, fpr, 1.0], np.r_[0.0, pro, 1.0]


def trapezoid_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under ``y(x)`` (x non-decreasing) from x[0] to ``x_max``, with y
    interpolated linearly at ``x_max`` when it falls between two points."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    keep = x <= x_max
    xs, ys = x[keep], y[keep]
    area = float(np.sum(0.5 * (ys[1:] + ys[:-1]) * np.diff(xs)))
    if keep.all() or xs.size == 0 or xs[-1] == x_max:
        return area
    j = xs.size  # first point beyond x_max (x is sorted)
    y_at = y[j - 1] + (y[j] - y[j - 1]) * (x_max - x[j - 1]) / (x[j] - x[j - 1])
    return area + 0.5 * (y[j - 1] + y_at) * (x_max - x[j - 1])


def aupro(masks: Sequence[np.ndarray] | np.ndarray, maps: Sequence[np.ndarray] | np.ndarray,
          fpr_limit: float = 0.3, *, max_exact: int = MAX_EXACT_PIXELS, bins: int = HIST_BINS) -> float:
    """Area under the PRO curve (:func:`pro_curve`) from FPR 0 to ``fpr_limit``, divided by
    ``fpr_limit`` (MVTec AD's AU-PRO: 1.0 is perfect, a map that ranks every defect pixel
    below the background scores 0). NaN when there is no defect region or no background.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    fpr, pro = pro_curve(masks, maps, max_exact=max_exact, bins=bins)
    if fpr.size == 0:
        return float("nan")
    return trapezoid_to(fpr, pro, fpr_limit) / fpr_limit
