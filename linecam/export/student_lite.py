"""A student on EfficientNet-Lite0's first stages (``--student lite0``), fine-tuned from ImageNet.

Why a second student family: the plain student (:mod:`linecam.export.student`) learns its features
from the pool alone, a few hundred crops of a few dozen photographs. A teacher whose maps come from
ImageNet features (the encoder expert, PatchCore) separates texture from a disruption of it in ways
those crops cannot teach: on real grass and gravel the plain student's map agreed with such a teacher
at r ≈ 0.89–0.95 and kept only 0.75–0.83 of its 0.86–0.94 image AUROC. Starting from the same
ImageNet features closes most of that gap (benchmarks/results/real_photo_accuracy.md).

EfficientNet-Lite is the mobile variant of EfficientNet (ReLU6, no squeeze-excitation, no swish):
convolutions, depthwise convolutions, batch norm (folded at export), clips and residual adds. The
map joins the stride-16 features to the stride-8 ones (one nearest upsample and an add; no
concatenation) and is output at 1/8 resolution, the plain student's contract, so bundles,
consumers and the gate are unchanged. Speed on ONNX Runtime CPU (benchmarks/results/engines-cpu-lite0.md):
FP32 faster than the plain ``s`` student, but INT8 *slower* than its own FP32 (Q/DQ depthwise
convolutions and float residual adds between Q/DQ pairs): on a CPU run a lite0 bundle in FP32.

The encoder's batch-norm statistics stay ImageNet's (eval mode while training: batches of 8 crops of
one surface would only make them worse) and its weights learn at a tenth of the head's rate, so the
pretrained features are adapted, not overwritten.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from linecam.export.backbones import IMAGENET_MEAN, IMAGENET_STD, lite0_taps, load_backbone
from linecam.export.layers import cbr, input_affine, scaled_param_groups

#: Block indices ending strides 8 (40 channels) and 16 (112 channels) in EfficientNet-Lite0.
TAPS = (4, 10)
#: Width of the map head (both laterals and the two 3x3 convolutions after the join).
HEAD_WIDTH = 64
#: The encoder's learning rate as a share of ``--lr``.
ENCODER_LR_SCALE = 0.1


class Lite0Student(nn.Module):
    """``[N, 3, H, W]`` -> ``(anomaly_map [N, 1, H/8, W/8] >= 0, score [N])``; H, W multiples of 16.

    ``mean``/``std``: the bundle's normalisation; converted to the encoder's inside the graph."""

    size = "lite0"

    def __init__(self, score_pool: int = 3, *, mean: tuple[float, float, float] = IMAGENET_MEAN,
                 std: tuple[float, float, float] = IMAGENET_STD) -> None:
        super().__init__()
        bb = load_backbone("efficientnet-lite0", pyramid=False)
        self.encoder_source, self.encoder_sha256 = bb.source, bb.source_sha256
        m = bb.module
        for p in m.parameters():
            p.requires_grad_(True)  # load_backbone freezes; this one is fine-tuned
        # Only what the map needs: the stem and blocks up to stride 16 (the rest of the
        # classifier never runs and is not exported).
        self.stem = nn.Sequential(m._conv_stem, m._bn0, m._swish)
        self.blocks = nn.ModuleList(m._blocks[:TAPS[-1] + 1])
        input_affine(self, mean, std, bb.mean, bb.std)
        with torch.no_grad():
            c8, c16 = (f.shape[1] for f in self._features(torch.zeros(1, 3, 32, 32)))
        w = HEAD_WIDTH
        self.lat8, self.lat16 = cbr(c8, w, k=1), cbr(c16, w, k=1)
        self.fuse = nn.Sequential(cbr(w, w), cbr(w, w))
        self.head = nn.Conv2d(w, 1, 1)
        self.score_pool = score_pool

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return lite0_taps(self.stem(x * self.in_a + self.in_b), self.blocks, TAPS)

    def train(self, mode: bool = True) -> "Lite0Student":
        super().train(mode)
        for mod in (self.stem, self.blocks):
            for b in mod.modules():
                if isinstance(b, nn.BatchNorm2d):
                    b.eval()  # ImageNet statistics, always (see the module docstring)
        return self

    def param_groups(self, lr: float) -> list[dict]:
        enc = [p for mod in (self.stem, self.blocks) for p in mod.parameters()]
        return scaled_param_groups(self, enc, lr, ENCODER_LR_SCALE)

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        f8, f16 = self._features(x)
        y = self.lat8(f8) + F.interpolate(self.lat16(f16), scale_factor=2.0, mode="nearest")
        return self.head(self.fuse(y))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        amap = F.relu(self.raw(x))
        return amap, torch.amax(F.avg_pool2d(amap, self.score_pool, stride=1), dim=(1, 2, 3))
