"""Cut a real photograph into an MVTec-AD-layout category with painted defects.

The photographs are scikit-image's bundled data (inside the wheel: nothing is downloaded):
``brick``, ``grass`` and ``gravel`` are 512x512 photographs of real surfaces. The training
crops come from the left part of the photograph and the test crops from the right part,
with a gap between them, so no test pixel was ever seen in training::

    <out>/<category>/train/good/NNN.png
    <out>/<category>/test/good/NNN.png
    <out>/<category>/test/<kind>/NNN.png            one folder per defect kind
    <out>/<category>/ground_truth/<kind>/NNN_mask.png
    <out>/<category>/defects.json                   kind, soft/strong, mask pixels per image

Deterministic in ``seed``; a category already built with the same parameters is reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from linecam.realdata.defects import PAINTERS, paint

logger = logging.getLogger(__name__)

#: Category -> scikit-image data file (all real photographs of surfaces).
CATEGORIES = {"brick": "brick.png", "grass": "grass.png", "gravel": "gravel.png"}
CROP = 128
N_TRAIN = 60
N_TEST_GOOD = 24
PER_KIND = 8
#: Training crops come from x < TRAIN_FRACTION * width, test crops from beyond a gap of GAP px.
TRAIN_FRACTION = 0.625
GAP = 16
#: Bumped whenever the painted test images change (2: contrast scaled to the surface's texture).
DATA_VERSION = 2


@dataclass
class BuildResult:
    category: str
    root: Path
    n_train: int
    n_test_good: int
    n_test_bad: int
    kinds: list[str]


def photograph(name: str) -> np.ndarray:
    """The named scikit-image photograph as RGB uint8 (greyscale ones replicated)."""
    try:
        import skimage
    except ImportError:
        raise RuntimeError("the real-photo data needs scikit-image: pip install 'linecam[test]'") from None
    path = Path(skimage.__file__).parent / "data" / CATEGORIES[name]
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise RuntimeError(f"{path} is missing from the scikit-image wheel: reinstall scikit-image")
    if img.ndim == 2:
        return np.repeat(img[..., None], 3, axis=2)
    return cv2.cvtColor(img[..., :3], cv2.COLOR_BGR2RGB)


def _crops(img: np.ndarray, x0: int, x1: int, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``n`` random CROPxCROP crops with left edge in [x0, x1 - CROP], randomly flipped."""
    h = img.shape[0]
    out = []
    for _ in range(n):
        x = int(rng.integers(x0, x1 - CROP + 1))
        y = int(rng.integers(0, h - CROP + 1))
        c = img[y:y + CROP, x:x + CROP]
        if rng.random() < 0.5:
            c = c[:, ::-1]
        if rng.random() < 0.5:
            c = c[::-1]
        out.append(np.ascontiguousarray(c))
    return out


def _write(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def build_category(name: str, out: str | Path, *, seed: int = 0, per_kind: int = PER_KIND,
                   n_train: int = N_TRAIN, n_test_good: int = N_TEST_GOOD) -> BuildResult:
    """Write category ``name`` under ``out/<name>`` (see the module docstring)."""
    params = {"name": name, "seed": seed, "per_kind": per_kind, "n_train": n_train, "n_test_good": n_test_good,
              "crop": CROP, "kinds": sorted(PAINTERS), "version": DATA_VERSION}
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(out) / name
    meta_path = root / "defects.json"
    result = BuildResult(name, root, n_train, n_test_good, per_kind * len(PAINTERS), list(PAINTERS))
    if meta_path.is_file() and json.loads(meta_path.read_text()).get("key") == key:
        return result
    img = photograph(name)
    w = img.shape[1]
    split = int(w * TRAIN_FRACTION)
    rng = np.random.default_rng([seed, sum(map(ord, name))])
    for i, c in enumerate(_crops(img, 0, split, n_train, rng)):
        _write(root / "train" / "good" / f"{i:03d}.png", c)
    for i, c in enumerate(_crops(img, split + GAP, w, n_test_good, rng)):
        _write(root / "test" / "good" / f"{i:03d}.png", c)
    records: list[dict[str, Any]] = []
    for kind in PAINTERS:
        bases = _crops(img, split + GAP, w, per_kind, rng)
        for i, base in enumerate(bases):
            soft = i % 2 == 0  # half soft, half strong
            d = paint(kind, base.astype(np.float32) / 255.0, rng, soft)
            _write(root / "test" / kind / f"{i:03d}.png", np.round(d.image * 255).astype(np.uint8))
            mask = (d.mask * 255).astype(np.uint8)
            (root / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / "ground_truth" / kind / f"{i:03d}_mask.png"), mask)
            records.append({"file": f"test/{kind}/{i:03d}.png", "kind": kind, "soft": soft,
                            "mask_px": int(d.mask.sum())})
    meta_path.write_text(json.dumps({"key": key, "params": params, "source": f"scikit-image data/{CATEGORIES[name]}",
                                     "defects": records}, indent=1) + "\n")
    logger.info("built %s: %d train, %d test good, %d defective", root, n_train, n_test_good, len(records))
    return result


def build_all(out: str | Path, *, seed: int = 0, categories: list[str] | None = None) -> list[BuildResult]:
    return [build_category(c, out, seed=seed) for c in (categories or list(CATEGORIES))]


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m linecam.realdata", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--categories", default=",".join(CATEGORIES))
    a = ap.parse_args(argv)
    for r in build_all(a.out, seed=a.seed, categories=[c for c in a.categories.split(",") if c]):
        print(json.dumps({**asdict(r), "root": str(r.root)}))
