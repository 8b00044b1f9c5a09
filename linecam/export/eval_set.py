"""The held-out evaluation set every exporter fits thresholds on (and the gate measures on):
held-out good images as they are, jittered copies of them, synthetic anomalies on them and any
real defective images. One definition, shared by ``fit``, ``distil`` and ``text-expert``.

Why jittered copies: a 20 % split of a typical folder is a dozen images, which miss the good
tail: a threshold fitted on 12 held-out images rejected 13 % of new good parts for a 1 % target
(issue 13). The copies (shifts, flips, light, from :class:`AnomalySampler`) are no substitute for
more good images, and the exporters say so (:func:`note_threshold_warning`), but they show the
margin the held-out originals alone cannot.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from linecam.bundle import Thresholds
from linecam.calibration.thresholds import ThresholdFit, threshold_warning
from linecam.export.images import SourceImage
from linecam.export.sampler import AnomalySampler
from linecam.preprocess import PreprocessSpec, Preprocessor

logger = logging.getLogger(__name__)

#: Good images (held-out ones, then jittered copies) that thresholds and the gate rest on by default.
EVAL_GOOD = 64


@dataclass
class EvalSet:
    x: np.ndarray  # [N, 3, H, W]
    labels: np.ndarray  # [N] 1 = defective
    masks: np.ndarray  # [N, H, W] (zeros for good and for real bad images without masks)
    kinds: list[str]  # "good", "synthetic", "bad"


def eval_set(hold: Sequence[SourceImage], spec: PreprocessSpec, seed: int, n_good: int, n_bad: int,
             bad_images: Sequence[SourceImage] = ()) -> EvalSet:
    """Held-out good images (as they are, then jittered copies up to ``n_good``), ``n_bad``
    synthetic anomalies on them, and any real defective images."""
    pre = Preprocessor(spec)
    h, w = spec.input_size
    xs, ys, ms, kinds = [], [], [], []
    for s in hold:
        xs.append(pre(s.image, s.bit_depth, copy=True)[0])
        ys.append(0)
        ms.append(np.zeros((h, w), np.float32))
        kinds.append("good")
    good_sampler = AnomalySampler(hold, spec, np.random.default_rng([seed, 13]), anomaly_ratio=0.0)
    bad_sampler = AnomalySampler(hold, spec, np.random.default_rng([seed, 17]), anomaly_ratio=1.0)
    for sampler, n, label, kind in ((good_sampler, n_good - len(hold), 0, "good"),
                                    (bad_sampler, n_bad, 1, "synthetic")):
        for _ in range(max(0, n)):
            x = np.empty((3, h, w), np.float32)
            y = np.empty((1, h, w), np.float32)
            sampler.sample(x, y)
            xs.append(x)
            ys.append(label)
            ms.append((y[0] >= 0.5).astype(np.float32))
            kinds.append(kind)
    for s in bad_images:
        xs.append(pre(s.image, s.bit_depth, copy=True)[0])
        ys.append(1)
        ms.append(np.zeros((h, w), np.float32))
        kinds.append("bad")
    return EvalSet(np.stack(xs), np.asarray(ys), np.stack(ms), kinds)


def _good_image(hold: Sequence[SourceImage], index: int) -> str:
    """What the ``index``-th good image of an :func:`eval_set` is, for a warning that asks the
    user to look at it (the held-out images come first, then their jittered copies)."""
    if index < len(hold):
        return f"good image ({hold[index].path.name})"
    return f"good image (a jittered copy of one of the {len(hold)} held-out images)"


def note_threshold_warning(thresholds: Thresholds, fit: ThresholdFit, hold: Sequence[SourceImage],
                           good_scores: np.ndarray) -> None:
    """Log the loud ``THRESHOLD:`` line of a fit on an :func:`eval_set`'s good images
    (``good_scores``, held-out originals first) and store it in ``thresholds.details["warning"]``,
    if there is anything to say: too few distinct images for the target rate, or one isolated
    good score (named)."""
    n = len(hold)
    warning = threshold_warning(fit, f"good images ({n} held out + {len(good_scores) - n} augmented copies of them)",
                                _good_image(hold, int(np.argmax(good_scores))), independent=n)
    if warning:
        logger.warning("THRESHOLD: %s", warning)
        thresholds.details["warning"] = warning
