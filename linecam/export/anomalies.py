"""Synthetic anomalies for training a region expert from good images only.

Recipes (each ``f(rng, image, ...) -> (image, mask)``; ``mask`` is float32 ``(H, W)`` in
[0, 1], 1 where the image was altered):

* :func:`perlin_blend` — DRAEM: a thresholded, rotated Perlin-noise mask; the texture
  inside comes from another good image, from noise, or is a flat colour, blended as
  ``I(1-M) + b*A*M + (1-b)*I*M`` with ``b ~ U(0.1, 1)``.
* :func:`cutpaste_rect` — CutPaste: a rectangle (2–15 % of the area) of the same image
  pasted elsewhere, optionally colour-jittered.
* :func:`cutpaste_scar` — CutPaste "scar": a thin rotated strip of the same image.
* :func:`nsa_clone` — NSA: a resized patch of another good image Poisson-blended in with
  OpenCV ``seamlessClone``; the label follows the local intensity change.

:func:`synthesize` picks one recipe at random and weights its mask by how visibly
each pixel changed (:func:`visible_label`). Everything is numpy + OpenCV and is
deterministic given the ``numpy.random.Generator``. Images are linecam frames:
``(H, W, C)`` with C in (1, 3), ``uint8`` or ``uint16``; the output has the input's
shape and dtype. Sizes are relative to the image so the recipes behave the same
whatever the camera resolution.
"""

from __future__ import annotations

import math
from typing import Callable

import cv2
import numpy as np

Recipe = Callable[..., tuple[np.ndarray, np.ndarray]]

#: Perlin noise is smooth, so it is generated at most this large and resized: keeps
#: synthesis cheap on multi-megapixel frames without changing the mask's character.
_PERLIN_MAX_SIDE = 160
#: Re-draw an empty or near-empty Perlin mask this many times before falling back.
_PERLIN_TRIES = 8
#: A change of this fraction of full scale (~20 grey levels of 255) counts as fully visible.
VISIBLE_LEVEL = 0.08


# --------------------------------------------------------------------------- helpers


def _maxval(image: np.ndarray) -> float:
    return float(np.iinfo(image.dtype).max) if np.issubdtype(image.dtype, np.integer) else 1.0


def _as_hwc(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"expected an (H, W, 1|3) image, got shape {image.shape}")
    return image


def _to_dtype(f: np.ndarray, like: np.ndarray) -> np.ndarray:
    if np.issubdtype(like.dtype, np.integer):
        return np.clip(np.rint(f), 0, _maxval(like)).astype(like.dtype)
    return np.clip(f, 0.0, 1.0).astype(like.dtype)


def _match_donor(donor: np.ndarray | None, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The donor resized and converted to ``image``'s layout (or the image itself flipped)."""
    if donor is None:
        donor = image[::-1, ::-1] if rng.random() < 0.5 else image[::-1]
    donor = _as_hwc(donor)
    h, w, c = image.shape
    if donor.shape[:2] != (h, w):
        donor = cv2.resize(donor, (w, h), interpolation=cv2.INTER_LINEAR)
        donor = _as_hwc(donor)
    if donor.shape[2] != c:
        donor = donor.mean(axis=2, keepdims=True) if c == 1 else np.repeat(donor, 3, axis=2)
    f = donor.astype(np.float32) * (_maxval(image) / _maxval(donor))
    return f


def _rotate(a: np.ndarray, angle_deg: float, interp: int = cv2.INTER_LINEAR) -> np.ndarray:
    h, w = a.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), angle_deg, 1.0)
    return cv2.warpAffine(a, m, (w, h), flags=interp, borderMode=cv2.BORDER_REFLECT)


# --------------------------------------------------------------------------- Perlin


def perlin_noise(rng: np.random.Generator, shape: tuple[int, int], res: tuple[int, int]) -> np.ndarray:
    """2-D gradient (Perlin) noise in roughly [-1, 1] with ``res`` lattice cells per axis.

    Works for any ``shape`` (the lattice need not divide it), unlike the usual
    ``rand_perlin_2d`` which requires ``shape % res == 0``.
    """
    h, w = shape
    ry, rx = max(1, int(res[0])), max(1, int(res[1]))
    angles = rng.uniform(0.0, 2.0 * math.pi, size=(ry + 1, rx + 1))
    gy, gx = np.sin(angles).astype(np.float32), np.cos(angles).astype(np.float32)
    y = (np.arange(h, dtype=np.float32) + 0.5) * (ry / h)
    x = (np.arange(w, dtype=np.float32) + 0.5) * (rx / w)
    y0 = np.minimum(y.astype(np.int32), ry - 1)
    x0 = np.minimum(x.astype(np.int32), rx - 1)
    fy = (y - y0)[:, None]
    fx = (x - x0)[None, :]
    Y0, X0 = y0[:, None], x0[None, :]

    def dot(dy: int, dx: int) -> np.ndarray:
        return gy[Y0 + dy, X0 + dx] * (fy - dy) + gx[Y0 + dy, X0 + dx] * (fx - dx)

    def fade(t: np.ndarray) -> np.ndarray:
        return t * t * t * (t * (t * 6 - 15) + 10)

    n00, n01, n10, n11 = dot(0, 0), dot(0, 1), dot(1, 0), dot(1, 1)
    ux, uy = fade(fx), fade(fy)
    top = n00 + ux * (n01 - n00)
    bottom = n10 + ux * (n11 - n10)
    return (math.sqrt(2.0) * (top + uy * (bottom - top))).astype(np.float32)


def perlin_mask(
    rng: np.random.Generator,
    shape: tuple[int, int],
    *,
    min_scale: int = 0,
    max_scale: int = 6,
    threshold: float = 0.5,
    min_area: float = 0.002,
    max_area: float = 0.35,
) -> np.ndarray:
    """DRAEM's mask: Perlin noise at scale ``2**k`` (k in [min_scale, max_scale)), rotated
    by U(-90, 90) degrees and thresholded. Re-drawn until its area fraction lies in
    ``[min_area, max_area]`` (an empty mask would teach "anomalous" on a good image)."""
    h, w = shape
    f = min(1.0, _PERLIN_MAX_SIDE / max(h, w))
    gh, gw = max(8, round(h * f)), max(8, round(w * f))
    mask = np.zeros((gh, gw), np.float32)
    for _ in range(_PERLIN_TRIES):
        ky, kx = rng.integers(min_scale, max_scale, size=2)
        noise = perlin_noise(rng, (gh, gw), (2**ky, 2**kx))
        noise = _rotate(noise, float(rng.uniform(-90.0, 90.0)))
        mask = (noise > threshold).astype(np.float32)
        if min_area <= mask.mean() <= max_area:
            break
    else:
        # Rare: fall back to an ellipse so every "anomalous" sample really is one.
        mask = np.zeros((gh, gw), np.float32)
        cy, cx = int(rng.integers(0, gh)), int(rng.integers(0, gw))
        ay, ax = max(2, int(gh * rng.uniform(0.04, 0.15))), max(2, int(gw * rng.uniform(0.04, 0.15)))
        cv2.ellipse(mask, (cx, cy), (ax, ay), float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
    if (gh, gw) != (h, w):
        mask = (cv2.resize(mask, (w, h), interpolation=cv2.INTER_LINEAR) > 0.5).astype(np.float32)
    return mask


# --------------------------------------------------------------------------- textures


def _noise_texture(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    h, w, c = image.shape
    mv = _maxval(image)
    if rng.random() < 0.5:  # smooth coloured Perlin texture (made small, it is smooth)
        k = int(rng.integers(1, 6))
        f = min(1.0, _PERLIN_MAX_SIDE / max(h, w))
        gh, gw = max(8, round(h * f)), max(8, round(w * f))
        t = np.stack([perlin_noise(rng, (gh, gw), (2**k, 2**k)) for _ in range(c)], axis=2)
        if (gh, gw) != (h, w):
            t = cv2.resize(t, (w, h), interpolation=cv2.INTER_LINEAR).reshape(h, w, c)
        return ((t * 0.5 + 0.5) * mv).astype(np.float32)
    # i.i.d. noise around a random level: grainy, unlike most good textures
    level = rng.uniform(0.1, 0.9, size=(1, 1, c)) * mv
    return np.clip(level + rng.normal(0.0, 0.25 * mv, size=(h, w, c)), 0, mv).astype(np.float32)


def _flat_texture(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    h, w, c = image.shape
    mv = _maxval(image)
    # Bias towards dark/bright extremes: stains, holes and glare are the common flat defects.
    level = rng.beta(0.6, 0.6, size=(1, 1, c)) * mv
    if c == 3 and rng.random() < 0.5:
        level[:] = level[..., :1]  # grey
    return np.broadcast_to(level, (h, w, c)).astype(np.float32)


def _jitter(rng: np.random.Generator, f: np.ndarray, mv: float) -> np.ndarray:
    """Brightness/contrast/colour jitter of a float image (donor textures, pasted patches)."""
    gain = rng.uniform(0.6, 1.4)
    bias = rng.uniform(-0.2, 0.2) * mv
    out = f * gain + bias
    if f.shape[2] == 3:
        out = out * rng.uniform(0.8, 1.2, size=(1, 1, 3))
    if rng.random() < 0.2:
        out = mv - out  # invert
    return np.clip(out, 0, mv)


# --------------------------------------------------------------------------- recipes


def perlin_blend(
    rng: np.random.Generator,
    image: np.ndarray,
    donor: np.ndarray | None = None,
    *,
    source: str | None = None,
    beta: tuple[float, float] = (0.1, 1.0),
) -> tuple[np.ndarray, np.ndarray]:
    """DRAEM anomaly. ``source`` is ``"donor"``, ``"noise"`` or ``"flat"`` (random if None)."""
    image = _as_hwc(image)
    h, w, _ = image.shape
    mv = _maxval(image)
    if source is None:
        source = str(rng.choice(["donor", "noise", "flat"], p=[0.4, 0.3, 0.3]))
    if source == "donor":
        tex = _match_donor(donor, image, rng)
        # Good images of one product are aligned: misplace the donor so its structure does
        # not line up with the image's (an aligned copy would be an invisible "anomaly").
        dy, dx = (rng.uniform(0.15, 0.85, 2) * (h, w)).astype(int)
        tex = np.roll(tex, (int(dy), int(dx)), axis=(0, 1))[:: rng.choice([-1, 1]), :: rng.choice([-1, 1])]
        tex = _jitter(rng, np.ascontiguousarray(tex), mv)
        if rng.random() < 0.5:
            tex = _rotate(tex, float(rng.uniform(-90, 90)))
            tex = tex.reshape(h, w, -1)
    elif source == "noise":
        tex = _noise_texture(rng, image)
    elif source == "flat":
        tex = _flat_texture(rng, image)
    else:
        raise ValueError(f"unknown perlin_blend source {source!r}: use donor, noise or flat")
    m = perlin_mask(rng, (h, w))[:, :, None]
    b = float(rng.uniform(*beta))
    f = image.astype(np.float32)
    out = f * (1 - m) + b * tex * m + (1 - b) * f * m
    return _to_dtype(out, image), m[:, :, 0].copy()


def _rect_size(rng: np.random.Generator, h: int, w: int, area: tuple[float, float],
               aspect: tuple[float, float]) -> tuple[int, int]:
    a = rng.uniform(*area) * h * w
    r = math.exp(rng.uniform(math.log(aspect[0]), math.log(aspect[1])))
    ph = int(np.clip(round(math.sqrt(a * r)), 2, h - 1))
    pw = int(np.clip(round(math.sqrt(a / r)), 2, w - 1))
    return ph, pw


def cutpaste_rect(
    rng: np.random.Generator,
    image: np.ndarray,
    donor: np.ndarray | None = None,
    *,
    area: tuple[float, float] = (0.02, 0.15),
    aspect: tuple[float, float] = (0.3, 3.3),
) -> tuple[np.ndarray, np.ndarray]:
    """CutPaste: a rectangle of the same image, colour-jittered, pasted elsewhere."""
    del donor  # CutPaste is self-similar by design
    image = _as_hwc(image)
    h, w, _ = image.shape
    ph, pw = _rect_size(rng, h, w, area, aspect)
    sy, sx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    # Paste somewhere else: a patch pasted onto itself is not an anomaly.
    for _ in range(8):
        dy, dx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
        if abs(dy - sy) > ph // 2 or abs(dx - sx) > pw // 2:
            break
    f = image.astype(np.float32)
    patch = f[sy : sy + ph, sx : sx + pw]
    if rng.random() < 0.8:
        patch = _jitter(rng, patch, _maxval(image))
    out = f.copy()
    out[dy : dy + ph, dx : dx + pw] = patch
    mask = np.zeros((h, w), np.float32)
    mask[dy : dy + ph, dx : dx + pw] = 1.0
    return _to_dtype(out, image), mask


def cutpaste_scar(
    rng: np.random.Generator,
    image: np.ndarray,
    donor: np.ndarray | None = None,
    *,
    width: tuple[float, float] = (0.004, 0.04),
    length: tuple[float, float] = (0.04, 0.3),
    angle: tuple[float, float] = (-90.0, 90.0),
) -> tuple[np.ndarray, np.ndarray]:
    """CutPaste scar: a thin strip (sizes relative to the shorter side) of the same image,
    rotated and pasted elsewhere, usually brightness-shifted so it reads as a mark."""
    del donor
    image = _as_hwc(image)
    h, w, c = image.shape
    side = min(h, w)
    sw = max(1, round(rng.uniform(*width) * side))
    sl = max(3, round(rng.uniform(*length) * side))
    # The strip lives in a square canvas big enough to rotate it in.
    d = int(math.ceil(math.hypot(sw, sl))) + 2
    d = min(d, h, w)
    sl = min(sl, d - 2)
    sw = min(sw, d - 2)
    sy, sx = int(rng.integers(0, h - sw + 1)), int(rng.integers(0, w - sl + 1))
    f = image.astype(np.float32)
    strip = f[sy : sy + sw, sx : sx + sl]
    mv = _maxval(image)
    if rng.random() < 0.8:
        strip = _jitter(rng, strip, mv)
    if rng.random() < 0.7:
        # Scratches and tool marks are mostly a strong specular (bright) or dark line.
        sign = 1.0 if rng.random() < 0.5 else -1.0
        strip = np.clip(strip + sign * rng.uniform(0.15, 0.45) * mv, 0, mv)
    canvas = np.zeros((d, d, c), np.float32)
    cmask = np.zeros((d, d), np.float32)
    oy, ox = (d - sw) // 2, (d - sl) // 2
    canvas[oy : oy + sw, ox : ox + sl] = strip
    cmask[oy : oy + sw, ox : ox + sl] = 1.0
    a = float(rng.uniform(*angle))
    m = cv2.getRotationMatrix2D((d / 2.0, d / 2.0), a, 1.0)
    canvas = cv2.warpAffine(canvas, m, (d, d), flags=cv2.INTER_LINEAR, borderValue=0).reshape(d, d, c)
    cmask = cv2.warpAffine(cmask, m, (d, d), flags=cv2.INTER_LINEAR, borderValue=0)
    dy, dx = int(rng.integers(0, h - d + 1)), int(rng.integers(0, w - d + 1))
    out = f.copy()
    region = out[dy : dy + d, dx : dx + d]
    mm = cmask[:, :, None]
    region[:] = region * (1 - mm) + canvas * mm
    mask = np.zeros((h, w), np.float32)
    mask[dy : dy + d, dx : dx + d] = cmask
    return _to_dtype(out, image), mask


def nsa_clone(
    rng: np.random.Generator,
    image: np.ndarray,
    donor: np.ndarray | None = None,
    *,
    area: tuple[float, float] = (0.01, 0.1),
    aspect: tuple[float, float] = (0.3, 3.3),
    label_scale: float = 0.08,
) -> tuple[np.ndarray, np.ndarray]:
    """NSA: a resized patch of ``donor`` Poisson-blended into ``image`` (``seamlessClone``).

    The label is continuous: the per-pixel absolute change (fraction of full scale)
    divided by ``label_scale`` and clipped to [0, 1], inside the patch only, so a
    clone that happens to blend in invisibly is not labelled anomalous.
    """
    image = _as_hwc(image)
    h, w, c = image.shape
    mv = _maxval(image)
    src = _match_donor(donor, image, rng)
    ph, pw = _rect_size(rng, h, w, area, aspect)
    ph, pw = min(ph, h - 4), min(pw, w - 4)
    if ph < 3 or pw < 3:
        return cutpaste_rect(rng, image)
    sy, sx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    scale = rng.uniform(0.7, 1.4)
    patch = src[sy : sy + ph, sx : sx + pw]
    patch = cv2.resize(patch, (max(3, round(pw * scale)), max(3, round(ph * scale))),
                       interpolation=cv2.INTER_LINEAR).reshape(-1, max(3, round(pw * scale)), c)
    patch = _jitter(rng, patch, mv) if rng.random() < 0.5 else patch
    ph, pw = min(patch.shape[0], h - 4), min(patch.shape[1], w - 4)
    patch = patch[:ph, :pw]
    # seamlessClone wants 8-bit 3-channel images and a centre keeping the patch inside.
    to8 = 255.0 / mv
    dst8 = np.clip(image.astype(np.float32) * to8, 0, 255).astype(np.uint8)
    src8 = np.clip(patch * to8, 0, 255).astype(np.uint8)
    if c == 1:
        dst8, src8 = np.repeat(dst8, 3, axis=2), np.repeat(src8, 3, axis=2)
    pmask = np.full((ph, pw), 255, np.uint8)
    cy = int(rng.integers(ph // 2 + 1, h - (ph - ph // 2) - 1 + 1))
    cx = int(rng.integers(pw // 2 + 1, w - (pw - pw // 2) - 1 + 1))
    try:
        out8 = cv2.seamlessClone(src8, dst8, pmask, (cx, cy), cv2.NORMAL_CLONE)
    except cv2.error:
        # OpenCV rejects some patches that nearly fill a small image (its Poisson solver
        # needs a border around the patch); a plain CutPaste keeps the sample usable.
        return cutpaste_rect(rng, image)
    if c == 1:
        out8 = out8[:, :, :1]
    out = out8.astype(np.float32) / to8
    diff = np.abs(out8.astype(np.float32) - dst8[:, :, :c].astype(np.float32)).max(axis=2) / 255.0
    region = np.zeros((h, w), np.float32)
    y0, x0 = cy - ph // 2, cx - pw // 2
    region[max(0, y0) : y0 + ph, max(0, x0) : x0 + pw] = 1.0
    mask = np.clip(cv2.GaussianBlur(diff, (0, 0), 1.0) / label_scale, 0.0, 1.0) * region
    if np.count_nonzero(mask >= 0.5) < 0.25 * ph * pw:
        # The clone blends in (nearly) invisibly: not an anomaly, use a plain CutPaste instead.
        return cutpaste_rect(rng, image)
    # Outside the label the image stays exactly the original (no out-of-patch drift).
    keep = (region == 0)[:, :, None]
    out = np.where(keep, image.astype(np.float32), out)
    return _to_dtype(out, image), mask.astype(np.float32)


#: Recipe name -> (function, default weight used by :func:`synthesize`).
RECIPES: dict[str, tuple[Recipe, float]] = {
    "perlin": (perlin_blend, 0.35),
    "cutpaste": (cutpaste_rect, 0.15),
    "scar": (cutpaste_scar, 0.35),
    "nsa": (nsa_clone, 0.15),
}


def visible_label(image: np.ndarray, out: np.ndarray, mask: np.ndarray, *, level: float = VISIBLE_LEVEL,
                  sigma: float | None = None) -> np.ndarray:
    """``mask`` weighted by how visibly each pixel changed: the locally smoothed absolute
    change (fraction of full scale, max over channels) divided by ``level``, clipped to 1.

    A recipe can alter a region in a way that happens to be invisible (a donor texture
    that matches, a patch pasted onto a look-alike spot); labelling that "anomalous"
    teaches the net to fire on normal structure. This keeps labels honest.
    """
    image, out = _as_hwc(image), _as_hwc(out)
    d = cv2.absdiff(out, image).reshape(image.shape)  # exact for unsigned ints, no float copies
    if d.shape[2] == 3:
        d = np.maximum(np.maximum(d[:, :, 0], d[:, :, 1]), d[:, :, 2])
    else:
        d = d[:, :, 0]
    diff = d.astype(np.float32) * (1.0 / _maxval(image))
    if sigma is None:
        sigma = max(1.0, 0.004 * min(diff.shape))
    diff = cv2.GaussianBlur(diff, (0, 0), sigma)
    return (mask * np.clip(diff / level, 0.0, 1.0)).astype(np.float32)


def synthesize(
    rng: np.random.Generator,
    image: np.ndarray,
    donor: np.ndarray | None = None,
    *,
    weights: dict[str, float] | None = None,
    tries: int = 4,
) -> tuple[np.ndarray, np.ndarray]:
    """Apply one randomly chosen recipe: ``(anomalous image, label float32 (H, W) in [0, 1])``.

    The label is the recipe's mask weighted by :func:`visible_label`; a draw whose label
    never reaches 0.5 (an invisible anomaly) is redrawn, up to ``tries`` times.
    ``donor`` is another good image (any size; resized) used as anomaly texture;
    without one the image's own flipped copy is used. ``weights`` overrides the
    recipe mix, e.g. ``{"perlin": 1, "scar": 1}``.
    """
    w = {k: v for k, (_, v) in RECIPES.items()} if weights is None else dict(weights)
    unknown = set(w) - set(RECIPES)
    if unknown:
        raise ValueError(f"unknown anomaly recipe(s) {sorted(unknown)}: choose from {sorted(RECIPES)}")
    names = [k for k in RECIPES if w.get(k, 0.0) > 0]
    if not names:
        raise ValueError("all anomaly recipe weights are zero: give at least one a positive weight")
    p = np.asarray([w[k] for k in names], dtype=np.float64)
    shape = np.shape(image)
    image = _as_hwc(image)
    for _ in range(max(1, tries)):
        name = names[int(rng.choice(len(names), p=p / p.sum()))]
        out, mask = RECIPES[name][0](rng, image, donor)
        label = visible_label(image, out, mask)
        if label.max() >= 0.5:
            break
    return out.reshape(shape), label
