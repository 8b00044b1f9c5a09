"""The distillation data: defect images -> region-grounded prompts -> a reviewable JSONL file.

Each image goes through the region expert exactly as on the line (the bundle's
:class:`~linecam.preprocess.Preprocessor`, the backend runner, the
:class:`~linecam.runtime.postprocess.Postprocessor`, regions only for NG verdicts) and
the regions become the daemon's prompt (:class:`~linecam.runtime.vlm.prompt.RegionPromptBuilder`).

The JSONL file holds one record per image. A person may edit ``text`` (what the
student learns), set ``reviewed``, set ``use`` to false to leave an image out, and add
keys of their own. A record whose ``text`` differs from ``teacher_text``, or that is
``reviewed``, is the person's: it is never overwritten, even when its prompt has to be
rebuilt. ``split`` is recomputed on every run from ``--holdout`` and ``--seed``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from linecam.bundle import load_bundle, sha256_file
from linecam.errors import BundleError, ConfigError
from linecam.preprocess import read_image
from linecam.runtime.vlm.prompt import GroundedPrompt, RegionPromptBuilder

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".pgm", ".ppm", ".webp")


class DistilError(BundleError):
    """The distillation cannot go on (no usable data, a failed gate, a stale checkpoint)."""


@dataclass(frozen=True, slots=True)
class DefectImage:
    path: Path
    id: str  # path relative to the --images root (POSIX): the record's key
    label: str | None  # MVTec defect folder, or the parent folder's name


def list_defect_images(root: str | Path) -> list[DefectImage]:
    """Defect images under ``root``, sorted.

    MVTec AD layout (``root`` is a category with ``test/<defect>/``, or a folder of such
    categories): every image in ``test/<defect>/`` except ``test/good``, labelled with the
    defect folder's name. Otherwise every image below ``root``, labelled with its
    folder's name (none for files directly in ``root``).
    """
    root = Path(root)
    if not root.is_dir():
        raise BundleError(f"image folder {root} does not exist: point --images at a folder of defect images "
                          f"or an MVTec AD category")
    cats = [root] if (root / "test").is_dir() else sorted(c for c in root.iterdir() if (c / "test").is_dir())
    out: list[DefectImage] = []
    if cats:
        for cat in cats:
            for d in sorted(p for p in (cat / "test").iterdir() if p.is_dir() and p.name != "good"):
                for p in sorted(d.iterdir()):
                    if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
                        out.append(DefectImage(p, p.relative_to(root).as_posix(), d.name))
    else:
        for p in sorted(root.rglob("*")):
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
                out.append(DefectImage(p, p.relative_to(root).as_posix(),
                                       p.parent.name if p.parent != root else None))
    if not out:
        layout = "its test/<defect>/ folders" if cats else "it"
        raise BundleError(f"no images found in {root} ({layout}): give a folder of defect images "
                          f"({', '.join(IMAGE_SUFFIXES)}) or an MVTec AD category")
    return out


class DescriptionRecord(BaseModel):
    """One image of the review file. Unknown keys (a reviewer's notes) are kept."""

    model_config = ConfigDict(extra="allow")

    id: str
    image: str
    image_sha256: str
    label: str | None = None
    #: Recomputed on every run from the image id, --holdout and --seed (stable as images are added).
    split: Literal["train", "holdout"] = "train"
    image_size: tuple[int, int]  # width, height
    verdict: Literal["OK", "NG"]
    score: float  # image score / image threshold (1.0 = threshold)
    #: The daemon's defect-message form: bbox [x, y, w, h] in frame pixels, area, normalised max_score.
    regions: list[dict[str, Any]]
    prompt: str
    teacher: str | None = None
    teacher_text: str | None = None
    #: What the student learns. Edit this (and set ``reviewed``) to correct the teacher.
    text: str | None = None
    reviewed: bool = False
    #: False: leave this image out of training and evaluation.
    use: bool = True
    note: str | None = None
    expert_sha256: str

    @property
    def person_owned(self) -> bool:
        return self.reviewed or (self.text is not None and self.text != self.teacher_text)

    @property
    def usable(self) -> bool:
        return self.use and bool(self.regions) and bool((self.text or "").strip())


def read_records(path: str | Path) -> list[DescriptionRecord]:
    path = Path(path)
    out: list[DescriptionRecord] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ConfigError(f"cannot read review file {path} ({e.strerror or e}): check the path") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(DescriptionRecord.model_validate(json.loads(line)))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} line {n} is not valid JSON ({e.msg} at column {e.colno}): fix that line "
                              f"(one JSON object per line) or delete it to describe the image again") from None
        except ValidationError as e:
            first = e.errors()[0]
            loc = ".".join(str(p) for p in first["loc"]) or "(record)"
            raise ConfigError(f"{path} line {n}, field '{loc}': {first['msg']}; fix that line or delete it to "
                              f"describe the image again") from None
    return out


def write_records(path: str | Path, records: Iterable[DescriptionRecord]) -> Path:
    """Atomic rewrite: an interrupted run never leaves half a review file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r.model_dump(mode="json"), ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def split_of(record_id: str, holdout: float, seed: int) -> Literal["train", "holdout"]:
    """Stable per image (adding images never moves old ones between splits)."""
    h = int.from_bytes(hashlib.sha256(f"{seed}:{record_id}".encode()).digest()[:8], "big") / 2**64
    return "holdout" if h < holdout else "train"


class RegionLocator:
    """The region expert as the daemon runs it (its :class:`~linecam.runtime.inspector.Inspector`):
    frame -> (verdict, normalised score, regions)."""

    def __init__(self, bundle: str | Path, *, image_threshold: float | None = None,
                 pixel_threshold: float | None = None, min_area_px: int = 16, backend: str = "onnxruntime",
                 precision: str | None = None) -> None:
        from linecam.runtime.backends import make_runner
        from linecam.runtime.inspector import Inspector, Thresholds

        self.bundle = load_bundle(bundle)
        t = Thresholds.of(self.bundle)
        thresholds = Thresholds(t.image if image_threshold is None else float(image_threshold),
                                t.pixel if pixel_threshold is None else float(pixel_threshold), int(min_area_px))
        self.inspector = Inspector(self.bundle, make_runner(self.bundle, backend, precision), thresholds)
        self.image_threshold = thresholds.image
        self.sha256 = self.bundle.model_sha256

    def locate(self, image: np.ndarray, bit_depth: int = 8) -> tuple[str, float, list[dict[str, Any]]]:
        ins = self.inspector.inspect(image, bit_depth)
        if ins.verdict is None:
            raise BundleError(f"region expert {self.bundle.root} gives NaN/Inf on this image: the bundle is "
                              f"broken; re-export it")
        thr = self.image_threshold
        return ins.verdict, ins.score_raw / thr, [r.to_dict(thr) for r in ins.regions]


def grounded(record: DescriptionRecord, builder: RegionPromptBuilder) -> GroundedPrompt:
    """The record's crop + prompt, rebuilt from its image and regions like the daemon builds them."""
    try:
        image, depth = read_image(record.image)
    except ValueError as e:
        raise BundleError(f"{e}; fix or remove it from the review file") from None
    # Stored regions are defect-message dicts: scores already normalised (threshold 1.0).
    return builder.build(image, record.regions, threshold=1.0, bit_depth=depth)


def prepare_records(images: Sequence[DefectImage], locator: RegionLocator, builder: RegionPromptBuilder,
                    existing: Sequence[DescriptionRecord], *, holdout: float, seed: int) -> list[DescriptionRecord]:
    """One record per image, reusing ``existing`` ones that still hold.

    A record is reused as is when its image, region expert and prompt are unchanged.
    Otherwise regions and prompt are rebuilt and the teacher text is cleared (it answered
    another prompt), except on records a person owns (their ``text`` is kept).
    """
    old = {r.id: r for r in existing}
    out: list[DescriptionRecord] = []
    kept_edits = 0
    for im in images:
        try:
            image, depth = read_image(im.path)
        except ValueError as e:
            logger.warning("skipping %s: %s", im.path, e)
            continue
        sha = sha256_file(im.path)
        h, w = image.shape[:2]
        prev = old.pop(im.id, None)
        if prev is not None and prev.image_sha256 == sha and prev.expert_sha256 == locator.sha256:
            regions, verdict, score = prev.regions, prev.verdict, prev.score
        else:
            verdict, score, regions = locator.locate(image, depth)
        prompt = builder.build(image, regions, threshold=1.0, bit_depth=depth).prompt
        split = split_of(im.id, holdout, seed)
        note = None if regions else "the region expert finds no defect here (OK verdict): not used"
        if prev is not None and prev.regions == regions and prev.prompt == prompt:
            rec = prev.model_copy(update={"image": str(im.path), "label": prev.label or im.label, "split": split})
        else:
            rec = DescriptionRecord(
                id=im.id, image=str(im.path), image_sha256=sha, label=im.label,
                split=split, image_size=(w, h),
                verdict=verdict, score=round(float(score), 4), regions=regions, prompt=prompt, note=note,
                expert_sha256=locator.sha256)
            if prev is not None and prev.person_owned:
                kept_edits += 1
                rec = rec.model_copy(update={"text": prev.text, "reviewed": prev.reviewed, "use": prev.use,
                                             "teacher": prev.teacher, "teacher_text": prev.teacher_text,
                                             **(prev.model_extra or {})})
        out.append(rec)
    if kept_edits:
        logger.warning("%d reviewed record(s) got new regions / prompts (image, region expert or prompt settings "
                       "changed); their text was kept: check that it still fits", kept_edits)
    if old:
        logger.warning("%d record(s) of the review file have no image any more and were dropped: %s",
                       len(old), ", ".join(sorted(old)[:5]) + (" ..." if len(old) > 5 else ""))
    return out
