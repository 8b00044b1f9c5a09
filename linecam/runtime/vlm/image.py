"""Image -> vision-graph inputs, in numpy + OpenCV (no torch, no PIL on the edge).

Follows the Hugging Face image processors' geometry (Qwen2-VL ``smart_resize`` and
patch layout, shared by Qwen2.5-VL, Qwen3-VL and Qwen3.5; Idefics3 resize / resize for
the encoder / tile / global image) and normalisation. Resampling is Pillow's, reproduced
bit for bit in numpy (:mod:`linecam.runtime.vlm.resample`: bicubic for Qwen, Lanczos for
Idefics3), so from a raw RGB image linecam's pixel values equal the processor's
(``tests/test_vlm_raw_parity.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from linecam.runtime.vlm.bundle import Idefics3VisionSpec, QwenImageSpec
from linecam.runtime.vlm.resample import pil_resize
from linecam.runtime.vlm.rope import Grid


def to_rgb_u8(image: np.ndarray, bit_depth: int = 8) -> np.ndarray:
    """A linecam frame image (``(H, W, 3)`` RGB or ``(H, W, 1)`` mono, 8-16 bit) as ``(H, W, 3)`` uint8 RGB."""
    img = image
    if img.ndim == 2:
        img = img[..., None]
    if img.dtype != np.uint8:
        shift = max(bit_depth - 8, 0)
        img = (img.astype(np.uint32) >> shift).clip(0, 255).astype(np.uint8)
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    return np.ascontiguousarray(img[..., :3])


def _normalise(img: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
    # transformers' rescale (float64 product, then float32) and normalize (float32).
    x = (img.astype(np.float64) * (1.0 / 255.0)).astype(np.float32)
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL: both sides multiples of ``factor``, area within [min_pixels, max_pixels], aspect kept."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image aspect ratio {max(height, width) / min(height, width):.0f} is over 200")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True, slots=True)
class QwenImage:
    pixel_values: np.ndarray  # [grid_t*grid_h*grid_w, C*T*P*P] float32
    grid: Grid
    n_tokens: int  # image-pad tokens in the prompt


def qwen_preprocess(rgb: np.ndarray, spec: QwenImageSpec) -> QwenImage:
    """``(H, W, 3)`` uint8 RGB -> Qwen-VL ``pixel_values`` and patch grid."""
    p, tp, m = spec.patch_size, spec.temporal_patch_size, spec.merge_size
    h, w = smart_resize(rgb.shape[0], rgb.shape[1], p * m, spec.min_pixels, spec.max_pixels)
    if (h, w) != rgb.shape[:2]:
        rgb = pil_resize(rgb, (w, h), "bicubic")
    x = _normalise(rgb, spec.image_mean, spec.image_std).transpose(2, 0, 1)  # C, H, W
    c = x.shape[0]
    # One still image is repeated over the temporal patch (what the HF processor does).
    x = np.broadcast_to(x[None], (tp, c, h, w))
    gt, gh, gw = 1, h // p, w // p
    x = x.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    pv = np.ascontiguousarray(x.reshape(gt * gh * gw, c * tp * p * p), dtype=np.float32)
    return QwenImage(pv, (gt, gh, gw), gt * gh * gw // (m * m))


@dataclass(frozen=True, slots=True)
class Idefics3Image:
    pixel_values: np.ndarray  # [n_tiles, 3, S, S] float32 (tiles row-major, then the global image)
    rows: int  # 0, 0 when the image was not split
    cols: int


def _fit_longest(h: int, w: int, longest: int) -> tuple[int, int]:
    # transformers' _resize_output_size_rescale_to_max_len: keep aspect, even sides.
    ratio = w / h
    if w >= h:
        w2 = longest
        h2 = int(w2 / ratio)
        if h2 % 2 != 0:
            h2 += 1
    else:
        h2 = longest
        w2 = int(h2 * ratio)
        if w2 % 2 != 0:
            w2 += 1
    return max(h2, 1), max(w2, 1)


def idefics3_preprocess(rgb: np.ndarray, spec: Idefics3VisionSpec) -> Idefics3Image:
    """``(H, W, 3)`` uint8 RGB -> Idefics3 tiles (+ global image) ``[n, 3, S, S]``."""
    s = spec.tile_size
    h, w = _fit_longest(rgb.shape[0], rgb.shape[1], spec.longest_edge)
    img = pil_resize(rgb, (w, h), "lanczos") if (h, w) != rgb.shape[:2] else rgb
    tiles: list[np.ndarray] = []
    rows = cols = 0
    if spec.do_image_splitting:
        # transformers' resize_for_vision_encoder: the longer side up to a multiple of the tile,
        # the other from the aspect ratio (truncated), then up to a multiple too.
        if w >= h:
            ww = math.ceil(w / s) * s
            hh = math.ceil(int(ww / (w / h)) / s) * s
        else:
            hh = math.ceil(h / s) * s
            ww = math.ceil(int(hh * (w / h)) / s) * s
        img = pil_resize(img, (ww, hh), "lanczos") if (hh, ww) != img.shape[:2] else img
        if hh > s or ww > s:
            rows, cols = (hh - s) // s + 1, (ww - s) // s + 1
            for r in range(rows):
                for c in range(cols):
                    tiles.append(img[r * s:(r + 1) * s, c * s:(c + 1) * s])
    tiles.append(pil_resize(img, (s, s), "lanczos") if img.shape[:2] != (s, s) else img)
    x = np.stack([_normalise(t, spec.image_mean, spec.image_std).transpose(2, 0, 1) for t in tiles])
    return Idefics3Image(np.ascontiguousarray(x, dtype=np.float32), rows, cols)


def idefics3_image_prompt(rows: int, cols: int, spec: Idefics3VisionSpec) -> str:
    """The text that stands for one image (transformers' Idefics3Processor layout)."""
    run = spec.image_token * spec.tokens_per_tile
    glob = f"{spec.fake_image_token}{spec.global_image_token}{run}{spec.fake_image_token}"
    if rows == 0 and cols == 0:
        return glob
    out = ""
    for r in range(rows):
        for c in range(cols):
            out += f"{spec.fake_image_token}<row_{r + 1}_col_{c + 1}>{run}"
        out += "\n"
    return out + "\n" + glob


def idefics3_patch_positions(n_tiles: int, spec: Idefics3VisionSpec) -> np.ndarray:
    """Patch position ids of full tiles: ``0 .. P-1`` for every tile."""
    n = (spec.tile_size // spec.patch_size) ** 2
    return np.broadcast_to(np.arange(n, dtype=np.int64), (n_tiles, n)).copy()
