"""Pillow's resampling of 8-bit images, in numpy: what the Hugging Face image processors do.

transformers' image processors (without torchvision) resize with Pillow: a separable
convolution whose kernel support grows with the downscale factor (antialiasing), 22-bit
fixed-point coefficients, a horizontal pass rounded to uint8, then a vertical pass
(Pillow's ``libImaging/Resample.c``). OpenCV's bicubic / Lanczos do neither the support
scaling nor the same rounding, so their pixels, and then a VLM's tokens, differ.

:func:`pil_resize` uses Pillow itself where it is installed (what the processor ran), and
otherwise this numpy reimplementation: Pillow's coefficients and rounding bit for bit,
horizontal pass first as Pillow <= 12 always does. Pillow 13 runs the vertical pass first
for some shapes (a speed choice whose rule is not documented); there the numpy path can
differ from it by a few grey levels.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

Filter = Literal["bicubic", "lanczos", "bilinear"]

_PRECISION_BITS = 32 - 8 - 2


def _bicubic(x: np.ndarray) -> np.ndarray:
    a = -0.5
    x = np.abs(x)
    return np.where(x < 1.0, ((a + 2.0) * x - (a + 3.0)) * x * x + 1,
                    np.where(x < 2.0, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def _sinc(x: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(x == 0.0, 1.0, np.sin(np.pi * x) / (np.pi * x))


def _lanczos(x: np.ndarray) -> np.ndarray:
    return np.where((x > -3.0) & (x < 3.0), _sinc(x) * _sinc(x / 3.0), 0.0)


def _bilinear(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


_FILTERS = {"bicubic": (_bicubic, 2.0), "lanczos": (_lanczos, 3.0), "bilinear": (_bilinear, 1.0)}


def _coeffs(in_size: int, out_size: int, kind: Filter) -> tuple[np.ndarray, np.ndarray]:
    """``(first input index [out], fixed-point weights [out, k])`` as Pillow's ``precompute_coeffs``
    and ``normalize_coeffs_8bpc``; taps past a row's own count have weight 0."""
    fn, support = _FILTERS[kind]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = support * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size) + 0.5) * scale
    xmin = np.maximum((center - support + 0.5).astype(np.int64), 0)  # C's (int) truncates toward 0
    xmax = np.minimum((center + support + 0.5).astype(np.int64), in_size) - xmin
    taps = np.arange(ksize)[None, :]
    w = fn((taps + xmin[:, None] - center[:, None] + 0.5) / filterscale)
    w = np.where(taps < xmax[:, None], w, 0.0)
    ww = w.sum(axis=1, keepdims=True)
    w = np.where(ww != 0.0, w / np.where(ww != 0.0, ww, 1.0), w)
    fixed = np.where(w < 0, np.trunc(-0.5 + w * (1 << _PRECISION_BITS)), np.trunc(0.5 + w * (1 << _PRECISION_BITS)))
    return xmin, fixed.astype(np.int64)


def _pass(img: np.ndarray, out_size: int, kind: Filter, axis: int) -> np.ndarray:
    """One 8-bit pass along ``axis`` (0: rows / vertical, 1: columns / horizontal)."""
    in_size = img.shape[axis]
    xmin, k = _coeffs(in_size, out_size, kind)
    src = np.moveaxis(img, axis, 0).astype(np.int64)  # [in, other, C]
    acc = np.full((out_size,) + src.shape[1:], 1 << (_PRECISION_BITS - 1), dtype=np.int64)
    for t in range(k.shape[1]):
        idx = np.minimum(xmin + t, in_size - 1)
        acc += src[idx] * k[:, t].reshape((-1,) + (1,) * (src.ndim - 1))
    out = np.clip(acc >> _PRECISION_BITS, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(np.moveaxis(out, 0, axis))


def numpy_resize(img: np.ndarray, size: tuple[int, int], kind: Filter = "bicubic",
                 vertical_first: bool = False) -> np.ndarray:
    """Pillow's 8-bit resampling in numpy: ``(H, W, C)`` uint8 -> ``(h, w, C)``, ``size = (w, h)``."""
    w, h = size
    if img.dtype != np.uint8:
        raise ValueError(f"pil_resize takes uint8 images, got {img.dtype}")
    out = img if img.ndim == 3 else img[..., None]
    passes = [(w, 1), (h, 0)]
    for n, axis in (passes[::-1] if vertical_first else passes):
        if out.shape[axis] != n:
            out = _pass(out, n, kind, axis=axis)
    return out if img.ndim == 3 else out[..., 0]


_PIL_FILTERS = {"bicubic": 3, "lanczos": 1, "bilinear": 2}


def pil_resize(img: np.ndarray, size: tuple[int, int], kind: Filter = "bicubic") -> np.ndarray:
    """``PIL.Image.fromarray(img).resize(size, resample)`` for an ``(H, W, 3)`` uint8 image: with
    Pillow where it is installed, else :func:`numpy_resize`."""
    if img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3:
        try:
            from PIL import Image
        except ImportError:
            pass
        else:
            return np.asarray(Image.fromarray(img).resize(size, _PIL_FILTERS[kind]))
    return numpy_resize(img, size, kind)
