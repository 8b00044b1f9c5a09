"""Building blocks the region experts and students share.

* :func:`cbr`: conv -> batch norm -> ReLU (the norm folds into the conv at export; TensorRT and
  ONNX Runtime fuse the ReLU).
* :func:`input_affine`: a network's own normalisation computed from the bundle's, inside the
  graph, so a bundle keeps one preprocessing definition whatever its encoder was trained on.
"""

from __future__ import annotations

import torch
from torch import nn


def cbr(cin: int, cout: int, stride: int = 1, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


def input_affine(module: nn.Module, mean: tuple[float, ...], std: tuple[float, ...],
                 to_mean: tuple[float, ...], to_std: tuple[float, ...]) -> None:
    """Register buffers ``in_a``, ``in_b`` on ``module`` with ``x * in_a + in_b`` turning an input
    normalised by ``(mean, std)`` into one normalised by ``(to_mean, to_std)`` (exact: both affine)."""
    ms, ss = torch.tensor(mean), torch.tensor(std)
    me, se = torch.tensor(to_mean), torch.tensor(to_std)
    module.register_buffer("in_a", (ss / se).view(1, 3, 1, 1), persistent=False)
    module.register_buffer("in_b", ((ms - me) / se).view(1, 3, 1, 1), persistent=False)


def scaled_param_groups(module: nn.Module, encoder: list[nn.Parameter], lr: float, scale: float) -> list[dict]:
    """AdamW groups for a net on a pretrained encoder: ``encoder``'s trainable parameters at
    ``scale`` x ``lr`` (no group when none trains), every other trainable one at ``lr``. Each group
    carries its ``lr_scale`` so a schedule can set ``lr`` per step and keep the ratio."""
    enc = [p for p in encoder if p.requires_grad]
    ids = {id(p) for p in enc}
    rest = [p for p in module.parameters() if p.requires_grad and id(p) not in ids]
    head = [{"params": enc, "lr": lr * scale, "lr_scale": scale}] if enc else []
    return head + [{"params": rest, "lr": lr, "lr_scale": 1.0}]
