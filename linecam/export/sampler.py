"""Training samples for region experts: good images, lightly augmented, some made anomalous.

Shared by the scratch expert's training (:mod:`linecam.export.scratch`), the distillation pool
and the held-out evaluation set (:mod:`linecam.export.pool`, :mod:`linecam.export.distil`), so a
student is trained and gated on anomalies painted exactly as its teacher's were.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
import torch

from linecam.export.anomalies import synthesize
from linecam.export.images import SourceImage
from linecam.preprocess import PreprocessSpec, Preprocessor


class AnomalySampler:
    """Training batches: good images, lightly augmented, half of them made anomalous.

    Anomalies are painted on the (augmented) source image and the result goes
    through the bundle's :class:`Preprocessor`; the mask follows the same crop and
    resize, so targets line up with the model input pixel for pixel.
    """

    def __init__(self, images: Sequence[SourceImage], spec: PreprocessSpec, rng: np.random.Generator, *,
                 anomaly_ratio: float = 0.5, recipe_weights: dict[str, float] | None = None,
                 max_anomalies: int = 2, max_shift: float = 0.03, max_gain: float = 0.08) -> None:
        self.images = images
        self.pre = Preprocessor(spec)
        self.rng = rng
        self.anomaly_ratio = anomaly_ratio
        self.recipe_weights = recipe_weights
        self.max_anomalies = max(1, max_anomalies)
        self.max_shift = max_shift
        self.max_gain = max_gain
        self._interp = cv2.INTER_AREA

    def _augment(self, img: np.ndarray, bit_depth: int) -> np.ndarray:
        rng = self.rng
        h, w = img.shape[:2]
        dx, dy = rng.uniform(-self.max_shift, self.max_shift, 2) * (w, h)
        m = np.float32([[1, 0, dx], [0, 1, dy]])
        out = cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
        out = out.reshape(img.shape)
        gain = 1.0 + rng.uniform(-self.max_gain, self.max_gain)
        maxv = float(2**bit_depth - 1)
        # Brighter, but never clipped: a clipped highlight is a plateau without texture, a defect
        # painted onto a "good" copy (the encoder expert rightly flags it, and thresholds fitted on
        # such copies then rise above real defects).
        gain = min(gain, max(1.0, maxv / max(float(out.max()), 1.0)))
        return np.clip(out.astype(np.float32) * gain, 0, maxv).astype(img.dtype)

    def sample(self, x: np.ndarray, y: np.ndarray) -> None:
        """Fill one model input ``x`` [3, H, W] and target ``y`` [1, H, W]."""
        rng = self.rng
        src = self.images[int(rng.integers(len(self.images)))]
        img = self._augment(src.image, src.bit_depth)
        if rng.random() < self.anomaly_ratio:
            # Sometimes several anomalies per image: more positive pixels per step of
            # compute, and the net learns that defects need not be alone.
            mask = None
            for _ in range(int(rng.integers(1, self.max_anomalies + 1))):
                donor = self.images[int(rng.integers(len(self.images)))].image
                img, m = synthesize(rng, img, donor, weights=self.recipe_weights)
                mask = m if mask is None else np.maximum(mask, m)
            h, w = y.shape[-2:]
            y[0] = cv2.resize(self.pre.crop(mask), (w, h), interpolation=self._interp)
        else:
            y[0] = 0.0
        x[:] = self.pre(img, src.bit_depth)[0]

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = self.pre.spec.input_size
        x = np.empty((n, 3, h, w), np.float32)
        y = np.empty((n, 1, h, w), np.float32)
        for i in range(n):
            self.sample(x[i], y[i])
        return torch.from_numpy(x), torch.from_numpy(y)
