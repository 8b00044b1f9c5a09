"""The MVTec-AD-layout test set: samples, frames in the camera layout, masks at the evaluation size."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from linecam.camera.replay import IMAGE_SUFFIXES, to_frame_layout
from linecam.errors import LinecamError
from linecam.preprocess import Preprocessor, read_image

logger = logging.getLogger(__name__)

REPORT_NAME = "report.json"
ROC_NAME = "roc.png"
HIST_NAME = "scores_hist.png"
FPR_LIMIT = 0.3
GOOD = "good"

#: How a ground-truth mask is brought to the evaluation size (also in report.json).
MASK_RESIZE = ("mask pixels > 127 are defect (> 0 for 0/1 masks); the mask is cropped like the image "
               "(preprocess.crop), resized to the evaluation size with OpenCV INTER_AREA as a 0/1 float "
               "image, and a pixel is defect when at least half of it is covered (area >= 0.5). The "
               "evaluation size is the model input size; an anomaly map coarser than that (a distilled "
               "student's is 1/8) is upsampled to it bilinearly first, so thin defects keep their pixels")

_LAYOUT_HINT = ("an MVTec AD category has test/good/*.png, test/<defect>/*.png and "
                "ground_truth/<defect>/<name>_mask.png")


class DatasetError(LinecamError):
    """The evaluation dataset is missing, incomplete or inconsistent."""


# --------------------------------------------------------------------------- dataset


@dataclass(frozen=True)
class Sample:
    """One test image of the dataset."""

    path: Path
    #: Path relative to the dataset folder, with forward slashes (``test/crack/003.png``).
    rel: str
    #: ``"good"`` or the defect type (its folder name under ``test/``).
    defect: str
    #: The ground-truth mask (defect images only).
    mask: Path | None = None

    @property
    def label(self) -> int:
        return 0 if self.defect == GOOD else 1


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


def _find_mask(root: Path, defect: str, image: Path) -> Path | None:
    gt = root / "ground_truth" / defect
    names = [f"{image.stem}_mask{image.suffix}", f"{image.stem}_mask.png",
             *(f"{image.stem}_mask{s}" for s in sorted(IMAGE_SUFFIXES)), image.name]
    for name in names:
        if (gt / name).is_file():
            return gt / name
    return None


def scan_dataset(dataset_dir: str | Path) -> list[Sample]:
    """The test images of an MVTec-AD-layout category folder, good first, then each defect
    type (sorted by folder, then file name); every defect image must have its mask."""
    root = Path(dataset_dir)
    if not root.exists():
        raise DatasetError(f"dataset folder {root} does not exist: point --data at one MVTec AD category "
                           f"folder ({_LAYOUT_HINT})")
    if not root.is_dir():
        raise DatasetError(f"dataset {root} is not a folder: point --data at one MVTec AD category folder "
                           f"({_LAYOUT_HINT})")
    test = root / "test"
    if not test.is_dir():
        categories = sorted(p.name for p in root.iterdir() if (p / "test").is_dir())
        if categories:
            shown = ", ".join(categories[:6]) + (", ..." if len(categories) > 6 else "")
            raise DatasetError(f"dataset folder {root} has no test/ folder but holds categories ({shown}): "
                               f"point --data at one of them, e.g. {root / categories[0]}")
        raise DatasetError(f"dataset folder {root} has no test/ folder: {_LAYOUT_HINT}")
    folders = sorted(p for p in test.iterdir() if p.is_dir() and not p.name.startswith("."))
    folders.sort(key=lambda p: p.name != GOOD)  # good first (stable: the rest stay sorted)
    samples: list[Sample] = []
    for folder in folders:
        for img in _images_in(folder):
            rel = img.relative_to(root).as_posix()
            if folder.name == GOOD:
                samples.append(Sample(img, rel, GOOD))
                continue
            mask = _find_mask(root, folder.name, img)
            if mask is None:
                raise DatasetError(f"defect image {rel} has no mask: expected ground_truth/{folder.name}/"
                                   f"{img.stem}_mask.png (0 background, 255 defect, the image's size); "
                                   f"add it or move the image out of test/")
            samples.append(Sample(img, rel, folder.name, mask))
    if not samples:
        raise DatasetError(f"{test} has no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in test/good/ or "
                           f"test/<defect>/: {_LAYOUT_HINT}")
    return samples


def read_frame(sample: Sample) -> tuple[np.ndarray, int]:
    """The image in the camera frame layout, read exactly as the replay camera reads it."""
    try:
        image, bit_depth = read_image(sample.path)
    except ValueError as e:
        raise DatasetError(f"cannot read {sample.rel} ({e}): replace or remove the file") from None
    return to_frame_layout(image, bit_depth, False)


def read_mask(sample: Sample, root: Path, image_hw: tuple[int, int]) -> np.ndarray:
    """The sample's defect mask as bool at source resolution (all False for a good image)."""
    if sample.mask is None:
        return np.zeros(image_hw, bool)
    rel_mask = sample.mask.relative_to(root).as_posix()
    m = cv2.imread(str(sample.mask), cv2.IMREAD_GRAYSCALE)
    if m is None:
        raise DatasetError(f"cannot read mask {rel_mask}: not an image OpenCV can decode; replace it")
    if m.shape != image_hw:
        raise DatasetError(f"mask {rel_mask} is {m.shape[1]}x{m.shape[0]} but its image {sample.rel} is "
                           f"{image_hw[1]}x{image_hw[0]}: a mask must have its image's size")
    return m > (127 if m.max() > 1 else 0)


def mask_to_map(mask: np.ndarray, pre: Preprocessor, map_hw: tuple[int, int]) -> np.ndarray:
    """A source-resolution bool mask at the evaluation size (:data:`MASK_RESIZE`)."""
    cropped = pre.crop(mask).astype(np.float32)
    h, w = map_hw
    if cropped.shape == (h, w):
        return cropped >= 0.5
    return cv2.resize(cropped, (w, h), interpolation=cv2.INTER_AREA) >= 0.5
