"""The scratch expert's decoder on an ImageNet encoder (``--encoder efficientnet-lite0``), frozen by default.

Same training as the scratch expert (good images, synthetic anomalies, focal + dice loss; see
:mod:`linecam.export.scratch`), same outputs and map scale, but the features it segments come from
EfficientNet-Lite0's first four stages (strides 2, 4, 8, 16), frozen at their ImageNet weights;
only a small U-Net decoder is trained. Why: a net trained from scratch on a few dozen photographs
of an irregular natural surface (grass, gravel) learns what the synthetic anomalies look like more
than what the surface looks like, and misses soft defects unlike them; ImageNet features already
tell texture from disruption of it. On two independently drawn real-photo test sets this raised the
expert's image AUROC on grass from 0.71–0.77 to about 0.90 (benchmarks/results, README).

By default the encoder is frozen and kept in eval mode: its batch-norm statistics stay ImageNet's
(a few dozen images would only make them worse), and no gradient flows through it, so training
costs about one extra forward pass per sample. ``encoder_lr_scale`` > 0 (``--encoder-lr-scale``)
fine-tunes its weights at that share of the decoder's learning rate, as the lite0 student does
(:mod:`linecam.export.student_lite`); its batch-norm statistics stay ImageNet's all the same.

Inputs arrive normalised with the bundle's :class:`~linecam.preprocess.PreprocessSpec` (ImageNet
mean/std by default) and are converted to the encoder's own normalisation inside the graph (exact: both are affine), so the bundle keeps
one preprocessing definition.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from linecam.export.layers import cbr, input_affine, scaled_param_groups

#: ``--encoder`` values: ``none`` is the original from-scratch U-Net.
ENCODERS = ("efficientnet-lite0", "none")
#: Decoder width: channels after the deepest lateral (x4), then x2, x1, x1 up to stride 2.
DECODER_WIDTH = 32
#: The encoder's learning rate as a share of the decoder's; 0 keeps it frozen at ImageNet's weights.
ENCODER_LR_SCALE = 0.0




class EncoderExpert(nn.Module):
    """``[N, 3, H, W]`` normalised image -> ``(anomaly_map [N, 1, H, W], score [N])``, as
    :class:`~linecam.export.scratch.ScratchExpert`; ``H`` and ``W`` multiples of 16."""

    def __init__(self, encoder: str = "efficientnet-lite0", checkpoint: str | Path | None = None, *,
                 mean: tuple[float, float, float] = (0.485, 0.456, 0.406),
                 std: tuple[float, float, float] = (0.229, 0.224, 0.225), score_pool: int = 9,
                 width: int = DECODER_WIDTH, encoder_lr_scale: float = ENCODER_LR_SCALE) -> None:
        super().__init__()
        if encoder_lr_scale < 0:
            raise ValueError(f"encoder_lr_scale must be >= 0, got {encoder_lr_scale}")
        from linecam.export.backbones import load_backbone

        bb = load_backbone(encoder, checkpoint, pyramid=True)
        self.encoder_name = bb.name
        self.encoder_source, self.encoder_sha256 = bb.source, bb.source_sha256
        self.encoder = bb.module  # registered: exported with the graph, moved with .to()
        self.encoder_lr_scale = float(encoder_lr_scale)
        for p in self.encoder.parameters():
            p.requires_grad_(self.encoder_lr_scale > 0)  # load_backbone freezes it
        self._stages = bb.stages
        input_affine(self, mean, std, bb.mean, bb.std)  # the bundle's normalisation -> the encoder's
        self.score_pool = score_pool
        with torch.no_grad():
            chans = [f.shape[1] for f in self._stages(torch.zeros(1, 3, 32, 32))]
        c2, c4, c8, c16 = chans
        w = width
        self.lateral = cbr(c16, 4 * w)
        self.up8 = cbr(4 * w + c8, 2 * w)
        self.up4 = cbr(2 * w + c4, w)
        self.up2 = cbr(w + c2, w)
        self.head = nn.Conv2d(w, 1, 1)
        nn.init.constant_(self.head.bias, -4.0)  # start "everything is good", as the scratch expert

    def train(self, mode: bool = True) -> "EncoderExpert":
        super().train(mode)
        self.encoder.eval()  # ImageNet batch-norm statistics, always
        return self

    def param_groups(self, lr: float) -> list[dict]:
        """Optimizer groups: the encoder at ``encoder_lr_scale`` x ``lr`` (when it trains), the rest at ``lr``."""
        return scaled_param_groups(self, list(self.encoder.parameters()), lr, self.encoder_lr_scale)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        # Frozen: no activations kept for a backward pass through it.
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.encoder_lr_scale > 0):
            f2, f4, f8, f16 = self._stages(x * self.in_a + self.in_b)
        y = self.lateral(f16)
        y = self.up8(torch.cat([F.interpolate(y, scale_factor=2.0, mode="nearest"), f8], 1))
        y = self.up4(torch.cat([F.interpolate(y, scale_factor=2.0, mode="nearest"), f4], 1))
        y = self.up2(torch.cat([F.interpolate(y, scale_factor=2.0, mode="nearest"), f2], 1))
        return F.interpolate(self.head(y), size=x.shape[-2:], mode="bilinear", align_corners=False)

    def score(self, amap: torch.Tensor) -> torch.Tensor:
        return torch.amax(F.avg_pool2d(amap, self.score_pool, stride=1), dim=(1, 2, 3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from linecam.export.scratch import expert_map

        amap = expert_map(self.logits(x))
        return amap, self.score(amap)
