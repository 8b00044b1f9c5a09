"""A simulated production line: one turned-metal washer per frame, some of them defective.

Used by the demo and the end-to-end tests, where a real camera and real defects
are not at hand. Every frame shows one part on a plain conveyor belt with a small
random pose jitter, a brightness change and one of a few texture variants, so good
parts are alike but never identical. With probability ``defect_rate`` the part
carries one defect of :data:`DEFECT_KINDS`; ``Frame.truth`` says whether it does
and ``meta['defects']`` where (``bbox = [x, y, w, h]`` in image pixels).

Every defect changes at least ~0.2 % of the image well above the texture noise
(see ``_MIN_AREA_FRACTION``), so an anomaly model trained on good parts can be
expected to find it. Rendering a 320x320 frame takes 1-2 ms: the
textures are computed once per image size (``_assets``) and frames are crops and
blends of them.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from linecam.camera.base import FrameSource, SourceExhausted
from linecam.camera.frame import Frame
from linecam.camera.replay import Pacer
from linecam.errors import CameraError

logger = logging.getLogger(__name__)

#: Defect kinds the synthetic line produces.
DEFECT_KINDS: tuple[str, ...] = ("scratch", "spot", "chip", "stain", "crack")

_MIN_SIDE = 64
_N_TEXTURES = 4
#: a defect must visibly change at least this fraction of the image
_MIN_AREA_FRACTION = 0.002
#: intensity change (0..255) from which a pixel counts as part of a defect's bbox
_BBOX_LEVEL = 4.0
_BACKGROUND_RGB = np.array([58.0, 62.0, 60.0], np.float32)  # dark grey-green belt
_METAL_TINT = np.array([0.97, 1.0, 1.04], np.float32)  # slightly cool steel


@dataclass(frozen=True)
class _Assets:
    """Everything about a part that does not change from frame to frame (read-only arrays)."""

    width: int
    height: int
    jitter: int  # max pose offset in pixels
    r_in: float
    r_out: float
    textures: tuple[np.ndarray, ...]  # padded (H+2J, W+2J, 3) float32 RGB metal, centred part
    alpha: np.ndarray  # padded (H+2J, W+2J) float32 part coverage, anti-aliased
    shadow: np.ndarray  # padded (H+2J, W+2J) float32 soft drop shadow
    background: np.ndarray  # (H, W, 3) float32 belt
    noise: np.ndarray  # (2H, 2W, 3) float32 sensor noise to crop from


def _freeze(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


@functools.lru_cache(maxsize=4)  # a pure function of the size: memoised, not shared state
def _assets(width: int, height: int) -> _Assets:
    m = min(width, height)
    s = m / 320.0
    jitter = max(2, round(4 * s))
    ph, pw = height + 2 * jitter, width + 2 * jitter
    r_out, r_in = 0.40 * m, 0.17 * m
    # Fixed seed: the *part design* is constant; per-frame variation comes from the caller's rng.
    rng = np.random.default_rng(20240611)

    yy, xx = np.mgrid[0:ph, 0:pw].astype(np.float32)
    cy, cx = (ph - 1) / 2.0, (pw - 1) / 2.0
    dy, dx = yy - cy, xx - cx
    r = np.sqrt(dx * dx + dy * dy)
    alpha = np.clip(r_out - r + 0.5, 0, 1) * np.clip(r - r_in + 0.5, 0, 1)

    # Turned steel: concentric lathe grooves, fine grain, a lit-from-top-left
    # gradient and chamfer highlights at both edges.
    band = (r - r_in) / (r_out - r_in)
    grooves = 3.0 * np.sin(2 * math.pi * r / (2.7 * max(s, 0.5)))
    light = -14.0 * (dx + dy) / (math.sqrt(2) * r_out)
    chamfer = 22.0 * np.exp(-(((r_out - r) / (2.5 * s + 0.5)) ** 2)) - 18.0 * np.exp(
        -(((r - r_in) / (2.5 * s + 0.5)) ** 2)
    )
    shading = 150.0 + grooves + light + chamfer + 6.0 * np.cos(band * math.pi)
    textures = []
    for _ in range(_N_TEXTURES):
        grain = cv2.GaussianBlur(rng.normal(0, 6.0, (ph, pw)).astype(np.float32), (0, 0), 0.7)
        mottle = cv2.GaussianBlur(rng.normal(0, 1.0, (ph, pw)).astype(np.float32), (0, 0), 9.0 * s + 1)
        mottle *= 5.0 / (mottle.std() + 1e-6)
        grey = shading + grain + mottle
        textures.append(_freeze((grey[:, :, None] * _METAL_TINT).astype(np.float32)))

    hard = (alpha > 0.5).astype(np.float32)
    shadow = cv2.GaussianBlur(hard, (0, 0), 3.0 * s + 1)
    off = max(1, round(3 * s))
    shadow = np.roll(shadow, (off, off), axis=(0, 1)) * 0.35

    belt = cv2.GaussianBlur(rng.normal(0, 2.0, (height, width)).astype(np.float32), (0, 0), 1.0)
    background = _BACKGROUND_RGB + belt[:, :, None]
    noise = rng.normal(0, 1.6, (2 * height, 2 * width, 3)).astype(np.float32)
    return _Assets(
        width=width,
        height=height,
        jitter=jitter,
        r_in=r_in,
        r_out=r_out,
        textures=tuple(textures),
        alpha=_freeze(alpha.astype(np.float32)),
        shadow=_freeze(shadow.astype(np.float32)),
        background=_freeze(background.astype(np.float32)),
        noise=_freeze(noise),
    )


# --- defects ---------------------------------------------------------------------------
# Each drawer returns a float32 mask in [0, 1] (full frame) and the intensity change
# per RGB channel at mask == 1; "chip" returns a material-removal mask instead.


def _polar(cx: float, cy: float, r: float, phi: float) -> tuple[float, float]:
    return cx + r * math.cos(phi), cy + r * math.sin(phi)


def _draw_polyline(
    shape: tuple[int, int], pts: list[tuple[float, float]], thickness: int, taper: bool = False
) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    p = np.round(np.array(pts) * 16).astype(np.int32)  # 4 fractional bits (shift=4)
    if not taper:
        cv2.polylines(m, [p.reshape(-1, 1, 2)], False, 255, thickness, cv2.LINE_AA, shift=4)
    else:  # fading ends, as a tool mark that enters and leaves the surface
        n = len(p) - 1
        for i in range(n):
            level = int(255 * (0.4 + 0.6 * math.sin(math.pi * (i + 0.5) / n)))
            seg = np.zeros_like(m)
            cv2.line(seg, tuple(p[i]), tuple(p[i + 1]), level, thickness, cv2.LINE_AA, shift=4)
            np.maximum(m, seg, out=m)
    return m.astype(np.float32) / 255.0


def _scratch(rng, shape, cx, cy, a: _Assets, s):
    phi = rng.uniform(0, 2 * math.pi)
    r0 = rng.uniform(a.r_in + 0.3 * (a.r_out - a.r_in), a.r_out - 0.3 * (a.r_out - a.r_in))
    x0, y0 = _polar(cx, cy, r0, phi)
    heading = phi + math.pi / 2 + rng.uniform(-0.45, 0.45)  # roughly tangential: stays on the ring
    length = rng.uniform(70, 110) * s
    bend = rng.uniform(-0.004, 0.004) / max(s, 0.25)
    pts = []
    n = 12
    for i in range(n + 1):
        t = (i / n - 0.5) * length
        h = heading + bend * t
        pts.append((x0 + t * math.cos(h), y0 + t * math.sin(h)))
    mask = _draw_polyline(shape, pts, max(2, round(2 * s)), taper=True)
    mask = cv2.GaussianBlur(mask, (0, 0), 0.6)
    level = rng.uniform(75, 105) * (1 if rng.random() < 0.6 else -1)  # specular bright or dark
    return mask, np.full(3, level, np.float32)


def _spot(rng, shape, cx, cy, a: _Assets, s):
    r0 = rng.uniform(a.r_in + 0.35 * (a.r_out - a.r_in), a.r_out - 0.35 * (a.r_out - a.r_in))
    x0, y0 = _polar(cx, cy, r0, rng.uniform(0, 2 * math.pi))
    m = np.zeros(shape, np.uint8)
    for _ in range(3):  # overlapping ellipses make an irregular blob
        ax = (rng.uniform(6, 11) * s, rng.uniform(4, 9) * s)
        ox, oy = rng.normal(0, 2.5 * s, 2)
        centre = (int(round((x0 + ox) * 16)), int(round((y0 + oy) * 16)))
        axes = (int(round(ax[0] * 16)), int(round(ax[1] * 16)))
        cv2.ellipse(m, centre, axes, rng.uniform(0, 180), 0, 360, 255, -1, cv2.LINE_AA, shift=4)
    mask = cv2.GaussianBlur(m.astype(np.float32) / 255.0, (0, 0), 1.0)
    level = -rng.uniform(85, 115)
    return mask, np.array([level, level * 0.95, level * 0.9], np.float32)  # dark, slightly warm


def _stain(rng, shape, cx, cy, a: _Assets, s):
    r0 = rng.uniform(a.r_in + 0.4 * (a.r_out - a.r_in), a.r_out - 0.4 * (a.r_out - a.r_in))
    x0, y0 = _polar(cx, cy, r0, rng.uniform(0, 2 * math.pi))
    m = np.zeros(shape, np.float32)
    for _ in range(4):
        ox, oy = rng.normal(0, 6 * s, 2)
        rad = rng.uniform(8, 14) * s
        centre = (int(round((x0 + ox) * 16)), int(round((y0 + oy) * 16)))
        cv2.circle(m, centre, int(round(rad * 16)), 1.0, -1, cv2.LINE_AA, shift=4)
    mask = cv2.GaussianBlur(m, (0, 0), 5.0 * s + 0.5)
    mask /= max(float(mask.max()), 1e-6)
    level = -rng.uniform(38, 52)
    # rust / oil: blue drops most, red least -> a brownish blotch of low contrast
    return mask, np.array([level * 0.45, level * 0.75, level * 1.0], np.float32)


def _crack(rng, shape, cx, cy, a: _Assets, s):
    from_outer = rng.random() < 0.6
    phi = rng.uniform(0, 2 * math.pi)
    r = a.r_out - 1 if from_outer else a.r_in + 1
    inward = -1.0 if from_outer else 1.0
    length = rng.uniform(45, 65) * s
    step = 4.0 * s + 0.5
    x, y = _polar(cx, cy, r, phi)
    heading = math.atan2(y - cy, x - cx) + (math.pi if from_outer else 0.0)
    pts = [(x, y)]
    branch_at = int(rng.integers(3, 6))
    branches = []
    travelled = 0.0
    while travelled < length:
        heading += rng.normal(0, 0.35)
        # keep the walk heading across the ring, not along it
        radial = math.atan2(y - cy, x - cx) + (0.0 if inward > 0 else math.pi)
        heading = radial + max(-0.7, min(0.7, (heading - radial + math.pi) % (2 * math.pi) - math.pi))
        x, y = x + step * math.cos(heading), y + step * math.sin(heading)
        pts.append((x, y))
        travelled += step
        if len(pts) == branch_at:
            branches.append((x, y, heading + rng.choice([-1, 1]) * rng.uniform(0.5, 0.9)))
    mask = _draw_polyline(shape, pts, max(2, round(2 * s)))
    for bx, by, bh in branches:
        bpts = [(bx, by)]
        for _ in range(int(rng.integers(3, 6))):
            bh += rng.normal(0, 0.3)
            bx, by = bx + step * math.cos(bh), by + step * math.sin(bh)
            bpts.append((bx, by))
        mask = np.maximum(mask, _draw_polyline(shape, bpts, max(1, round(1.5 * s))))
    # a dark core with a faint shadowed halo
    mask = np.maximum(mask, 0.35 * cv2.GaussianBlur(mask, (0, 0), 1.5 * s + 0.3))
    level = -rng.uniform(110, 130)
    return mask, np.full(3, level, np.float32)


def _chip(rng, shape, cx, cy, a: _Assets, s):
    outer = rng.random() < 0.75
    phi = rng.uniform(0, 2 * math.pi)
    rad = rng.uniform(12, 18) * s if outer else rng.uniform(10, 14) * s
    edge = a.r_out if outer else a.r_in
    m = np.zeros(shape, np.uint8)
    for k in range(2):  # two overlapping bites: a less regular fracture outline
        dphi = rng.normal(0, 0.06) if k else 0.0
        rr = rad * (rng.uniform(0.6, 0.85) if k else 1.0)
        x0, y0 = _polar(cx, cy, edge + (rng.uniform(-0.15, 0.25) * rad) * (1 if outer else -1), phi + dphi)
        cv2.circle(m, (int(round(x0 * 16)), int(round(y0 * 16))), int(round(rr * 16)), 255, -1, cv2.LINE_AA, shift=4)
    return m.astype(np.float32) / 255.0, None


_DRAWERS = {"scratch": _scratch, "spot": _spot, "chip": _chip, "stain": _stain, "crack": _crack}


def _bbox(mask: np.ndarray) -> list[int]:
    x, y, w, h = cv2.boundingRect(mask.astype(np.uint8))
    return [int(x), int(y), int(w), int(h)]


# --- rendering -------------------------------------------------------------------------


def render_part(
    rng: np.random.Generator, width: int, height: int, defect: str | None
) -> tuple[np.ndarray, list[dict]]:
    """Render one part: ``(RGB uint8 (H, W, 3), [{"kind", "bbox": [x, y, w, h]}])``.

    The part's pose, brightness, texture and noise are drawn from ``rng`` before
    anything about the defect, so the same generator state with ``defect=None``
    renders the identical part without it.
    """
    if defect is not None and defect not in _DRAWERS:
        raise ValueError(f"unknown defect kind {defect!r}: use one of {', '.join(DEFECT_KINDS)}")
    if width < _MIN_SIDE or height < _MIN_SIDE:
        raise ValueError(f"synthetic parts need at least {_MIN_SIDE}x{_MIN_SIDE} pixels")
    a = _assets(int(width), int(height))
    j = a.jitter
    # --- the part (fixed number of draws) ---
    ox, oy = (int(v) for v in rng.integers(-j, j + 1, size=2))
    gain = float(np.clip(rng.normal(1.0, 0.03), 0.92, 1.08))
    tex_i = int(rng.integers(_N_TEXTURES))
    nx, ny = int(rng.integers(0, width)), int(rng.integers(0, height))
    # cropping the padded, centred assets at (j - o) moves the part by +o
    ys, xs = slice(j - oy, j - oy + height), slice(j - ox, j - ox + width)
    part = a.textures[tex_i][ys, xs] * gain
    alpha = a.alpha[ys, xs]
    cx, cy = (width - 1) / 2.0 + ox, (height - 1) / 2.0 + oy

    defects: list[dict] = []
    if defect is not None:
        s = min(width, height) / 320.0
        min_area = _MIN_AREA_FRACTION * width * height
        # A placement that ends up too small (e.g. mostly over the hole) is redrawn.
        for _ in range(8):
            mask, delta = _DRAWERS[defect](rng, (height, width), cx, cy, a, s)
            if delta is None:  # chip: material removed where the part was
                removed = mask * alpha
                visible = removed > 0.5
            else:
                mask = mask * alpha
                visible = mask * float(np.abs(delta).max()) >= _BBOX_LEVEL
            if int(visible.sum()) >= min_area:
                break
        if delta is None:
            part_alpha = alpha
            alpha = alpha * (1.0 - mask)
            # chip: the fracture edge left on the part is darkened
            rim = np.clip(cv2.GaussianBlur(mask, (0, 0), 1.2) - mask, 0, 1) * alpha
            part = part - 60.0 * rim[:, :, None]
            effect = np.maximum(mask * part_alpha * 255.0, 60.0 * rim)
            visible = effect >= _BBOX_LEVEL
        else:
            part = part + mask[:, :, None] * delta
        defects.append({"kind": defect, "bbox": _bbox(visible)})

    bg = a.background * (1.0 - a.shadow[ys, xs])[:, :, None]
    out = bg + alpha[:, :, None] * (part - bg)
    out += a.noise[ny : ny + height, nx : nx + width]
    np.clip(out, 0, 255, out=out)
    return out.astype(np.uint8), defects


def _frame_rng(seed: int, index: int, stream: int = 0) -> np.random.Generator:
    # One generator per frame: frame i is the same whatever was read before it.
    return np.random.default_rng([stream, int(seed), int(index)])


def write_good_images(out_dir: str | Path, n: int, width: int = 320, height: int = 320, seed: int = 0) -> list[Path]:
    """Write ``n`` defect-free parts as PNG files (for fitting the demo's region expert).

    They use a different random stream from :class:`SyntheticLineSource` with the
    same seed, so training images never reappear as test frames.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img, _ = render_part(_frame_rng(seed, i, stream=1), width, height, None)
        p = out / f"good_{i:05d}.png"
        if not cv2.imwrite(str(p), cv2.cvtColor(img, cv2.COLOR_RGB2BGR)):
            raise CameraError(f"cannot write {p}: check that the folder is writable")
        paths.append(p)
    return paths


class SyntheticLineSource(FrameSource):
    """Frames of a simulated inspection line (see the module docstring).

    ``fps`` paces frames like a camera (``None``: as fast as they are read);
    ``frames`` ends the line after that many parts (:class:`SourceExhausted`);
    ``mono`` gives ``(H, W, 1)`` grey frames. Same ``seed`` -> identical frames.
    """

    def __init__(
        self,
        width: int = 320,
        height: int = 320,
        fps: float | None = 20.0,
        defect_rate: float = 0.2,
        seed: int = 0,
        frames: int | None = None,
        mono: bool = False,
    ) -> None:
        if width < _MIN_SIDE or height < _MIN_SIDE:
            raise CameraError(
                f"synthetic line size {width}x{height} is too small: use at least {_MIN_SIDE}x{_MIN_SIDE}"
            )
        if not 0.0 <= defect_rate <= 1.0:
            raise CameraError(f"defect_rate {defect_rate} is out of range: use a fraction between 0 and 1")
        if frames is not None and frames < 0:
            raise CameraError(f"frames {frames} is negative: use a count, or leave it out for an endless line")
        self.width, self.height = int(width), int(height)
        self.fps = fps
        self.defect_rate = float(defect_rate)
        self.seed = int(seed)
        self.frames = frames
        self.mono = mono
        self.name = f"synthetic:{self.seed}"
        self._pacer = Pacer(fps)
        self._next = 0
        self._opened = False

    def open(self) -> None:
        _assets(self.width, self.height)  # pay for the textures now, not on the first frame
        self._next = 0
        self._pacer.reset()
        self._opened = True

    def close(self) -> None:
        self._opened = False

    def read(self, timeout: float) -> Frame | None:
        if not self._opened:
            raise CameraError(f"{self.name} is not open: call open() first")
        if self.frames is not None and self._next >= self.frames:
            raise SourceExhausted(f"synthetic line ended after {self.frames} parts")
        if not self._pacer.wait(timeout):
            return None
        i = self._next
        rng = _frame_rng(self.seed, i)
        kind = None
        if rng.random() < self.defect_rate:
            kind = DEFECT_KINDS[int(rng.integers(len(DEFECT_KINDS)))]
        img, defects = render_part(rng, self.width, self.height, kind)
        if self.mono:
            img = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)[:, :, None]
        host_ns = time.monotonic_ns()
        self._next += 1
        return Frame(
            frame_id=i,
            image=img,
            timestamp_ns=host_ns,
            clock="host_monotonic",
            host_ns=host_ns,
            bit_depth=8,
            truth=kind is not None,
            meta={"defects": defects},
        )
