"""Host-side position math that does not trace: Qwen-VL vision rotary, windows, masks, M-RoPE.

Qwen2.5-VL's vision encoder computes its 2-D rotary positions, window permutation and
per-image / per-window attention boundaries in Python loops over ``image_grid_thw``;
traced, they would freeze one image size into the graph. The exported vision graph
therefore takes them as inputs and this module computes them with numpy, following
transformers' ``vision_utils`` and ``Qwen2_5_VLModel.get_rope_index`` step by step.

The decoder's multimodal RoPE (M-RoPE) positions are 3 rows (temporal, height, width):
text tokens advance all three together, image tokens get their grid coordinates. After
the prompt, every new token sits at ``cache_length + rope_delta`` on all three rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Additive mask value for "may not attend" (what transformers' eager attention uses).
MASK_MIN = float(np.finfo(np.float32).min)

Grid = tuple[int, int, int]  # (t, h, w) in patches


def vision_position_ids(grids: Sequence[Grid], merge: int) -> np.ndarray:
    """``[n_patches, 2]`` (row, col) of every patch, laid out block-major over merge x merge blocks."""
    out = []
    for t, h, w in grids:
        hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        shape = (h // merge, merge, w // merge, merge)
        hp = hh.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        wp = ww.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([hp, wp], axis=-1), (t, 1)))
    return np.concatenate(out, axis=0).astype(np.int64)


def vision_rotary(pos_ids: np.ndarray, head_dim: int, theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    """Axial 2-D rope: ``(cos, sin)`` each ``[n_patches, head_dim]`` float32."""
    spatial = head_dim // 2
    inv_freq = (1.0 / (theta ** (np.arange(0, spatial, 2, dtype=np.float32) / spatial))).astype(np.float32)
    freqs = pos_ids[..., None].astype(np.float32) * inv_freq  # [n, 2, spatial/2]
    out = []
    for f in (np.cos(freqs), np.sin(freqs)):
        hw = np.concatenate([f[:, 0], f[:, 1]], axis=-1)
        out.append(np.ascontiguousarray(np.concatenate([hw, hw], axis=-1), dtype=np.float32))
    return out[0], out[1]


def vision_window_index(grids: Sequence[Grid], merge: int, window_size: int,
                        patch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(window_index [n_patches / merge^2], cu_window_seqlens)`` as in transformers' vision_utils."""
    window_index: list[np.ndarray] = []
    cu = [0]
    offset = 0
    vw = window_size // merge // patch_size
    unit = merge * merge
    for t, h, w in grids:
        lh, lw = h // merge, w // merge
        index = np.arange(t * lh * lw).reshape(t, lh, lw)
        ph, pw = vw - lh % vw, vw - lw % vw
        nh, nw = (lh + ph) // vw, (lw + pw) // vw
        padded = np.pad(index, ((0, 0), (0, ph), (0, pw)), constant_values=-100)
        padded = padded.reshape(t, nh, vw, nw, vw).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, vw, vw)
        seqlens = (padded != -100).sum(axis=(2, 3)).reshape(-1)
        flat = padded.reshape(-1)
        window_index.append(flat[flat != -100] + offset)
        cu.extend((np.cumsum(seqlens) * unit + cu[-1]).tolist())
        offset += t * lh * lw
    cu_arr = np.asarray(cu, dtype=np.int64)
    keep = np.concatenate([[True], cu_arr[1:] != cu_arr[:-1]])  # unique_consecutive
    return np.concatenate(window_index).astype(np.int64), cu_arr[keep]


def image_cu_seqlens(grids: Sequence[Grid]) -> np.ndarray:
    """Boundaries of full attention: one segment per temporal frame of each image."""
    lens = [h * w for t, h, w in grids for _ in range(t)]
    return np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)


def block_mask(cu_seqlens: np.ndarray) -> np.ndarray:
    """Additive ``[n, n]`` float32 mask: 0 inside each ``[cu[i], cu[i+1])`` block, MASK_MIN elsewhere."""
    n = int(cu_seqlens[-1])
    seg = np.zeros(n, dtype=np.int64)
    seg[cu_seqlens[1:-1]] = 1
    seg = np.cumsum(seg)
    return np.where(seg[:, None] == seg[None, :], np.float32(0.0), np.float32(MASK_MIN)).astype(np.float32)


@dataclass(frozen=True, slots=True)
class QwenVisionInputs:
    """Everything the Qwen2.5-VL vision graph takes besides ``pixel_values``."""

    rotary_cos: np.ndarray  # [n, head_dim] float32, window-permuted
    rotary_sin: np.ndarray
    window_index: np.ndarray  # [n / merge^2] int64
    reverse_index: np.ndarray  # argsort(window_index)
    full_mask: np.ndarray  # [n, n] float32 additive, per image
    window_mask: np.ndarray  # [n, n] float32 additive, per window

    def feeds(self) -> dict[str, np.ndarray]:
        return {"rotary_cos": self.rotary_cos, "rotary_sin": self.rotary_sin,
                "window_index": self.window_index, "reverse_index": self.reverse_index,
                "full_mask": self.full_mask, "window_mask": self.window_mask}


def qwen_vision_inputs(grids: Sequence[Grid], *, merge: int, window_size: int, patch_size: int,
                       head_dim: int, theta: float = 10000.0) -> QwenVisionInputs:
    """The host-computed inputs of the Qwen2.5-VL vision graph for images of patch grids ``grids``."""
    unit = merge * merge
    cos, sin = vision_rotary(vision_position_ids(grids, merge), head_dim, theta)
    widx, cu_win = vision_window_index(grids, merge, window_size, patch_size)
    n = cos.shape[0]

    def permute(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x.reshape(n // unit, unit, -1)[widx].reshape(n, -1))

    return QwenVisionInputs(
        rotary_cos=permute(cos), rotary_sin=permute(sin), window_index=widx,
        reverse_index=np.argsort(widx, kind="stable").astype(np.int64),
        # Window permutation stays inside each image, so image boundaries are unchanged.
        full_mask=block_mask(image_cu_seqlens(grids)), window_mask=block_mask(cu_win))


def mrope_positions(input_ids: Sequence[int] | np.ndarray, image_token_id: int, grids: Sequence[Grid],
                    merge: int) -> tuple[np.ndarray, int]:
    """3-D M-RoPE positions ``[3, seq]`` int64 of a prompt and its rope delta.

    Each run of ``image_token_id`` is one image (in order of ``grids``); text runs advance
    all rows together. ``delta = max(position) + 1 - seq``; decode positions are then
    ``cache_length + delta``.
    """
    ids = np.asarray(input_ids).reshape(-1)
    is_img = ids == image_token_id
    pieces: list[np.ndarray] = []
    cur = 0
    i = 0
    grid_iter = iter(grids)
    n = ids.shape[0]
    while i < n:
        j = i
        while j < n and is_img[j] == is_img[i]:
            j += 1
        if not is_img[i]:
            pieces.append(np.broadcast_to(np.arange(j - i) + cur, (3, j - i)))
            cur += j - i
        else:
            try:
                t, h, w = next(grid_iter)
            except StopIteration:
                raise ValueError("more image-token runs in the prompt than images") from None
            lt, lh, lw = t, h // merge, w // merge
            if lt * lh * lw != j - i:
                raise ValueError(f"image-token run of {j - i} does not match grid {t}x{h}x{w} (merge {merge})")
            tt, hh, ww = np.meshgrid(np.arange(lt), np.arange(lh) + cur, np.arange(lw) + cur, indexing="ij")
            tt = tt + cur
            pieces.append(np.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)]))
            cur += max(h, w) // merge
        i = j
    pos = np.concatenate(pieces, axis=1).astype(np.int64)
    return pos, int(pos.max()) + 1 - n
