"""The one preprocessing definition: training, calibration, export, evaluation and
the daemon all call :class:`Preprocessor`, configured from the bundle's manifest.

Exported anomaly models disagreeing with their training-time scores is the most
reported deployment bug in anomaly detection (a resize that antialiases in one place
and not in the other). Having a single implementation, recorded in the bundle and
tested for parity, is how linecam avoids it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

Interpolation = Literal["area", "linear", "nearest", "cubic"]

_CV2_INTERP = {
    "area": cv2.INTER_AREA,
    "linear": cv2.INTER_LINEAR,
    "nearest": cv2.INTER_NEAREST,
    "cubic": cv2.INTER_CUBIC,
}


class CropSpec(BaseModel):
    """A rectangle of the *source* image, applied before resizing (pixels)."""

    model_config = ConfigDict(extra="forbid")
    top: int = Field(ge=0)
    left: int = Field(ge=0)
    height: int = Field(gt=0)
    width: int = Field(gt=0)


class PreprocessSpec(BaseModel):
    """Exactly what happens to a frame before the model sees it, in this order:

    1. crop (optional, source pixel coordinates);
    2. resize to ``input_size`` (height, width) with ``interpolation`` (OpenCV);
    3. mono frames are replicated to 3 channels;
    4. channel order ``color_order`` (frames arrive RGB);
    5. scale to [0, 1] by ``1 / (2**bit_depth - 1)``;
    6. ``(x - mean) / std`` per channel; layout NCHW float32, batch 1.
    """

    model_config = ConfigDict(extra="forbid")
    input_size: tuple[int, int]
    interpolation: Interpolation = "area"
    crop: CropSpec | None = None
    color_order: Literal["RGB", "BGR"] = "RGB"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @model_validator(mode="after")
    def _check(self) -> "PreprocessSpec":
        if min(self.input_size) <= 0:
            raise ValueError("input_size must be positive")
        if min(self.std) <= 0:
            raise ValueError("std must be positive")
        return self


@dataclass(frozen=True, slots=True)
class Geometry:
    """Where the model's view lies in the source image, for mapping results back."""

    offset_x: float
    offset_y: float
    width: float  # source pixels covered by the model input, horizontally
    height: float

    def scale_for(self, map_h: int, map_w: int) -> tuple[float, float]:
        """Source pixels per anomaly-map pixel (x, y)."""
        return self.width / map_w, self.height / map_h


#: Aspect ratios (frames' against the model input's) further apart than this get a warning.
ASPECT_TOLERANCE = 1.1


def aspect_size(spec: PreprocessSpec, height: int, width: int) -> tuple[int, int] | None:
    """When frames of ``height`` x ``width`` (after the spec's crop) are stretched to the model
    input by more than :data:`ASPECT_TOLERANCE` in aspect ratio, an input size (H, W) with their
    shape and about the same pixel count (multiples of 16, so about the same inference cost);
    ``None`` when they fit. Stretching is legal, but a thin defect across the squeezed axis loses
    pixels, and a bundle evaluated on frames of another shape is usually the wrong bundle."""
    if spec.crop is not None:
        height, width = spec.crop.height, spec.crop.width
    h, w = spec.input_size
    if abs(math.log((width / height) / (w / h))) <= math.log(ASPECT_TOLERANCE):
        return None
    sh, sw = (max(32, 16 * round(math.sqrt(h * w * a) / 16)) for a in (height / width, width / height))
    return sh, sw


class Preprocessor:
    """Callable turning a frame image into the model input, allocation-light.

    The returned array is a buffer owned by this object and overwritten by the
    next call: one ``Preprocessor`` per worker thread. Use ``copy=True`` when the
    result must outlive the next call (e.g. building a training set).
    """

    def __init__(self, spec: PreprocessSpec) -> None:
        self.spec = spec
        h, w = spec.input_size
        self._dsize = (w, h)
        self._interp = _CV2_INTERP[spec.interpolation]
        self._out = np.empty((1, 3, h, w), dtype=np.float32)
        self._mean = np.asarray(spec.mean, dtype=np.float32)
        self._std = np.asarray(spec.std, dtype=np.float32)
        # Channel index in the resized RGB image feeding each model channel.
        self._src_channel = (0, 1, 2) if spec.color_order == "RGB" else (2, 1, 0)
        self._coef: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._resized: dict[tuple[int, np.dtype], np.ndarray] = {}

    def _coefficients(self, bit_depth: int) -> tuple[np.ndarray, np.ndarray]:
        # (x / maxv - mean) / std folded into one multiply-add: x * a + b.
        coef = self._coef.get(bit_depth)
        if coef is None:
            maxv = float(2**bit_depth - 1)
            a = 1.0 / (maxv * self._std)
            b = -self._mean / self._std
            coef = (a.astype(np.float32), b.astype(np.float32))
            self._coef[bit_depth] = coef
        return coef

    def geometry(self, source_h: int, source_w: int) -> Geometry:
        crop = self.spec.crop
        if crop is None:
            return Geometry(0.0, 0.0, float(source_w), float(source_h))
        return Geometry(float(crop.left), float(crop.top), float(crop.width), float(crop.height))

    def crop(self, image: np.ndarray) -> np.ndarray:
        crop = self.spec.crop
        if crop is None:
            return image
        h, w = image.shape[:2]
        if crop.top + crop.height > h or crop.left + crop.width > w:
            raise ValueError(
                f"crop {crop.left},{crop.top} {crop.width}x{crop.height} does not fit a {w}x{h} frame"
            )
        return image[crop.top : crop.top + crop.height, crop.left : crop.left + crop.width]

    def __call__(self, image: np.ndarray, bit_depth: int = 8, copy: bool = False) -> np.ndarray:
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3 or image.shape[2] not in (1, 3):
            raise ValueError(f"expected an (H, W, 1|3) image, got shape {image.shape}")
        src = self.crop(image)
        # Resize into a buffer kept per (channels, dtype): no allocation per frame (cv2 reuses a
        # dst of the right shape and type; it drops a singleton channel axis, so mono is 2-D).
        key = (src.shape[2], src.dtype)
        buf = self._resized.get(key)
        if buf is None:
            h, w = self._dsize[1], self._dsize[0]
            buf = self._resized[key] = np.empty((h, w) if src.shape[2] == 1 else (h, w, src.shape[2]), src.dtype)
        resized = cv2.resize(src, self._dsize, dst=buf, interpolation=self._interp)
        if resized.ndim == 2:
            resized = resized[:, :, None]
        a, b = self._coefficients(bit_depth)
        out = self._out
        mono = resized.shape[2] == 1
        for c in range(3):
            src = resized[:, :, 0 if mono else self._src_channel[c]]
            np.multiply(src, a[c], out=out[0, c], casting="unsafe")
            out[0, c] += b[c]
        return out.copy() if copy else out


def read_image(path: str | Path) -> tuple[np.ndarray, int]:
    """Read an image file into linecam's frame layout: ``(image, bit_depth)``.

    Colour files become RGB ``uint8``; 16-bit files keep their depth.
    """
    data = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if data is None:
        raise ValueError(f"cannot read image {path}: not an image file OpenCV can decode")
    bit_depth = 16 if data.dtype == np.uint16 else 8
    if data.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"{path}: unsupported sample type {data.dtype}")
    if data.ndim == 2:
        return np.ascontiguousarray(data[:, :, None]), bit_depth
    if data.shape[2] == 4:
        data = cv2.cvtColor(data, cv2.COLOR_BGRA2RGB)
    else:
        data = cv2.cvtColor(data, cv2.COLOR_BGR2RGB)
    return data, bit_depth
