"""Host-side inputs of the Qwen3.5 / Qwen3-VL vision graph (numpy; no torch on the edge).

The Qwen3-style vision encoder adds a learned position table (``side x side`` rows)
resampled bilinearly (``align_corners=True``) to each image's patch grid, in the
spatial-merge block order of the patches, and uses the same axial 2-D rotary as
Qwen2.5-VL but no windows. transformers computes both from ``image_grid_thw`` in
Python; here they are graph inputs (``vision_utils.get_vision_interpolation_indices_and_weights``
and ``get_vision_position_ids`` step by step).
"""

from __future__ import annotations

import numpy as np

from linecam.runtime.vlm.rope import Grid, vision_position_ids, vision_rotary


def _axis_taps(index: np.ndarray, size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
    floor = np.floor(src)
    offsets = np.arange(2)
    taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
    dist = np.abs(src[:, None] - floor[:, None] - offsets).astype(np.float32)
    return taps, np.clip(1 - dist, 0, None).astype(np.float32)


def position_interpolation(grid: Grid, side: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """``(indices [n, 4] int64, weights [n, 4] float32)`` into the flattened ``side x side`` table."""
    t, h, w = grid
    within = np.tile(np.arange(h * w), t)
    blocks_w = w // merge
    in_col = within % merge
    in_row = (within // merge) % merge
    block_col = (within // (merge * merge)) % blocks_w
    block_row = within // (merge * merge * blocks_w)
    row, col = block_row * merge + in_row, block_col * merge + in_col
    ht, hw_ = _axis_taps(row, h, side)
    wt, ww = _axis_taps(col, w, side)
    idx = (ht[:, :, None] * side + wt[:, None, :]).reshape(-1, 4)
    wts = (hw_[:, :, None] * ww[:, None, :]).reshape(-1, 4)
    return idx.astype(np.int64), np.ascontiguousarray(wts, dtype=np.float32)


def vision_feeds(pixel_values: np.ndarray, grid: Grid, *, side: int, merge: int, head_dim: int,
                 theta: float) -> dict[str, np.ndarray]:
    """Every input of the Qwen3 vision graph for one image of patch grid ``grid``."""
    idx, wts = position_interpolation(grid, side, merge)
    cos, sin = vision_rotary(vision_position_ids([grid], merge), head_dim, theta)
    return {"pixel_values": pixel_values, "pos_indices": idx, "pos_weights": wts, "rotary_cos": cos,
            "rotary_sin": sin}
