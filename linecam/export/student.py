"""The compact student a teacher is distilled into.

TensorRT- and INT8-friendly by construction: a plain chain of 3x3 convolutions with batch
norm (folded at export) and ReLU, three stride-2 stages down to 1/8 of the input, a 1x1
head; the anomaly map is output at 1/8 resolution (28x28 for 224 input; finer than a
ViT-S/14 teacher's 16x16 patch grid) and the image score is the max of its
``score_pool`` x ``score_pool`` mean-pooled map, both in the graph. No attention, kNN,
cdist, resizes or concatenations: every op has a fused INT8 kernel on ONNX Runtime CPU
and on TensorRT, so INT8 pays off. (A U-Net decoder at 1/4 resolution measured *slower*
in INT8 than in FP32 on ORT CPU: its int8 Resize/Concat and layout transposes cost more
than the convolutions save.) Consumers map the low-resolution map back to source pixels
through :meth:`linecam.preprocess.Geometry.scale_for`, as for any expert.

The map's unit is the teacher's map divided by the teacher's good-image scale, or its ``log1p``
for a teacher whose defects reach far beyond that scale (:class:`linecam.export.pool.Target`; the
bundle's ``map_unit`` says which), clamped at zero.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from linecam.export.backbones import IMAGENET_MEAN, IMAGENET_STD
from linecam.export.layers import cbr

#: Student sizes: name -> base width. Channels are w, 2w, 2w, 4w x 4; compute grows with w².
#: Narrower than 32 makes INT8 on CPU barely faster than FP32 (int8 GEMMs want channels).
SIZES: dict[str, int] = {"s": 32, "m": 48, "l": 64}
#: Output stride of the anomaly map.
STRIDE = 8
#: ``--student`` values: the plain sizes, and ``lite0`` (:mod:`linecam.export.student_lite`,
#: fine-tuned from ImageNet EfficientNet-Lite0; input sides multiples of 16).
STUDENTS = (*SIZES, "lite0")




class Student(nn.Module):
    """``[N, 3, H, W]`` -> ``(anomaly_map [N, 1, H/8, W/8] >= 0, score [N])``; H, W multiples of 8."""

    def __init__(self, size: str = "s", score_pool: int = 3) -> None:
        super().__init__()
        if size not in SIZES:
            raise ValueError(f"unknown student size {size!r}: choose from {', '.join(SIZES)}")
        w = SIZES[size]
        self.size = size
        self.score_pool = score_pool
        self.body = nn.Sequential(
            cbr(3, w, 2),
            cbr(w, 2 * w, 2), cbr(2 * w, 2 * w),
            cbr(2 * w, 4 * w, 2), cbr(4 * w, 4 * w), cbr(4 * w, 4 * w), cbr(4 * w, 4 * w),
        )
        self.head = nn.Conv2d(4 * w, 1, 1)

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """The map before the final clamp (what training regresses)."""
        return self.head(self.body(x))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        amap = F.relu(self.raw(x))
        return amap, torch.amax(F.avg_pool2d(amap, self.score_pool, stride=1), dim=(1, 2, 3))


def make_student(name: str, score_pool: int = 3, mean: tuple[float, float, float] = IMAGENET_MEAN,
                 std: tuple[float, float, float] = IMAGENET_STD) -> nn.Module:
    """The ``--student`` named ``name``; ``mean``/``std`` are the bundle's normalisation."""
    if name == "lite0":
        from linecam.export.student_lite import Lite0Student

        return Lite0Student(score_pool, mean=mean, std=std)
    return Student(name, score_pool=score_pool)


def input_multiple(name: str) -> int:
    """What the input's sides must be multiples of for student ``name``."""
    return 16 if name == "lite0" else STRIDE


def map_size(input_size: tuple[int, int]) -> tuple[int, int]:
    return input_size[0] // STRIDE, input_size[1] // STRIDE


def downsample(maps: np.ndarray, factor: int = STRIDE) -> np.ndarray:
    """``[N, H, W]`` -> ``[N, H/f, W/f]`` by area averaging: a teacher map at the student's resolution."""
    t = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))[:, None]
    return F.avg_pool2d(t, factor)[:, 0].numpy()


def image_score(maps: np.ndarray, pool: int) -> np.ndarray:
    """The student's in-graph image score for ``[N, h, w]`` maps: max of the ``pool`` x ``pool``
    mean-pooled map. Used for teachers too, so teacher and student scores mean the same."""
    t = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))[:, None]
    return torch.amax(F.avg_pool2d(t, pool, stride=1), dim=(1, 2, 3)).numpy()
