"""A generated MVTec-AD-layout category for tests: a woven texture and defect kinds that the
experts never see in training (their synthetic anomalies are Perlin blends, CutPaste and
NSA patches; these are drawn scratches, stains, holes and contamination).

``make_category(root)`` writes::

    <root>/<name>/train/good/000.png ...
    <root>/<name>/test/good/000.png ...
    <root>/<name>/test/<defect>/000.png ...
    <root>/<name>/ground_truth/<defect>/000_mask.png ...

Everything is a function of ``seed``: the same call writes the same bytes.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

DEFECTS = ("scratch", "stain", "hole", "contamination")


def texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A woven fabric-like RGB texture (uint8): two crossed gratings, fibre noise, slow shading.
    Every image has its own phase, small rotation and brightness, as parts on a line do."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    a = np.deg2rad(rng.uniform(-4, 4))
    u = xx * np.cos(a) + yy * np.sin(a)
    v = -xx * np.sin(a) + yy * np.cos(a)
    period = size / 16.0
    p1, p2 = rng.uniform(0, 2 * np.pi, 2)
    weave = 0.5 * np.sin(2 * np.pi * u / period + p1) * np.sin(2 * np.pi * v / period + p2)
    fibre = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), 0.8) * 0.35
    shade = cv2.resize(rng.standard_normal((3, 3)).astype(np.float32), (size, size),
                       interpolation=cv2.INTER_CUBIC) * 0.08
    base = 0.55 + rng.uniform(-0.04, 0.04) + 0.18 * weave + 0.06 * fibre + shade
    tint = np.array([0.92, 0.78, 0.55], np.float32) * rng.uniform(0.97, 1.03, 3)  # beige (RGB)
    img = np.clip(base[..., None] * tint * 1.35, 0, 1)
    return (img * 255 + 0.5).astype(np.uint8)


def _scratch(rng: np.random.Generator, img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    size = img.shape[0]
    mask = np.zeros((size, size), np.uint8)
    n = int(rng.integers(3, 6))
    start = rng.uniform(0.2, 0.8, 2) * size
    ang = rng.uniform(0, np.pi)
    pts = [start]
    for _ in range(n):
        ang += rng.uniform(-0.35, 0.35)
        step = rng.uniform(0.06, 0.12) * size
        pts.append(pts[-1] + step * np.array([np.cos(ang), np.sin(ang)]))
    pts = np.clip(np.array(pts), 2, size - 3).astype(np.int32)
    cv2.polylines(mask, [pts], False, 255, thickness=max(2, size // 48))
    out = img.copy()
    dark = rng.random() < 0.5
    val = np.array([40, 35, 30] if dark else [250, 248, 240], np.uint8)
    out[mask > 0] = val
    return out, mask


def _stain(rng: np.random.Generator, img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    size = img.shape[0]
    c = rng.uniform(0.25, 0.75, 2) * size
    axes = rng.uniform(0.06, 0.14, 2) * size
    blob = np.zeros((size, size), np.float32)
    cv2.ellipse(blob, (int(c[0]), int(c[1])), (int(axes[0]), int(axes[1])), rng.uniform(0, 180), 0, 360, 1.0, -1)
    blob = cv2.GaussianBlur(blob, (0, 0), size / 64)
    colour = np.array(rng.choice([[120, 70, 40], [60, 90, 130], [90, 110, 60]]), np.float32)
    a = (0.75 * blob)[..., None]
    out = (img.astype(np.float32) * (1 - a) + colour * a).astype(np.uint8)
    mask = (blob > 0.35).astype(np.uint8) * 255
    return out, mask


def _hole(rng: np.random.Generator, img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    size = img.shape[0]
    c = (rng.uniform(0.2, 0.8, 2) * size).astype(int)
    r = int(rng.uniform(0.03, 0.07) * size) + 2
    out = img.copy()
    cv2.circle(out, (int(c[0]), int(c[1])), r + 2, (205, 190, 150), -1)  # frayed rim
    cv2.circle(out, (int(c[0]), int(c[1])), r, (15, 12, 10), -1)
    mask = np.zeros((size, size), np.uint8)
    cv2.circle(mask, (int(c[0]), int(c[1])), r + 2, 255, -1)
    return out, mask


def _contamination(rng: np.random.Generator, img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    size = img.shape[0]
    c = rng.uniform(0.2, 0.8, 2) * size
    out = img.copy()
    mask = np.zeros((size, size), np.uint8)
    colour = tuple(int(v) for v in rng.choice([[30, 160, 60], [200, 40, 40], [40, 40, 200]]))
    for _ in range(int(rng.integers(4, 9))):
        p = (c + rng.normal(0, size * 0.035, 2)).astype(int)
        r = int(rng.integers(1, max(2, size // 40) + 1))
        cv2.circle(out, (int(p[0]), int(p[1])), r, colour, -1)
        cv2.circle(mask, (int(p[0]), int(p[1])), r, 255, -1)
    return out, mask


_DRAW = {"scratch": _scratch, "stain": _stain, "hole": _hole, "contamination": _contamination}


def _write(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok = cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR) if img.ndim == 3 else img)
    assert ok, path


def make_category(root: str | Path, name: str = "fabric", *, seed: int = 0, size: int = 128, n_train: int = 60,
                  n_good_test: int = 20, n_per_defect: int = 10,
                  defects: tuple[str, ...] = DEFECTS) -> Path:
    """Write one category (see the module docstring); returns ``<root>/<name>``."""
    base = Path(root) / name
    rng = np.random.default_rng(seed)
    for i in range(n_train):
        _write(base / "train" / "good" / f"{i:03d}.png", texture(rng, size))
    for i in range(n_good_test):
        _write(base / "test" / "good" / f"{i:03d}.png", texture(rng, size))
    for kind in defects:
        for i in range(n_per_defect):
            img, mask = _DRAW[kind](rng, texture(rng, size))
            _write(base / "test" / kind / f"{i:03d}.png", img)
            _write(base / "ground_truth" / kind / f"{i:03d}_mask.png", mask)
    return base
