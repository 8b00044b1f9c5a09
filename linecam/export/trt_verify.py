"""Does a built engine judge like the bundle's model? Engine vs ONNX Runtime on real images.

The reference is ONNX Runtime (CPU) on the bundle's FP32 ONNX: the model the thresholds
were fitted on. So the check covers everything between that model and the engine
(FP16 casting, INT8 Q/DQ, TensorRT's kernels) and asks what matters on the line:

* image scores within ``score`` x the image threshold;
* anomaly maps within ``map`` x the pixel threshold (99.9th percentile of |difference|);
* the same OK/NG verdict on every image whose reference score is clearly on one side of
  the threshold (further than the score tolerance), the same pixel verdicts on at least
  ``pixel_agreement`` of the clear pixels;
* with labelled images (a ``good/`` folder beside defect folders), image AUROC not lower
  than the reference's by more than ``auroc_drop``.

Numpy only: runs, and is tested, without a GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from linecam.bundle import Bundle, Thresholds
from linecam.errors import BundleError
from linecam.preprocess import Preprocessor, read_image
from linecam.runtime.backends.base import ExpertOutput

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class Tolerances:
    #: Largest |score difference|, as a fraction of the image threshold.
    score: float
    #: Largest 99.9th-percentile |map difference|, as a fraction of the pixel threshold.
    map: float
    #: Smallest fraction of clear pixels with the same verdict.
    pixel_agreement: float
    #: Largest image-AUROC drop (labelled images only): 0.005 = half a point.
    auroc_drop: float = 0.005


#: Per engine precision. FP32 engines may use TF32 (TensorRT's default), hence not 1e-6.
DEFAULT_TOLERANCES: dict[str, Tolerances] = {
    "fp32": Tolerances(score=0.01, map=0.02, pixel_agreement=0.999),
    "fp16": Tolerances(score=0.03, map=0.05, pixel_agreement=0.995),
    "int8": Tolerances(score=0.10, map=0.15, pixel_agreement=0.98),
}


@dataclass(frozen=True)
class VerifyImage:
    name: str
    image: np.ndarray
    bit_depth: int
    #: 0 good, 1 defective, None unknown.
    label: int | None = None


@dataclass
class VerificationReport:
    n_images: int
    precision: str
    tolerances: dict[str, float]
    score_max_abs: float
    score_max_rel: float          # / image threshold
    map_p999_abs: float
    map_p999_rel: float           # / pixel threshold
    map_max_abs: float
    verdicts_compared: int        # images with a clear reference verdict
    verdict_disagreements: list[str]
    pixel_agreement: float
    auroc_reference: float | None = None
    auroc_engine: float | None = None
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        parts = [f"{self.n_images} images", f"score max |d| {self.score_max_abs:.3g} "
                 f"({self.score_max_rel:.2%} of the image threshold)",
                 f"map p99.9 |d| {self.map_p999_abs:.3g} ({self.map_p999_rel:.2%} of the pixel threshold)",
                 f"verdicts {self.verdicts_compared - len(self.verdict_disagreements)}/{self.verdicts_compared} agree",
                 f"pixel verdicts {self.pixel_agreement:.4%} agree"]
        if self.auroc_reference is not None and self.auroc_engine is not None:
            parts.append(f"image AUROC {self.auroc_engine:.4f} vs {self.auroc_reference:.4f}")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        return d


def auroc(scores: Sequence[float], labels: Sequence[int]) -> float | None:
    """Image AUROC (:func:`linecam.calibration.metrics.auroc`: ties count half); None without both classes."""
    from linecam.calibration.metrics import auroc as _auroc

    y = np.asarray(labels, dtype=object)
    known = (y == 0) | (y == 1)  # unlabelled images take no part
    v = _auroc((y[known] == 1).astype(bool), np.asarray(scores, dtype=np.float64)[known])
    return None if np.isnan(v) else v


def compare(reference: Sequence[ExpertOutput], engine: Sequence[ExpertOutput], thresholds: Thresholds,
            tol: Tolerances, *, names: Sequence[str] | None = None, labels: Sequence[int | None] | None = None,
            precision: str = "") -> VerificationReport:
    """Compare per-image outputs (same order); never raises for a disagreement, reports it."""
    if len(reference) != len(engine) or not reference:
        raise ValueError("compare needs the same, non-zero number of reference and engine outputs")
    names = list(names) if names is not None else [str(i) for i in range(len(reference))]
    t_img = max(abs(thresholds.image), 1e-12)
    t_px = max(abs(thresholds.pixel), 1e-12)
    ref_s = np.array([r.score for r in reference], dtype=np.float64)
    eng_s = np.array([e.score for e in engine], dtype=np.float64)
    d_s = np.abs(ref_s - eng_s)

    diffs, agree, clear = [], 0, 0
    for r, e in zip(reference, engine):
        if r.anomaly_map.shape != e.anomaly_map.shape:
            raise ValueError(f"anomaly map shapes differ: {r.anomaly_map.shape} vs {e.anomaly_map.shape}")
        rm = r.anomaly_map.astype(np.float64)
        em = e.anomaly_map.astype(np.float64)
        diffs.append(np.abs(rm - em).ravel())
        sure = np.abs(rm - thresholds.pixel) > tol.map * t_px
        clear += int(sure.sum())
        agree += int(((rm >= thresholds.pixel) == (em >= thresholds.pixel))[sure].sum())
    d_m = np.concatenate(diffs)
    p999 = float(np.quantile(d_m, 0.999))

    band = tol.score * t_img
    sure_img = np.abs(ref_s - thresholds.image) > band
    flips = [n for n, ok, r, e in zip(names, sure_img, ref_s, eng_s)
             if ok and (r >= thresholds.image) != (e >= thresholds.image)]

    report = VerificationReport(
        n_images=len(reference), precision=precision, tolerances=asdict(tol),
        score_max_abs=float(d_s.max()), score_max_rel=float(d_s.max() / t_img),
        map_p999_abs=p999, map_p999_rel=p999 / t_px, map_max_abs=float(d_m.max()),
        verdicts_compared=int(sure_img.sum()), verdict_disagreements=flips,
        pixel_agreement=agree / clear if clear else 1.0)
    if labels is not None and all(lab is not None for lab in labels):
        report.auroc_reference = auroc(ref_s, labels)  # type: ignore[arg-type]
        report.auroc_engine = auroc(eng_s, labels)  # type: ignore[arg-type]

    f = report.failures
    if report.score_max_rel > tol.score:
        worst = names[int(d_s.argmax())]
        f.append(f"image score differs by {report.score_max_rel:.2%} of the threshold on {worst} "
                 f"(bound {tol.score:.0%})")
    if report.map_p999_rel > tol.map:
        f.append(f"anomaly map differs by {report.map_p999_rel:.2%} of the pixel threshold at the 99.9th "
                 f"percentile (bound {tol.map:.0%})")
    if flips:
        f.append(f"OK/NG verdict flips on {len(flips)} of {report.verdicts_compared} clear image(s) "
                 f"(first: {flips[0]})")
    if report.pixel_agreement < tol.pixel_agreement:
        f.append(f"pixel verdicts agree on {report.pixel_agreement:.3%} (bound {tol.pixel_agreement:.1%})")
    if (report.auroc_reference is not None and report.auroc_engine is not None
            and report.auroc_reference - report.auroc_engine > tol.auroc_drop):
        f.append(f"image AUROC drops {report.auroc_reference - report.auroc_engine:.4f} "
                 f"(bound {tol.auroc_drop})")
    return report


# --------------------------------------------------------------------------- images


def _read_folder(folder: Path, label: int | None) -> list[VerifyImage]:
    out = []
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            try:
                img, depth = read_image(p)
            except ValueError as e:
                logger.warning("skipping %s: %s", p, e)
                continue
            out.append(VerifyImage(f"{folder.name}/{p.name}" if label is not None else p.name, img, depth, label))
    return out


def load_images(folder: Path, limit: int = 32) -> list[VerifyImage]:
    """Images of ``folder``; with subfolders, ``good`` ones are labelled 0 and the others 1
    (the MVTec ``test/`` layout). At most ``limit``, spread evenly over the sorted list."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BundleError(f"verification image folder {folder} does not exist: point --images at a folder "
                          f"of the line's images (good ones, or good/ and defect subfolders)")
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir())
    images = _read_folder(folder, None)
    if subdirs and not images:
        images = [im for d in subdirs for im in _read_folder(d, 0 if d.name.lower() == "good" else 1)]
    if not images:
        raise BundleError(f"{folder} holds no readable image: point --images at a folder of the line's images")
    if len(images) > limit:
        idx = np.unique(np.linspace(0, len(images) - 1, limit).round().astype(int))
        images = [images[i] for i in idx]
    return images


def bundle_images(bundle: Bundle, limit: int = 32) -> list[VerifyImage] | None:
    """The held-out images the bundle's thresholds were fitted on, when they are still on
    this machine (``provenance.details.images`` + ``holdout_files``); None otherwise."""
    details = bundle.manifest.provenance.details
    folder, names = details.get("images"), details.get("holdout_files")
    if not folder or not names or not Path(folder).is_dir():
        return None
    paths = [Path(folder) / n for n in names if (Path(folder) / n).is_file()]
    if not paths:
        return None
    if len(paths) > limit:
        paths = [paths[i] for i in np.unique(np.linspace(0, len(paths) - 1, limit).round().astype(int))]
    out = []
    for p in paths:
        try:
            img, depth = read_image(p)
        except ValueError:
            continue
        out.append(VerifyImage(p.name, img, depth, 0))
    return out or None


def run_images(run: Callable[[np.ndarray], ExpertOutput], bundle: Bundle,
               images: Sequence[VerifyImage]) -> list[ExpertOutput]:
    """Preprocess exactly as the daemon does and run; copies, since runners reuse buffers."""
    pre = Preprocessor(bundle.manifest.preprocess)
    out = []
    for im in images:
        r = run(pre(im.image, im.bit_depth))
        out.append(ExpertOutput(anomaly_map=np.array(r.anomaly_map, dtype=np.float32, copy=True), score=r.score))
    return out
