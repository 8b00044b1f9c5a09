"""Line-scan geometry: tile columns, the :class:`Tile` a frame carries, down-web position
(:class:`DownWeb`) and the rolling web buffer tiles are cut from (:class:`WebBuffer`)."""

from __future__ import annotations

import bisect
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from linecam.camera.frame import Frame
from linecam.errors import ConfigError

logger = logging.getLogger(__name__)

GapReason = Literal["frame_gap", "invalid_frame", "camera_reconnect", "frame_id_reset"]


# --- geometry -------------------------------------------------------------------------------
def check_geometry(tile: tuple[int, int], overlap: int, web_width: int | None = None) -> None:
    """The tile, overlap and web width ``linecam run`` (and ``linecam check``) accept: ConfigError if not."""
    tw, th = int(tile[0]), int(tile[1])
    if tw <= 0 or th <= 0:
        raise ConfigError(f"linescan.tile_size {tw}x{th} must be positive")
    if overlap >= min(tw, th):
        raise ConfigError(f"linescan.overlap_px {overlap} must be smaller than the tile ({tw}x{th}): "
                          "lower it or raise linescan.tile_size")
    if web_width is not None and web_width < tw:
        raise ConfigError(f"the camera's lines are {web_width} px wide, narrower than the {tw} px tile: "
                          "set linescan.tile_size to at most the line width")


def tile_size_for(tile_size: tuple[int, int] | None, input_size: tuple[int, int] | list[int],
                  crop: object | None) -> tuple[int, int]:
    """(width, height) of a tile: ``linescan.tile_size`` or the model's input size (``[h, w]``)."""
    if crop is not None:
        raise ConfigError("the model bundle crops its input, but line-scan tiles are cut to the model input: "
                          "use a bundle without preprocess.crop for linescan (model.bundle)")
    h, w = input_size
    return (int(tile_size[0]), int(tile_size[1])) if tile_size else (int(w), int(h))


def tile_columns(web_width: int, tile_width: int, overlap: int) -> list[int]:
    """Left edges of the tiles across a web: every ``tile_width - overlap`` pixels, the last
    one flush with the right edge (so the whole width is covered)."""
    if tile_width > web_width:
        raise ValueError(f"tile width {tile_width} > web width {web_width}")
    stride = tile_width - overlap
    xs = list(range(0, web_width - tile_width + 1, stride))
    if xs[-1] != web_width - tile_width:
        xs.append(web_width - tile_width)
    return xs


@dataclass(frozen=True, slots=True)
class Tile:
    """One inspection tile: web pixels ``[x, x + width) x [line, line + height)``.

    ``valid_height`` < ``height`` only for the tail of a segment shorter than a tile (the
    rest is edge-padded and ignored). ``fields`` is the verdict's ``tile`` object.
    """

    id: int
    segment: int
    row: int
    col: int
    x: int
    line: int
    width: int
    height: int
    valid_height: int
    frames: tuple[int, int]
    fields: dict[str, Any] = field(compare=False, hash=False)


def tile_fields(frame: Frame) -> dict[str, Any] | None:
    """The verdict's ``tile`` object for a tile frame; None for an ordinary frame."""
    tile = frame.meta.get("tile") if frame.meta else None
    return tile.fields if isinstance(tile, Tile) else None


class DownWeb:
    """Web line -> down-web millimetres from the run's first line, and -> camera frame id.

    Anchors are the frames' first lines. Without an encoder, mm = line x ``mm_per_line``.
    With ``mm_per_count`` and frames that carry counts, counts are interpolated linearly
    between frame anchors (extrapolated past the last one with the last slope).
    """

    def __init__(self, mm_per_line: float, mm_per_count: float | None = None, keep: int = 65536) -> None:
        self.mm_per_line = float(mm_per_line)
        self.mm_per_count = mm_per_count
        self.keep = keep
        self._lock = threading.Lock()
        self._lines: list[int] = []
        self._frames: list[int] = []
        self._counts: list[float] = []  # encoder mode only
        self._count0: float | None = None
        self.source: Literal["lines", "encoder"] = "lines"
        self._mode_known = False

    def add_frame(self, line0: int, frame_id: int, encoder_count: float | None) -> None:
        with self._lock:
            if not self._mode_known:
                self._mode_known = True
                if self.mm_per_count is not None:
                    if encoder_count is None:
                        logger.warning("linescan.encoder is set but frames carry no encoder count: down-web "
                                       "positions come from mm_per_line")
                    else:
                        self.source = "encoder"
                        self._count0 = float(encoder_count)
            if self.source == "encoder" and encoder_count is None:
                encoder_count = self._count_at(line0)  # a frame without a count: keep the line's estimate
            self._lines.append(int(line0))
            self._frames.append(int(frame_id))
            if self.source == "encoder":
                self._counts.append(float(encoder_count))  # type: ignore[arg-type]
            if len(self._lines) > 2 * self.keep:  # positions of long-gone lines are not asked for
                del self._lines[: self.keep], self._frames[: self.keep]
                if self._counts:
                    del self._counts[: self.keep]

    def _count_at(self, line: float) -> float:
        lines, counts = self._lines, self._counts
        n = len(counts)
        per_line = self.mm_per_line / float(self.mm_per_count)  # type: ignore[arg-type]
        if n == 0:
            return float(self._count0 or 0.0)
        i = max(0, bisect.bisect_right(lines, line) - 1)
        if i + 1 < n:
            slope = (counts[i + 1] - counts[i]) / max(lines[i + 1] - lines[i], 1)
        elif n >= 2:
            slope = (counts[-1] - counts[-2]) / max(lines[-1] - lines[-2], 1)
        else:
            slope = per_line
        return counts[i] + (line - lines[i]) * slope

    def mm(self, line: float) -> float:
        if self.source == "lines":
            return float(line) * self.mm_per_line
        per_count = float(self.mm_per_count or 0.0)
        with self._lock:
            return (self._count_at(line) - float(self._count0 or 0.0)) * per_count

    def frame_at(self, line: int) -> int:
        """The camera frame id that delivered web line ``line``."""
        with self._lock:
            i = max(0, bisect.bisect_right(self._lines, line) - 1)
            return self._frames[i] if self._frames else 0


class WebBuffer:
    """The recent web lines of the current segment, contiguous in memory.

    Lines ``[start_line, end_line)`` are held. :meth:`append` adds a frame below the last
    line; lines before ``keep_from`` may be dropped to make room (moved, not reallocated,
    so a tile is always one slice).
    """

    def __init__(self, width: int, channels: int, dtype: np.dtype, capacity_lines: int) -> None:
        self._buf = np.empty((capacity_lines, width, channels), dtype=dtype)
        self.start_line = 0
        self.end_line = 0

    def reset(self, line0: int) -> None:
        self.start_line = self.end_line = int(line0)

    def append(self, image: np.ndarray, keep_from: int) -> None:
        h = image.shape[0]
        keep_from = min(max(keep_from, self.start_line), self.end_line)
        n = self.end_line - self.start_line
        cap = self._buf.shape[0]
        if n + h > cap:
            drop = keep_from - self.start_line
            kept = n - drop
            if kept + h > cap:  # a frame taller than expected: grow once
                grown = np.empty((2 * (kept + h),) + self._buf.shape[1:], dtype=self._buf.dtype)
                grown[:kept] = self._buf[drop:n]
                self._buf = grown
            elif kept:
                self._buf[:kept] = self._buf[drop:n]  # overlapping move: numpy copies via a temporary
            self.start_line = keep_from
            n = kept
        self._buf[n : n + h] = image
        self.end_line += h

    def view(self, line0: int, line1: int, x0: int, x1: int) -> np.ndarray:
        a, b = line0 - self.start_line, line1 - self.start_line
        if a < 0 or b > self.end_line - self.start_line:
            raise IndexError(f"lines {line0}..{line1} not held (have {self.start_line}..{self.end_line})")
        return self._buf[a:b, x0:x1]
