"""Defects painted on real photographs for evaluation, by physics the trainer never uses.

Independent of :mod:`linecam.export.anomalies` on purpose (a test checks this module does not
import it): the trainer's synthetic anomalies are Perlin masks, CutPaste patches and scars;
these are scratches (specular or dark grooves along smooth curves), branching cracks,
dents (a height bump shaded by a light direction, with the texture displaced), translucent
stains (absorption tint with a darker drying ring), contamination (dust specks and a fibre),
missing material (abraded or broken-out areas) and colour shifts (discolouration). Each comes
*soft* (low contrast, what a trained eye barely sees) or *strong*; the thin and shaded kinds
(scratch, crack, dent) scale their contrast with the surface's own fine-texture contrast
(:func:`contrast_gain`), so a soft groove on grass is as visible as one on smooth brick.

Every function takes an RGB float image in [0, 1] ``(H, W, 3)`` and a generator, and returns
the defective image and its mask (bool, the pixels the defect changed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np

Painter = Callable[[np.ndarray, np.random.Generator, bool], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Defect:
    kind: str
    soft: bool
    image: np.ndarray  # float32 RGB in [0, 1]
    mask: np.ndarray  # bool


def _curve(rng: np.random.Generator, h: int, w: int, length: float, n: int = 40) -> np.ndarray:
    """Points of a random quadratic Bézier of about ``length`` px inside the image."""
    c = rng.uniform(0.25, 0.75, 2) * (w, h)
    ang = rng.uniform(0, np.pi)
    d = np.array([np.cos(ang), np.sin(ang)]) * length / 2
    bend = rng.normal(0, length / 4, 2)
    p0, p2 = c - d, c + d
    p1 = c + bend
    t = np.linspace(0, 1, n)[:, None]
    pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2
    return np.clip(pts, 0, (w - 1, h - 1))


def _stroke(h: int, w: int, pts: np.ndarray, width: float) -> np.ndarray:
    """Anti-aliased stroke coverage in [0, 1] (drawn at 4x, area-downsampled)."""
    s = 4
    canvas = np.zeros((h * s, w * s), np.float32)
    cv2.polylines(canvas, [np.round(pts * s).astype(np.int32)], False, 1.0, max(1, int(round(width * s))),
                  cv2.LINE_AA)
    return cv2.resize(canvas, (w, h), interpolation=cv2.INTER_AREA)


def _blob(rng: np.random.Generator, h: int, w: int, radius: float) -> np.ndarray:
    """A smooth irregular blob (random radial harmonics), soft-edged coverage in [0, 1]."""
    cy, cx = rng.uniform(0.3, 0.7, 2) * (h, w)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ang = np.arctan2(yy - cy, xx - cx)
    r = np.full_like(ang, radius)
    for k in range(2, 6):
        r += radius * rng.uniform(0, 0.25 / k * 2) * np.cos(k * ang + rng.uniform(0, 2 * np.pi))
    dist = np.hypot(yy - cy, xx - cx)
    return np.clip((r - dist) / 1.5 + 0.5, 0, 1).astype(np.float32)


def _luma(img: np.ndarray) -> np.ndarray:
    return img @ np.array([0.299, 0.587, 0.114], np.float32)


#: The fine-texture contrast (std of luma minus its 3 px blur) that the grooves' and dents'
#: amplitudes below are written for: a smooth surface such as the brick photograph (0.056).
REFERENCE_CONTRAST = 0.06


def contrast_gain(img: np.ndarray) -> float:
    """How much busier the surface is than :data:`REFERENCE_CONTRAST` (>= 1).

    A 10 % groove is plain on smooth brick and lost among grass blades whose own edges vary by
    13 %: an inspector judges a thin defect against the texture around it. Scratches, cracks
    and dents scale their contrast by this, so a *soft* one stays low-contrast but visible."""
    luma = _luma(img)
    texture = float((luma - cv2.GaussianBlur(luma, (0, 0), 3)).std())
    return max(1.0, texture / REFERENCE_CONTRAST)


def scratch(img: np.ndarray, rng: np.random.Generator, soft: bool) -> tuple[np.ndarray, np.ndarray]:
    """A groove along a smooth curve: specular (brighter) or shadowed (darker), 1-3 px wide."""
    h, w = img.shape[:2]
    pts = _curve(rng, h, w, rng.uniform(0.3, 0.7) * min(h, w))
    cov = _stroke(h, w, pts, rng.uniform(1.0, 2.5))
    along = 0.6 + 0.4 * cv2.GaussianBlur(rng.random((h, w)).astype(np.float32), (0, 0), 6) * 2  # uneven depth
    amp = (rng.uniform(0.08, 0.14) if soft else rng.uniform(0.25, 0.45)) * contrast_gain(img)
    sign = 1.0 if rng.random() < 0.5 else -1.0
    out = img + (sign * amp * cov * np.clip(along, 0, 1.2))[..., None]
    return np.clip(out, 0, 1), cov > 0.25


def crack(img: np.ndarray, rng: np.random.Generator, soft: bool) -> tuple[np.ndarray, np.ndarray]:
    """A jagged branching fracture: a random walk with persistent heading, darkened by its shadow."""
    h, w = img.shape[:2]
    cov = np.zeros((h, w), np.float32)
    starts = [(rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h, rng.uniform(0, 2 * np.pi), 1.0)]
    segs = 0
    while starts and segs < 5:
        x, y, heading, width = starts.pop()
        pts = [(x, y)]
        for _ in range(int(rng.integers(12, 30))):
            heading += rng.normal(0, 0.45)
            step = rng.uniform(1.5, 3.5)
            x, y = x + step * np.cos(heading), y + step * np.sin(heading)
            pts.append((x, y))
            if rng.random() < 0.06:
                starts.append((x, y, heading + rng.choice([-1, 1]) * rng.uniform(0.5, 1.2), width * 0.6))
        cov = np.maximum(cov, _stroke(h, w, np.clip(np.array(pts), 0, (w - 1, h - 1)), max(0.8, 1.6 * width)))
        segs += 1
    dark = min(0.85, (rng.uniform(0.16, 0.26) if soft else rng.uniform(0.45, 0.7)) * contrast_gain(img))
    out = img * (1 - dark * cov)[..., None]
    return np.clip(out, 0, 1), cov > 0.25


def dent(img: np.ndarray, rng: np.random.Generator, soft: bool) -> tuple[np.ndarray, np.ndarray]:
    """A pressed-in bump: a Gaussian height field shades the surface (lit from one side) and
    displaces the texture toward its centre."""
    h, w = img.shape[:2]
    cy, cx = rng.uniform(0.3, 0.7, 2) * (h, w)
    sy, sx = rng.uniform(0.05, 0.12, 2) * min(h, w)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    height = np.exp(-0.5 * (((yy - cy) / sy) ** 2 + ((xx - cx) / sx) ** 2)).astype(np.float32)
    gy, gx = np.gradient(height)
    light = rng.uniform(0, 2 * np.pi)
    shade = (gx * np.cos(light) + gy * np.sin(light)) * min(sy, sx)
    amp = (rng.uniform(0.18, 0.28) if soft else rng.uniform(0.4, 0.6)) * contrast_gain(img)
    pull = (1.5 if soft else 4.0) * height
    mapx = (xx + pull * (xx - cx) / sx).astype(np.float32)
    mapy = (yy + pull * (yy - cy) / sy).astype(np.float32)
    warped = cv2.remap(img, mapx, mapy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    out = warped * (1 + amp * shade)[..., None]
    return np.clip(out, 0, 1), height > 0.3


def stain(img: np.ndarray, rng: np.random.Generator, soft: bool) -> tuple[np.ndarray, np.ndarray]:
    """A translucent liquid stain: Beer-Lambert tint inside, a darker ring where it dried."""
    h, w = img.shape[:2]
    cov = _blob(rng, h, w, rng.uniform(0.08, 0.2) * min(h, w))
    cov = cv2.GaussianBlur(cov, (0, 0), 1.5)
    ring = np.clip(cov * (1 - cov) * 4, 0, 1) ** 2
    tint = np.array([rng.uniform(0.55, 0.8), rng.uniform(0.4, 0.7), rng.uniform(0.2, 0.5)], np.float32)  # brownish
    density = rng.uniform(0.12, 0.22) if soft else rng.uniform(0.4, 0.7)
    absorb = tint[None, None, :] ** (density * (cov + 1.5 * ring))[..., None]
    return np.clip(img * absorb, 0, 1), cov > 0.5


def contamination(img: np.ndarray, rng: np.random.Generator, soft: bool) -> tuple[np.ndarray, np.ndarray]:
    """Foreign matter: a cluster of dust specks and, sometimes, a fibre; opaque, own colour."""
    h, w = img.shape[:2]
    cov = np.zeros((h, w), np.float32)
    cy, cx = rng.uniform(0.25, 0.75, 2) * (h, w)
    spread = rng.uniform(4, 12)
    for _ in range(int(rng.integers(3, 12))):
        y, x = rng.normal((cy, cx), spread)
        cv2.circle(cov, (int(x * 4), int(y * 4)), int(rng.uniform(1, 3.5) * 4), 1.0, -1, cv2.LINE_AA, shift=2)
    if rng.random() < 0.5:
        cov = np.maximum(cov, _stroke(h, w, _curve(rng, h, w, rng.uniform(15, 40)), 1.2))
    cov = np.clip(cov, 0, 1)
    colour = rng.uniform(0, 1, 3).astype(np.float32)
    opacity = rng.uniform(0.25, 0.4) if soft else rng.uniform(0.8, 1.0)
    out = img * (1 - opacity * cov[..., None]) + colour * (opacity * cov[..., None])
    return np.clip(out, 0, 1), cov > 0.3


def missing(img: np.ndarray, rng: np.random.Generator, soft: bool) -> tuple[np.ndarray, np.ndarray]:
    """Material gone: soft = an abraded patch (texture worn flat toward its mean), strong = a
    broken-out pit (dark floor, a lit and a shadowed edge)."""
    h, w = img.shape[:2]
    cov = _blob(rng, h, w, rng.uniform(0.06, 0.14) * min(h, w))
    if soft:
        worn = cv2.GaussianBlur(img, (0, 0), 4)
        a = rng.uniform(0.5, 0.8) * cov[..., None]
        return np.clip(img * (1 - a) + worn * a, 0, 1), cov > 0.5
    floor = _luma(img).mean() * rng.uniform(0.2, 0.45)
    gy, gx = np.gradient(cv2.GaussianBlur(cov, (0, 0), 1.0))
    light = rng.uniform(0, 2 * np.pi)
    edge = (gx * np.cos(light) + gy * np.sin(light)) * 3
    out = img * (1 - cov[..., None]) + (floor + 0.05 * (img - img.mean())) * cov[..., None]
    out = out + edge[..., None] * 0.5
    return np.clip(out, 0, 1), cov > 0.5


def colour_shift(img: np.ndarray, rng: np.random.Generator, soft: bool) -> tuple[np.ndarray, np.ndarray]:
    """Discolouration (heat tint, oxidation, bleaching): a smooth region whose colour balance
    and brightness drift, fading out at its edge."""
    h, w = img.shape[:2]
    cov = cv2.GaussianBlur(_blob(rng, h, w, rng.uniform(0.12, 0.25) * min(h, w)), (0, 0), 4)
    gain = 1 + rng.normal(0, 1, 3).astype(np.float32) * (0.08 if soft else 0.25)
    bias = rng.uniform(-1, 1) * (0.03 if soft else 0.1)
    shifted = img * gain[None, None, :] + bias
    a = cov[..., None]
    return np.clip(img * (1 - a) + shifted * a, 0, 1), cov > 0.5


PAINTERS: dict[str, Painter] = {
    "scratch": scratch,
    "crack": crack,
    "dent": dent,
    "stain": stain,
    "contamination": contamination,
    "missing": missing,
    "colour": colour_shift,
}


def paint(kind: str, img: np.ndarray, rng: np.random.Generator, soft: bool, *, min_px: int = 12) -> Defect:
    """One defect of ``kind`` on ``img`` (retried until its mask has ``min_px`` pixels)."""
    for _ in range(20):
        out, mask = PAINTERS[kind](img.astype(np.float32), rng, soft)
        if mask.sum() >= min_px:
            return Defect(kind, soft, out.astype(np.float32), mask)
    raise RuntimeError(f"could not paint a visible {kind} on this image")
