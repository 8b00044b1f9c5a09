"""The pretrained CNN teacher (``--teacher cnn``): PatchCore on a frozen ImageNet backbone.

For every image: features of two middle stages of the backbone (:mod:`linecam.export.backbones`)
(the image first upsampled so its shorter side is at least :data:`MIN_FEATURE_INPUT` px: at a
128 px input the stride-8 stage is a 16x16 grid whose cells are wider than a scratch, and an
ImageNet network sees texture at the scale it was trained on, 224 px),
each averaged over its 3x3 neighbourhood (a patch sees its surroundings: PatchCore's local
aggregation), the deeper one upsampled to the finer grid, concatenated and, when wide, reduced
by averaging adjacent channels. Fitting keeps a greedy-coreset subsample of the good images'
patch features (the memory bank); the anomaly map is each patch's Euclidean distance to its
nearest bank feature, upsampled to the input and Gaussian-blurred (sigma 4 px, as PatchCore).

Used directly it is the *PatchCore reference* of the accuracy benchmark; distilled, it is what
the compact student imitates (kNN over a bank does not belong on the edge).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from linecam.errors import BundleError
from linecam.export.backbones import Backbone, load_backbone
from linecam.export.teachers import Teacher, build_bank
from linecam.export.torch_device import pick_device
from linecam.preprocess import PreprocessSpec, Preprocessor
from linecam.progress import make_progress

logger = logging.getLogger(__name__)

DEFAULT_BACKBONE = "efficientnet-lite0"
#: Wider concatenated features are averaged down to this many channels (bank memory, kNN time).
MAX_FEATURE_DIM = 384
BLUR_SIGMA = 4.0
#: Inputs smaller than this (shorter side) are upsampled before the backbone (feature_scale).
MIN_FEATURE_INPUT = 256


def default_feature_scale(input_size: tuple[int, int]) -> float:
    """Upsampling before the backbone: 1 at 256 px and above, 2 at 128 px (a power of two)."""
    scale = 1.0
    while min(input_size) * scale < MIN_FEATURE_INPUT:
        scale *= 2
    return scale


class CnnTeacher(Teacher):
    """PatchCore: multi-stage CNN features, 3x3 aggregation, coreset bank, nearest-neighbour L2."""

    kind = "cnn"

    def __init__(self, backbone: Backbone, spec: PreprocessSpec, *, coreset_ratio: float = 0.1,
                 max_bank: int = 16384, batch_size: int = 8, seed: int = 0,
                 feature_scale: float | None = None, device: str = "auto") -> None:
        if not 0 < coreset_ratio <= 1:
            raise BundleError(f"coreset ratio must be in (0, 1], got {coreset_ratio}")
        h, w = spec.input_size
        if h % 16 or w % 16:
            raise BundleError(f"input size {h}x{w}: the CNN teacher needs multiples of 16 (e.g. 224 or 256)")
        super().__init__(spec)
        self.backbone = backbone
        self.coreset_ratio = coreset_ratio
        self.max_bank = max_bank
        self.batch_size = batch_size
        self.seed = seed
        self.feature_scale = default_feature_scale(spec.input_size) if feature_scale is None else float(feature_scale)
        if self.feature_scale <= 0:
            raise BundleError(f"feature scale must be positive, got {feature_scale}")
        self.bank: torch.Tensor | None = None
        # Features, coreset and distances on the GPU when there is one (``device``); the bank is
        # cached as a CPU tensor and the maps leave as numpy, so nothing downstream sees the device.
        self.device = pick_device(device)
        backbone.module.to(self.device)

    @classmethod
    def create(cls, backbone: str, input_size: tuple[int, int], checkpoint: str | Path | None = None,
               **kwargs: Any) -> "CnnTeacher":
        """The teacher with the preprocessing its backbone's weights expect (ImageNet or Lite mean/std)."""
        bb = load_backbone(backbone, checkpoint)
        spec = PreprocessSpec(input_size=input_size, mean=bb.mean, std=bb.std)
        return cls(bb, spec, **kwargs)

    @torch.no_grad()
    def features(self, x: np.ndarray) -> torch.Tensor:
        """``[N, 3, H, W]`` -> aggregated patch features ``[N, C, s*H/8, s*W/8]`` (s = feature_scale)."""
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
        if self.feature_scale != 1:
            t = F.interpolate(t, scale_factor=self.feature_scale, mode="bilinear", align_corners=False)
        feats = self.backbone.stages(t)
        grid = feats[0].shape[-2:]
        agg = []
        for f in feats:
            f = F.avg_pool2d(f, 3, stride=1, padding=1, count_include_pad=False)
            if f.shape[-2:] != grid:
                f = F.interpolate(f, size=grid, mode="bilinear", align_corners=False)
            agg.append(f)
        out = torch.cat(agg, dim=1)
        if out.shape[1] > MAX_FEATURE_DIM:
            n, c, h, w = out.shape
            out = F.adaptive_avg_pool1d(out.permute(0, 2, 3, 1).reshape(-1, 1, c), MAX_FEATURE_DIM)
            out = out.reshape(n, h, w, MAX_FEATURE_DIM).permute(0, 3, 1, 2)
        return out.contiguous()

    def fit(self, images: Sequence[Any], *, cache: Path | None = None, progress: bool = True) -> None:
        if cache is not None and cache.is_file():
            self.bank = torch.load(cache, weights_only=True, map_location="cpu").to(self.device)
            logger.info("memory bank loaded from %s (%d features)", cache, self.bank.shape[0])
            return
        self.fit_features(self.good_features(images, progress=progress), cache=cache)

    def good_features(self, images: Sequence[Any], *, progress: bool = True) -> torch.Tensor:
        """``[N, P, C]``: the aggregated patch features of each good image (P patches of C)."""
        pre = Preprocessor(self.spec)
        parts = []
        with make_progress(progress) as bar:
            task = bar.add_task(f"{self.backbone.name} features of good images", total=len(images), info="")
            for i in range(0, len(images), self.batch_size):
                batch = np.concatenate([pre(s.image, s.bit_depth, copy=True) for s in images[i:i + self.batch_size]])
                f = self.features(batch)
                parts.append(f.permute(0, 2, 3, 1).reshape(f.shape[0], -1, f.shape[1]))
                bar.update(task, advance=batch.shape[0])
        return torch.cat(parts)

    def fit_features(self, feats: torch.Tensor, *, cache: Path | None = None) -> None:
        """The memory bank from :meth:`good_features` (of some or all images: see the combined teacher)."""
        allf = feats.reshape(-1, feats.shape[-1])
        # The ratio counts patches of the input's stride-8 grid: upsampling (feature_scale) makes
        # more, finer patches, not a bigger bank (the greedy coreset's time grows with both).
        n = min(self.max_bank, max(1, int(round(allf.shape[0] * self.coreset_ratio / self.feature_scale ** 2))))
        self.bank = build_bank(allf, n, seed=self.seed, cache=cache)

    @torch.no_grad()
    def patch_distances(self, x: np.ndarray) -> torch.Tensor:
        """``[N, h, w]`` nearest-bank-feature L2 distance per patch (feature_scale/8 of the input)."""
        if self.bank is None:
            raise RuntimeError("CnnTeacher.fit() must run before maps()")
        f = self.features(x)
        n, c, h, w = f.shape
        flat = f.permute(0, 2, 3, 1).reshape(-1, c)
        best = torch.full((flat.shape[0],), float("inf"), device=flat.device)
        for j in range(0, self.bank.shape[0], 4096):  # bounded memory for big banks
            best = torch.minimum(best, torch.cdist(flat, self.bank[j:j + 4096]).amin(dim=1))
        return best.reshape(n, h, w)

    def maps(self, x: np.ndarray) -> np.ndarray:
        out = np.empty((x.shape[0], *self.spec.input_size), np.float32)
        for i in range(0, x.shape[0], self.batch_size):
            d = self.patch_distances(x[i:i + self.batch_size])[:, None]
            up = F.interpolate(d, size=self.spec.input_size, mode="bilinear", align_corners=False)[:, 0].cpu().numpy()
            for k in range(up.shape[0]):
                out[i + k] = cv2.GaussianBlur(up[k], (0, 0), BLUR_SIGMA)
        return out

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "backbone": self.backbone.name, "source": self.backbone.source,
                "source_sha256": self.backbone.source_sha256, "coreset_ratio": self.coreset_ratio,
                "max_bank": self.max_bank, "bank_size": int(self.bank.shape[0]) if self.bank is not None else 0,
                "blur_sigma": BLUR_SIGMA, "max_feature_dim": MAX_FEATURE_DIM,
                "feature_scale": self.feature_scale,
                "distance": "euclidean, nearest neighbour (PatchCore)"}
