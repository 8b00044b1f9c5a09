"""Good training images: read from a folder (one camera setting), hashed, split into train and
held out deterministically. Shared by the scratch expert, distillation and calibration.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from linecam.bundle import sha256_file
from linecam.errors import BundleError
from linecam.preprocess import PreprocessSpec, Preprocessor, aspect_size, read_image

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".pgm", ".ppm", ".webp")
MIN_IMAGES = 10



@dataclass(frozen=True)
class SourceImage:
    path: Path
    image: np.ndarray
    bit_depth: int
    sha256: str


def list_images(folder: str | Path) -> list[SourceImage]:
    """Readable images of ``folder`` (sorted by name); raises if fewer than ``MIN_IMAGES``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BundleError(f"image folder {folder} does not exist: point --images at a folder of good images")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    out: list[SourceImage] = []
    shape: tuple[int, ...] | None = None
    for p in paths:
        try:
            img, depth = read_image(p)
        except ValueError as e:
            logger.warning("skipping %s: %s", p, e)
            continue
        if shape is not None and img.shape != shape:
            raise BundleError(f"{p} is {img.shape[1]}x{img.shape[0]}x{img.shape[2]} but earlier images are "
                              f"{shape[1]}x{shape[0]}x{shape[2]}: use images from one camera setting")
        shape = img.shape
        out.append(SourceImage(p, img, depth, sha256_file(p)))
    if len(out) < MIN_IMAGES:
        raise BundleError(f"{folder} has {len(out)} readable image(s); the expert needs at least "
                          f"{MIN_IMAGES} good images (more is better: 100+)")
    return out


def split_holdout(n: int, holdout: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic (train, held-out) index split; both sides non-empty."""
    if not 0 < holdout < 1:
        raise ValueError(f"holdout must be in (0, 1), got {holdout}")
    k = min(n - 1, max(1, round(n * holdout)))
    perm = np.random.default_rng(seed).permutation(n)
    return sorted(perm[k:].tolist()), sorted(perm[:k].tolist())


def aspect_warning(spec: PreprocessSpec, image: np.ndarray) -> str | None:
    """One line when ``image``'s shape (after the spec's crop) is stretched to the model input
    (:func:`~linecam.preprocess.aspect_size`), with a ``--size`` that keeps it. Raises ``ValueError``
    when the crop does not fit the image."""
    ih, iw = Preprocessor(spec).crop(image).shape[:2]
    size = aspect_size(spec, ih, iw)
    if size is None:
        return None
    h, w = spec.input_size
    return (f"the images are {iw}x{ih} (width/height {iw / ih:.2f}) but the model input is {w}x{h} "
            f"({w / h:.2f}): every frame is stretched to it, and thin defects across the squeezed axis "
            f"lose pixels; --size {size[0]}x{size[1]} keeps the images' shape at about the same cost")
