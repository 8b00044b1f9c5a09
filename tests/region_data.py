"""Generated defect images for the region-token tests: a bright plate with one dark defect
(scratch, stain or crack; small or large) whose centre lies well inside one cell of a 3x3
grid, so its location word (top left ... center ... bottom right) is never ambiguous. The
ground truth gives each image's description (kind, location word, size class)."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

KINDS = ("scratch", "stain", "crack")  # words the tiny word-level tokenizer knows
SIZES = ("small", "large")
SIDE = 128
#: Distance of a defect's centre from the grid lines (the region expert's boxes are coarse).
MARGIN = 10


def location_word(cx: float, cy: float) -> str:
    v = "top" if cy < SIDE / 3 else "bottom" if cy > 2 * SIDE / 3 else ""
    h = "left" if cx < SIDE / 3 else "right" if cx > 2 * SIDE / 3 else ""
    return " ".join(x for x in (v, h) if x) or "center"


def draw(rng: np.random.Generator, kind: str, size: str, cell: tuple[int, int]) -> tuple[np.ndarray, tuple]:
    img = np.clip(rng.normal(200, 4, (SIDE, SIDE, 3)), 0, 255).astype(np.uint8)
    s = 1.0 if size == "small" else 2.2
    third = SIDE / 3
    cx = rng.uniform(cell[0] * third + MARGIN, (cell[0] + 1) * third - MARGIN)
    cy = rng.uniform(cell[1] * third + MARGIN, (cell[1] + 1) * third - MARGIN)
    m = np.zeros((SIDE, SIDE), np.uint8)
    if kind == "scratch":
        a, half = rng.uniform(0, math.pi), 9 * s
        cv2.line(m, (int(cx - half * math.cos(a)), int(cy - half * math.sin(a))),
                 (int(cx + half * math.cos(a)), int(cy + half * math.sin(a))), 255, 2)
    elif kind == "stain":
        cv2.ellipse(m, (int(cx), int(cy)), (int(5 * s), int(3.5 * s)), rng.uniform(0, 180), 0, 360, 255, -1)
    else:  # crack: a zigzag around the centre
        pts, x, y = [], cx - 8 * s, cy
        for _ in range(6):
            pts.append((int(x), int(y)))
            x, y = x + 3.2 * s, cy + rng.choice([-1, 1]) * 1.5 * s
        cv2.polylines(m, [np.array(pts, np.int32).reshape(-1, 1, 2)], False, 255, 2)
    img[m > 0] = {"scratch": 40, "stain": 70, "crack": 25}[kind]
    return img, (float(cx), float(cy))


def make_dataset(out: Path, n: int, seed: int) -> dict[str, dict]:
    """``n`` PNGs in ``out``; returns name -> truth (kind, size, location)."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    truth = {}
    for i in range(n):
        kind, size = KINDS[i % 3], SIZES[(i // 3) % 2]
        cell = (int(rng.integers(3)), int(rng.integers(3)))
        img, (cx, cy) = draw(rng, kind, size, cell)
        name = f"{i:03d}_{kind}.png"
        cv2.imwrite(str(out / name), img[:, :, ::-1])
        truth[name] = {"kind": kind, "size": size, "location": location_word(cx, cy)}
    return truth


def true_text(t: dict) -> str:
    return f"A {t['size']} {t['kind']} at {t['location']} of the part ."
