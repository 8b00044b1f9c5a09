"""A simulated line-scan camera: a long web as frames of ``lines_per_frame`` lines.

A line-scan camera delivers one line of ``width`` pixels at a time, grouped into frames of
``Height`` lines; the material (steel strip, paper, film, foil) moves past it, so
consecutive frames are consecutive stretches of one continuous *web*. Down-web position
is ``(frame index x Height + row) x mm per line`` (or encoder counts x mm per count);
cross-web position is ``column x mm per pixel``. :mod:`linecam.runtime.linescan` turns such
frames into inspection tiles and maps detections back to millimetres.

:class:`SyntheticWebSource` generates a long web (bright textured material with dark
defects at known millimetre positions, some across frame boundaries) and delivers it as
frames of ``lines_per_frame`` lines at a set line rate, optionally dropping frames (a
gap in frame ids, as a camera losing buffers does). ``source.defects`` is the ground truth.
Its settings are :class:`linecam.config.SyntheticWebCamera`.
"""

from __future__ import annotations

import bisect
import functools
import logging
import math
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from linecam.camera.base import FrameSource, SourceExhausted
from linecam.camera.frame import Frame
from linecam.camera.replay import Pacer
from linecam.config import SyntheticWebCamera, WebDefectSpec
from linecam.errors import CameraError

logger = logging.getLogger(__name__)

DEFECT_KINDS: tuple[str, ...] = ("spot", "scratch", "streak")
#: Grey level of the bright web and of a defect's core (0..255): dark defects on a bright web.
WEB_LEVEL = 200.0
DEFECT_LEVEL = 40
_BANK_ROWS = 2048  # rows of pre-computed texture, cycled down-web


@dataclass(frozen=True, slots=True)
class PlacedDefect:
    """Ground truth: one defect on the synthetic web. Pixel box ``(x0, y0, x1, y1)``
    (continuous; y in web lines from line 0) and the same in millimetres."""

    id: int
    kind: str
    cross_mm: float  # centre
    down_mm: float
    width_mm: float
    length_mm: float
    box_px: tuple[float, float, float, float]

    @property
    def lines(self) -> tuple[int, int]:
        """Web lines ``[first, last)`` the defect touches."""
        return math.floor(self.box_px[1] + 1e-9), math.ceil(self.box_px[3] - 1e-9)


@functools.lru_cache(maxsize=4)  # a pure function of its arguments: memoised, not shared state
def _texture_bank(width: int, seed: int) -> np.ndarray:
    """(rows, width) uint8 web texture: a gentle cross-web profile, machine-direction streaks
    and grain. Rows are cycled down-web, so frame boundaries are invisible."""
    rng = np.random.default_rng((seed, 0x5EB))
    x = np.linspace(-1.0, 1.0, width, dtype=np.float32)
    profile = WEB_LEVEL - 8.0 * x * x  # slightly darker edges, as lighting falls off
    streaks = cv2.GaussianBlur(rng.normal(0, 2.0, (1, width)).astype(np.float32), (0, 0), 1.5).ravel()
    grain = rng.normal(0, 3.0, (_BANK_ROWS, width)).astype(np.float32)
    grain = cv2.GaussianBlur(grain, (0, 0), 0.6)
    bank = np.clip(profile + streaks + grain, 0, 255).astype(np.uint8)
    bank.setflags(write=False)
    return bank


class SyntheticWebSource(FrameSource):
    """A simulated line-scan camera looking at a moving web.

    Frames are ``(lines_per_frame, width, 1)`` uint8 (``mono``) or RGB, ``frame_id`` = frame
    index (frames listed in ``drop_frames`` are never delivered: a gap in ids), paced at
    ``line_rate_hz / lines_per_frame`` frames per second (``None``: as fast as read).
    ``meta``: ``line0`` (web line of the frame's first row), ``defects`` (ids of defects
    in the frame), ``encoder_count`` (with ``encoder_counts_per_line``) and
    ``dropped_before`` (frames lost just before this one).

    Defects: ``defects`` (explicit, millimetres) plus random ones, ``defect_rate`` expected
    per frame, sizes in ``defect_size_px``; :attr:`defects` lists all of them (random ones
    up to the frames generated so far, or all of them for a finite web).
    """

    def __init__(
        self,
        width: int = 1024,
        lines_per_frame: int = 256,
        line_rate_hz: float | None = 10000.0,
        frames: int | None = None,
        mm_per_px_cross: float = 0.1,
        mm_per_line: float = 0.1,
        defects: Sequence[WebDefectSpec | dict[str, Any]] = (),
        defect_rate: float = 0.0,
        defect_size_px: tuple[int, int] = (6, 24),
        drop_frames: Collection[int] = (),
        seed: int = 0,
        mono: bool = True,
        encoder_counts_per_line: float | None = None,
    ) -> None:
        if width < 16 or lines_per_frame < 1:
            raise CameraError(f"synthetic web {width} px x {lines_per_frame} lines is too small: use width >= 16")
        if frames is not None and frames < 0:
            raise CameraError(f"frames {frames} is negative: use a count, or leave it out for an endless web")
        if not (mm_per_px_cross > 0 and mm_per_line > 0):
            raise CameraError("mm_per_px_cross and mm_per_line must be positive")
        self.width, self.lines_per_frame = int(width), int(lines_per_frame)
        self.line_rate_hz = line_rate_hz
        self.frames = frames
        self.mm_per_px_cross, self.mm_per_line = float(mm_per_px_cross), float(mm_per_line)
        self.defect_rate = float(defect_rate)
        self.defect_size_px = (int(defect_size_px[0]), int(defect_size_px[1]))
        self.drop_frames = frozenset(int(i) for i in drop_frames)
        self.seed = int(seed)
        self.mono = bool(mono)
        self.encoder_counts_per_line = encoder_counts_per_line
        self.name = f"synthetic_web:{self.seed}"
        self._pacer = Pacer(None if line_rate_hz is None else float(line_rate_hz) / self.lines_per_frame)
        self._explicit = [self._place(i, WebDefectSpec.model_validate(d) if isinstance(d, dict) else d)
                          for i, d in enumerate(defects)]
        self._explicit.sort(key=lambda d: d.box_px[1])
        self._explicit_y0 = [d.box_px[1] for d in self._explicit]
        self._max_len_lines = max((d.box_px[3] - d.box_px[1] for d in self._explicit), default=0.0)
        self._next = 0
        self._opened = False
        self._last_delivered: int | None = None

    @classmethod
    def from_config(cls, cam: SyntheticWebCamera) -> SyntheticWebSource:
        return cls(width=cam.width, lines_per_frame=cam.lines_per_frame, line_rate_hz=cam.line_rate_hz,
                   frames=cam.frames, mm_per_px_cross=cam.mm_per_px_cross, mm_per_line=cam.mm_per_line,
                   defects=cam.defects, defect_rate=cam.defect_rate, defect_size_px=cam.defect_size_px,
                   drop_frames=cam.drop_frames, seed=cam.seed, mono=cam.mono,
                   encoder_counts_per_line=cam.encoder_counts_per_line)

    # -- ground truth --------------------------------------------------------------------
    def _place(self, i: int, spec: WebDefectSpec) -> PlacedDefect:
        cx, cy = spec.cross_mm / self.mm_per_px_cross, spec.down_mm / self.mm_per_line
        hw, hl = spec.width_mm / self.mm_per_px_cross / 2, spec.length_mm / self.mm_per_line / 2
        box = (cx - hw, cy - hl, cx + hw, cy + hl)
        if box[0] < 0 or box[2] > self.width:
            raise CameraError(f"defect {i} ({spec.cross_mm} mm across, {spec.width_mm} mm wide) does not fit the "
                              f"{self.width * self.mm_per_px_cross:g} mm wide web: move it")
        return PlacedDefect(i, spec.kind, spec.cross_mm, spec.down_mm, spec.width_mm, spec.length_mm, box)

    @functools.lru_cache(maxsize=256)  # noqa: B019 - bounded, per instance via self in the key
    def _random_in(self, k: int) -> tuple[PlacedDefect, ...]:
        """Random defects whose top edge falls in frame ``k`` (a pure function of seed and k)."""
        if self.defect_rate <= 0:
            return ()
        rng = np.random.default_rng((self.seed, k, 0xDEF))
        if rng.random() >= self.defect_rate:
            return ()
        lo, hi = self.defect_size_px
        w_px, l_px = float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))
        kind = DEFECT_KINDS[int(rng.integers(len(DEFECT_KINDS)))]
        if kind == "streak":  # long and thin, along the web
            w_px = max(lo, w_px / 3)
        x0 = float(rng.uniform(0, self.width - w_px))
        y0 = k * self.lines_per_frame + float(rng.uniform(0, self.lines_per_frame))
        spec = WebDefectSpec(cross_mm=(x0 + w_px / 2) * self.mm_per_px_cross,
                             down_mm=(y0 + l_px / 2) * self.mm_per_line,
                             width_mm=w_px * self.mm_per_px_cross, length_mm=l_px * self.mm_per_line, kind=kind)
        return (self._place(1_000_000 + k, spec),)

    @property
    def defects(self) -> list[PlacedDefect]:
        """Every defect placed on the web (random ones up to the last frame generated, or the
        whole web when ``frames`` is set), sorted down-web."""
        last = self.frames if self.frames is not None else self._next
        out = list(self._explicit)
        for k in range(last):
            out.extend(self._random_in(k))
        return sorted(out, key=lambda d: (d.box_px[1], d.box_px[0]))

    def _defects_touching(self, line0: int, line1: int) -> list[PlacedDefect]:
        h = self.lines_per_frame
        # explicit: sorted by top edge; any starting before line1 and ending after line0
        i1 = bisect.bisect_left(self._explicit_y0, line1)
        i0 = bisect.bisect_left(self._explicit_y0, line0 - self._max_len_lines - 1)
        out = [d for d in self._explicit[i0:i1] if d.box_px[3] > line0]
        hi = self.defect_size_px[1]
        k0 = max(0, (line0 - hi - 1) // h)
        for k in range(k0, line1 // h + 1):
            out.extend(d for d in self._random_in(k) if d.box_px[1] < line1 and d.box_px[3] > line0)
        return out

    # -- rendering -----------------------------------------------------------------------
    def render(self, k: int) -> np.ndarray:
        """Frame ``k`` of the web as ``(lines_per_frame, width)`` uint8 (deterministic)."""
        h, w = self.lines_per_frame, self.width
        line0 = k * h
        bank = _texture_bank(w, self.seed)
        start = line0 % _BANK_ROWS
        rows = (np.arange(start, start + h) % _BANK_ROWS) if start + h > _BANK_ROWS else slice(start, start + h)
        img = np.array(bank[rows], dtype=np.uint8, copy=True)
        for d in self._defects_touching(line0, line0 + h):
            _draw_defect(img, d, line0)
        return img

    # -- FrameSource ---------------------------------------------------------------------
    def open(self) -> None:
        _texture_bank(self.width, self.seed)  # pay for the texture now, not on the first frame
        self._next = 0
        self._last_delivered = None
        self._pacer.reset()
        self._opened = True

    def close(self) -> None:
        self._opened = False

    def read(self, timeout: float) -> Frame | None:
        if not self._opened:
            raise CameraError(f"{self.name} is not open: call open() first")
        # A dropped frame is one the camera lost: its time passes, it is never delivered.
        while True:
            if self.frames is not None and self._next >= self.frames:
                raise SourceExhausted(f"synthetic web ended after {self.frames} frames")
            if not self._pacer.wait(timeout):
                return None
            k = self._next
            self._next += 1
            if k not in self.drop_frames:
                break
        img = self.render(k)
        image = img[:, :, None] if self.mono else cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
        host_ns = time.monotonic_ns()
        line0 = k * self.lines_per_frame
        meta: dict[str, Any] = {
            "line0": line0,
            "defects": [d.id for d in self._defects_touching(line0, line0 + self.lines_per_frame)],
            "dropped_before": 0 if self._last_delivered is None else k - self._last_delivered - 1,
        }
        if self.encoder_counts_per_line is not None:
            meta["encoder_count"] = int(round(line0 * self.encoder_counts_per_line))
        self._last_delivered = k
        return Frame(frame_id=k, image=image, timestamp_ns=host_ns, clock="host_monotonic", host_ns=host_ns,
                     bit_depth=8, truth=bool(meta["defects"]), meta=meta)


@functools.lru_cache(maxsize=1024)  # a pure function of the (frozen) defect: memoised, not shared state
def _defect_mask(d: PlacedDefect) -> tuple[int, int, np.ndarray]:
    """``(x, line, alpha)``: the defect's coverage (0..1, anti-aliased) in a patch whose top-left
    pixel is web pixel ``(x, line)``. Drawn once, in web coordinates, so the parts of a defect
    in two frames are cut from one drawing and meet exactly."""
    x0, y0, x1, y1 = d.box_px
    px, py = math.floor(x0) - 2, math.floor(y0) - 2
    m = np.zeros((math.ceil(y1) + 2 - py, math.ceil(x1) + 2 - px), np.uint8)
    x0, x1, y0, y1 = x0 - px, x1 - px, y0 - py, y1 - py
    s = 16  # 4 fractional bits (shift=4)
    if d.kind == "scratch":  # a diagonal stroke inside the box, thickness ~ the box's shorter side / 3
        t = max(2.0, min(x1 - x0, y1 - y0) / 3)
        # the stroke's round caps reach t/2 beyond its ends: keep them inside the box
        a, b = (x0 + t / 2, y0 + t / 2), (x1 - t / 2, y1 - t / 2)
        cv2.line(m, (round(a[0] * s), round(a[1] * s)), (round(b[0] * s), round(b[1] * s)), 255, max(1, round(t)),
                 cv2.LINE_AA, shift=4)
    elif d.kind == "streak":  # a filled rectangle with soft edges
        pts = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]]) * s
        cv2.fillPoly(m, [np.round(pts).astype(np.int32)], 255, cv2.LINE_AA, shift=4)
    else:  # spot: a filled ellipse
        c = (round((x0 + x1) / 2 * s), round((y0 + y1) / 2 * s))
        axes = (max(1, round((x1 - x0) / 2 * s)), max(1, round((y1 - y0) / 2 * s)))
        cv2.ellipse(m, c, axes, 0, 0, 360, 255, -1, cv2.LINE_AA, shift=4)
    alpha = m.astype(np.float32) / 255.0
    alpha.setflags(write=False)
    return px, py, alpha


def _draw_defect(img: np.ndarray, d: PlacedDefect, line0: int) -> None:
    """Darken ``img`` (a frame whose first row is web line ``line0``) where ``d`` lies."""
    px, py, alpha = _defect_mask(d)
    h, w = img.shape
    r0, r1 = max(py, line0), min(py + alpha.shape[0], line0 + h)
    c0, c1 = max(px, 0), min(px + alpha.shape[1], w)
    if r1 <= r0 or c1 <= c0:
        return
    a = alpha[r0 - py : r1 - py, c0 - px : c1 - px]
    region = img[r0 - line0 : r1 - line0, c0:c1]
    region[:] = np.rint(region * (1.0 - a) + DEFECT_LEVEL * a).astype(np.uint8)
