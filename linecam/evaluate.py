"""``linecam evaluate``: how well a region-expert bundle separates good from defective parts,
measured on a dataset in MVTec AD layout::

    <category>/test/good/*.png                    good parts (label 0)
    <category>/test/<defect>/*.png                defective parts (label 1), one folder per defect type
    <category>/ground_truth/<defect>/<name>_mask.png   0 background, 255 defect; the image's size
    <category>/train/good/*.png                   (not used here)

Every image goes through the line daemon's own code path: the bundle is loaded and
verified with :func:`linecam.bundle.load_bundle`, the backend is chosen and opened with
:func:`linecam.runtime.backends.select.choose_backend` / ``open_runner``, the file is read
into the camera frame layout exactly as the replay camera does, and
:class:`linecam.preprocess.Preprocessor` (configured from the manifest) makes the model
input; the verdict and the NaN/Inf check are the daemon's
:class:`~linecam.runtime.postprocess.Postprocessor`. So ``score_raw`` here is what the daemon
publishes for the same image (a test checks it through a real broker), and ``score`` is the
published ``score_raw / image threshold`` (1.0 = at the threshold).

Ground truth meets the anomaly map at the *evaluation size*: the map's own, or the model input's
when the map is coarser (a coarse map is upsampled bilinearly); masks get there by :data:`MASK_RESIZE`.

Metrics (:mod:`linecam.calibration.metrics`): image AUROC, pixel AUROC and AU-PRO up to 30 %
FPR on all test images; F1, false-reject rate (good flagged NG) and miss rate (defective
passed OK) at the bundle's image threshold (score >= threshold is NG, the daemon's rule);
the same per defect type, each against all the good images. Output: ``report.json`` and,
with matplotlib, ``roc.png``, ``scores_hist.png`` and ``worst_XX_<name>.png`` overlays.

torch is never imported (the edge can evaluate the bundle it runs).
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from linecam import __version__
from linecam.bundle import Bundle, load_bundle
from linecam.calibration.metrics import MAX_EXACT_PIXELS, aupro, auroc, pixel_auroc, rates_at, roc_curve
from linecam.camera.replay import IMAGE_SUFFIXES, to_frame_layout
from linecam.errors import BundleError, LinecamError
from linecam.preprocess import Preprocessor, read_image
from linecam.progress import make_progress
from linecam.runtime.postprocess import Postprocessor

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


# --------------------------------------------------------------------------- report


@dataclass(frozen=True)
class Metrics:
    """Detection quality on one set of images (NaN where undefined, e.g. no defect image)."""

    n_images: int
    n_good: int
    n_bad: int
    image_auroc: float
    pixel_auroc: float
    #: Area under the per-region-overlap curve up to 30 % pixel FPR, normalised (MVTec AD AU-PRO).
    aupro: float
    #: At the bundle's image threshold (score >= threshold is NG).
    f1: float
    false_reject_rate: float
    miss_rate: float
    precision: float
    recall: float
    tp: int
    fp: int
    tn: int
    fn: int

    def __getitem__(self, key: str) -> Any:
        """``metrics["aupro"]`` as well as ``metrics.aupro`` (the report.json keys)."""
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)


@dataclass(frozen=True)
class ImageRecord:
    path: str
    defect: str
    label: int
    #: The model's image score (raw units; the daemon's ``score_raw``); None for a NaN/Inf output.
    score_raw: float | None
    #: ``score_raw / image threshold`` as published over MQTT (1.0 = at the threshold).
    score: float | None
    verdict: str | None
    #: Defect pixels of the ground truth at the evaluation size.
    defect_px: int


@dataclass
class EvalReport:
    bundle_name: str
    bundle_dir: str
    #: :attr:`Bundle.model_sha256`: the identity the daemon publishes in every verdict.
    model_sha256: str
    backend: str
    role: str
    backend_reason: str
    dataset_dir: str
    image_threshold: float
    pixel_threshold: float
    #: Source image (width, height) and anomaly map (width, height).
    image_size: tuple[int, int]
    map_size: tuple[int, int]
    metrics: Metrics
    per_defect: dict[str, Metrics]
    images: list[ImageRecord]
    seconds: float
    #: (width, height) the pixel metrics were computed at: the map's, or the input's for a coarser map.
    eval_size: tuple[int, int] = (0, 0)
    #: Pixel metrics exact (sort over all pixels) or histogram-approximated (see metrics.pixel_auroc).
    pixel_method: str = "exact"
    #: Images whose model output had NaN/Inf (left out of every metric, as the daemon skips them).
    n_invalid: int = 0
    out_dir: str | None = None
    files: list[str] = field(default_factory=list)

    @property
    def report_path(self) -> Path | None:
        return Path(self.out_dir) / REPORT_NAME if self.out_dir else None

    def to_dict(self) -> dict[str, Any]:
        """The content of report.json (NaN written as null)."""
        d = {
            "schema": "linecam.evaluation", "schema_version": 1,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "linecam_version": __version__,
            "bundle": {"name": self.bundle_name, "path": self.bundle_dir, "model_sha256": self.model_sha256,
                       "thresholds": {"image": self.image_threshold, "pixel": self.pixel_threshold}},
            "backend": {"name": self.backend, "role": self.role, "reason": self.backend_reason},
            "dataset": {"path": self.dataset_dir, "n_images": len(self.images),
                        "n_good": sum(r.label == 0 for r in self.images),
                        "n_bad": sum(r.label == 1 for r in self.images),
                        "defect_types": sorted(self.per_defect), "n_invalid_outputs": self.n_invalid,
                        "image_size": {"width": self.image_size[0], "height": self.image_size[1]},
                        "map_size": {"width": self.map_size[0], "height": self.map_size[1]},
                        "eval_size": {"width": self.eval_size[0], "height": self.eval_size[1]},
                        "mask_resize": MASK_RESIZE},
            "metrics": {**asdict(self.metrics), "fpr_limit": FPR_LIMIT, "pixel_method": self.pixel_method},
            "per_defect": {k: asdict(v) for k, v in self.per_defect.items()},
            "seconds": round(self.seconds, 3),
            "files": list(self.files),
            "images": [asdict(r) for r in self.images],
        }
        return _json_safe(d)


def _json_safe(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def compute_metrics(labels: np.ndarray, scores: np.ndarray, masks: list[np.ndarray], maps: list[np.ndarray],
                    threshold: float) -> Metrics:
    """All metrics for one set of images (masks / maps at the evaluation size)."""
    labels = np.asarray(labels, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    r = rates_at(labels, scores, threshold)
    n_bad = int(labels.sum())
    return Metrics(n_images=int(labels.size), n_good=int(labels.size - n_bad), n_bad=n_bad,
                   image_auroc=auroc(labels, scores), pixel_auroc=pixel_auroc(masks, maps),
                   aupro=aupro(masks, maps, FPR_LIMIT), f1=r.f1, false_reject_rate=r.false_reject_rate,
                   miss_rate=r.miss_rate, precision=r.precision, recall=r.recall,
                   tp=r.tp, fp=r.fp, tn=r.tn, fn=r.fn)


# --------------------------------------------------------------------------- evaluation


def _open(bundle: Bundle, backend: str, precision: str | None, intra_op_threads: int | None):
    """Choose and open the runner exactly as the daemon would for this backend setting."""
    from linecam.runtime.backends.select import choose_backend, open_runner
    from linecam.runtime.device import DeviceFacts, probe_device

    # ``onnxruntime`` never looks at the device (the daemon does not probe for it either).
    facts = DeviceFacts() if backend == "onnxruntime" else probe_device()
    choice = choose_backend(bundle, backend, precision, facts)
    runner = open_runner(bundle, choice, intra_op_threads=intra_op_threads or 0, workers=1,
                         auto=backend == "auto")
    return choice, runner


def evaluate_bundle(bundle_dir: str | Path, dataset_dir: str | Path, out_dir: str | Path | None = None, *,
                    backend: str = "onnxruntime", precision: str | None = None,
                    intra_op_threads: int | None = None, worst: int = 6, progress: bool = True) -> EvalReport:
    """Run every test image of ``dataset_dir`` (MVTec AD layout) through the bundle the way the
    daemon does and measure it; with ``out_dir``, write ``report.json`` and the plots there.

    ``backend``: onnxruntime | onnxruntime-cuda | tensorrt | auto (as ``model.backend``);
    ``precision``: fp32 | fp16 | int8 (None: ONNX Runtime takes fp32 first, TensorRT the fp16 engine first);
    ``intra_op_threads``: ONNX Runtime threads (None or 0: one per core); ``worst``: how many
    worst cases to draw. Raises :class:`~linecam.errors.LinecamError` subclasses (one line
    each) for a bad bundle, backend or dataset.
    """
    t_start = time.monotonic()
    bundle = load_bundle(bundle_dir)
    root = Path(dataset_dir)
    samples = scan_dataset(root)
    man = bundle.manifest
    thr_img, thr_px = float(man.thresholds.image), float(man.thresholds.pixel)
    pre = Preprocessor(man.preprocess)
    try:  # the daemon's verdict rule and output check
        post = Postprocessor(thr_px, thr_img)
    except ValueError as e:
        raise BundleError(f"bundle {bundle.root} cannot be run on the line: {e} (image {thr_img}, pixel "
                          f"{thr_px}); refit its thresholds with export-engine") from None
    choice, runner = _open(bundle, backend, precision, intra_op_threads)

    scores: list[float] = []
    maps: list[np.ndarray] = []
    gts: list[np.ndarray] = []
    valid: list[bool] = []
    first: tuple[str, tuple[int, int]] | None = None
    map_hw: tuple[int, int] | None = None
    eval_hw: tuple[int, int] = (0, 0)
    try:
        with make_progress(progress) as bar:
            task = bar.add_task(f"evaluate {man.name}", total=len(samples), info="")
            for s in samples:
                image, bit_depth = read_frame(s)
                hw = (int(image.shape[0]), int(image.shape[1]))
                if first is None:
                    first = (s.rel, hw)
                elif hw != first[1]:
                    raise DatasetError(f"image {s.rel} is {hw[1]}x{hw[0]} but {first[0]} is "
                                       f"{first[1][1]}x{first[1][0]}: the line has one frame size, so must the "
                                       f"test images; resize or remove it")
                mask = read_mask(s, root, hw)
                try:
                    x = pre(image, bit_depth)
                except ValueError as e:
                    raise DatasetError(f"image {s.rel}: {e}: is this the dataset the bundle was made for? "
                                       f"(its preprocess.crop needs larger frames)") from None
                out = runner.run(x)
                amap = np.array(out.anomaly_map, dtype=np.float32)  # a copy: GPU runners reuse buffers
                if map_hw is None:
                    map_hw = (int(amap.shape[0]), int(amap.shape[1]))
                    in_h, in_w = man.preprocess.input_size
                    eval_hw = (in_h, in_w) if map_hw[0] < in_h or map_hw[1] < in_w else map_hw
                elif amap.shape != map_hw:
                    raise LinecamError(f"the model gave a {amap.shape} anomaly map for {s.rel} but {map_hw} "
                                       f"before: the bundle's model is inconsistent; re-export it")
                ok = post.is_valid(amap) and math.isfinite(out.score)
                if not ok:
                    logger.warning("%s: model output has NaN/Inf; left out of the metrics (the daemon "
                                   "would publish SKIPPED invalid_model_output)", s.rel)
                scores.append(float(out.score))
                if eval_hw != map_hw:
                    amap = cv2.resize(amap, (eval_hw[1], eval_hw[0]), interpolation=cv2.INTER_LINEAR)
                maps.append(amap)
                gts.append(mask_to_map(mask, pre, eval_hw))
                valid.append(ok)
                bar.update(task, advance=1, info=s.rel)
    finally:
        runner.close()
    assert first is not None and map_hw is not None  # scan_dataset guarantees one sample

    records = [
        ImageRecord(path=s.rel, defect=s.defect, label=s.label, score_raw=sc if ok else None,
                    score=sc / thr_img if ok else None, verdict=post.verdict(sc) if ok else None,
                    defect_px=int(g.sum()))
        for s, sc, g, ok in zip(samples, scores, gts, valid)
    ]
    vidx = [i for i, ok in enumerate(valid) if ok]
    if not vidx:
        raise LinecamError("the model gave NaN/Inf for every test image: the bundle is broken; re-export it")
    labels = np.array([samples[i].label for i in vidx])
    vscores = np.array([scores[i] for i in vidx])
    vgts = [gts[i] for i in vidx]
    vmaps = [maps[i] for i in vidx]
    for s, g in zip(samples, gts):
        if s.label and not g.any():
            logger.warning("%s: its defect covers less than half of any anomaly-map pixel, so it counts for "
                           "the image metrics but adds no region to the pixel metrics", s.rel)
    overall = compute_metrics(labels, vscores, vgts, vmaps, thr_img)
    per_defect: dict[str, Metrics] = {}
    good = [k for k, i in enumerate(vidx) if samples[i].defect == GOOD]
    for d in sorted({s.defect for s in samples} - {GOOD}):
        sel = good + [k for k, i in enumerate(vidx) if samples[i].defect == d]
        per_defect[d] = compute_metrics(labels[sel], vscores[sel], [vgts[k] for k in sel],
                                        [vmaps[k] for k in sel], thr_img)
    if overall.n_good == 0 or overall.n_bad == 0:
        logger.warning("the test set has %s: AUROC, AU-PRO and F1 are undefined (null in the report)",
                       "no good images" if overall.n_good == 0 else "no defect images")

    n_px = sum(m.size for m in vmaps)
    report = EvalReport(
        bundle_name=man.name, bundle_dir=str(bundle.root), model_sha256=bundle.model_sha256,
        backend=choice.backend, role=choice.role, backend_reason=choice.reason, dataset_dir=str(root),
        image_threshold=thr_img, pixel_threshold=thr_px, image_size=(first[1][1], first[1][0]),
        map_size=(map_hw[1], map_hw[0]), eval_size=(eval_hw[1], eval_hw[0]), metrics=overall, per_defect=per_defect, images=records,
        seconds=0.0, pixel_method="exact" if n_px <= MAX_EXACT_PIXELS else "histogram",
        n_invalid=len(valid) - len(vidx))
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        report.out_dir = str(out)
        _write_json(report, t_start)  # first: the numbers survive whatever happens to the plots
        report.files = _write_plots(out, report, samples, maps, pre, worst)
    report.seconds = time.monotonic() - t_start
    if out_dir is not None:
        _write_json(report, t_start)
    logger.info("evaluated %s on %d images in %.1f s: image AUROC %.4f, pixel AUROC %.4f, AU-PRO %.4f",
                man.name, len(records), report.seconds, overall.image_auroc, overall.pixel_auroc, overall.aupro)
    return report


def _write_json(report: EvalReport, t_start: float) -> None:
    assert report.report_path is not None
    data = report.to_dict()
    data["seconds"] = round(time.monotonic() - t_start, 3)
    report.report_path.write_text(json.dumps(data, indent=2) + "\n")


# --------------------------------------------------------------------------- plots


def worst_cases(records: list[ImageRecord], n: int) -> list[int]:
    """Indices of the worst cases: the highest-scoring good images and the lowest-scoring
    defective ones, about half each (the other kind fills in when one runs short); good
    ones first, worst first."""
    good = sorted((i for i, r in enumerate(records) if r.label == 0 and r.score_raw is not None),
                  key=lambda i: -records[i].score_raw)  # type: ignore[operator]
    bad = sorted((i for i, r in enumerate(records) if r.label == 1 and r.score_raw is not None),
                 key=lambda i: records[i].score_raw)  # type: ignore[arg-type, return-value]
    n = max(0, n)
    k_good = min(len(good), n - min(len(bad), n // 2))
    k_bad = min(len(bad), n - k_good)
    return good[:k_good] + bad[:k_bad]


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "image"


def _display(image: np.ndarray, bit_depth: int) -> np.ndarray:
    """8-bit (H, W) or (H, W, 3) for imshow."""
    img = image if bit_depth == 8 else (image.astype(np.float64) / (2**bit_depth - 1) * 255).astype(np.uint8)
    return img[:, :, 0] if img.shape[2] == 1 else img


def _write_plots(out: Path, report: EvalReport, samples: list[Sample], maps: list[np.ndarray], pre: Preprocessor,
                 worst: int) -> list[str]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning("plots skipped: matplotlib is not installed (pip install linecam[plots]); "
                       "%s has all the numbers", out / REPORT_NAME)
        return []

    def figure(w: float, h: float) -> Any:
        fig = Figure(figsize=(w, h), dpi=90)  # Agg, without pyplot: no global backend switch
        FigureCanvasAgg(fig)
        return fig

    written: list[str] = []
    recs = report.images
    idx = [i for i, r in enumerate(recs) if r.score_raw is not None]
    labels = np.array([recs[i].label for i in idx])
    raw = np.array([recs[i].score_raw for i in idx], dtype=np.float64)
    thr = report.image_threshold

    # ROC, with the operating point at the bundle's threshold
    fig = figure(5.5, 5)
    ax = fig.add_subplot()
    if 0 < labels.sum() < labels.size:
        fpr, tpr, _ = roc_curve(labels, raw)
        ax.plot(fpr, tpr, lw=2, label=f"all defects (AUROC {report.metrics.image_auroc:.3f})")
        if len(report.per_defect) > 1:
            for d, m in list(report.per_defect.items())[:8]:
                sel = np.array([recs[i].defect in (GOOD, d) for i in idx])
                f, t, _ = roc_curve(labels[sel], raw[sel])
                ax.plot(f, t, lw=1, alpha=0.7, label=f"{d} ({m.image_auroc:.3f})")
        ax.plot([report.metrics.false_reject_rate], [report.metrics.recall], "ko",
                label=f"bundle threshold {thr:.4g}")
    else:
        ax.text(0.5, 0.5, "needs good and defective images", ha="center", va="center")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="false-positive rate (good flagged NG)", ylabel="true-positive rate (defects caught)",
           title=f"{report.bundle_name}: image ROC", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / ROC_NAME)
    written.append(ROC_NAME)

    # score histograms, good vs defective, with the threshold
    norm = thr > 0
    vals = raw / thr if norm else raw
    line = 1.0 if norm else thr
    fig = figure(7, 4)
    ax = fig.add_subplot()
    edges = np.histogram_bin_edges(np.r_[vals, line], bins=min(40, max(10, vals.size // 3)))
    for lab, name, colour in ((0, "good", "tab:green"), (1, "defective", "tab:red")):
        v = vals[labels == lab]
        if v.size:
            ax.hist(v, bins=edges, alpha=0.6, color=colour, label=f"{name} (n={v.size})")
    ax.axvline(line, color="k", ls="--", label="threshold (NG at or above)")
    ax.set(xlabel="score (1.0 = threshold, as published)" if norm else "raw score", ylabel="images",
           title=f"{report.bundle_name}: image scores")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / HIST_NAME)
    written.append(HIST_NAME)

    # worst cases: image | anomaly map over the model's view | ground-truth contour
    picks = worst_cases(recs, worst)
    if picks:
        vmaps = [maps[i] for i in idx]
        lo = float(min(m.min() for m in vmaps))
        hi = float(max(m.max() for m in vmaps))
    crop = pre.spec.crop
    for n, i in enumerate(picks, 1):
        s, r = samples[i], recs[i]
        image, bit_depth = read_frame(s)
        view = pre.crop(image)
        ch, cw = view.shape[:2]
        mask = pre.crop(read_mask(s, Path(report.dataset_dir), image.shape[:2]))
        amap = cv2.resize(maps[i], (cw, ch), interpolation=cv2.INTER_LINEAR)
        fig = figure(13, 4.6)
        axes = fig.subplots(1, 3)
        shown, cmap = _display(image, bit_depth), ("gray" if image.shape[2] == 1 else None)
        axes[0].imshow(shown, cmap=cmap)
        if crop is not None:
            axes[0].add_patch(_rect(crop.left, crop.top, crop.width, crop.height))
        axes[0].set_title(f"{r.path}\n{'good' if r.label == 0 else 'defect: ' + r.defect}", fontsize=9)
        vshown = _display(view, bit_depth)
        axes[1].imshow(vshown, cmap=cmap)
        im = axes[1].imshow(amap, cmap="jet", alpha=0.5, vmin=lo, vmax=hi)
        if amap.max() >= report.pixel_threshold > amap.min():
            axes[1].contour(amap >= report.pixel_threshold, levels=[0.5], colors="white", linewidths=1)
        fig.colorbar(im, ax=axes[1], fraction=0.046, pad=0.04)
        axes[1].set_title(f"anomaly map: score {r.score:.3f} ({r.verdict})", fontsize=9)  # worst_cases: scored ones
        axes[2].imshow(vshown, cmap=cmap)
        if mask.any():
            axes[2].contour(mask.astype(np.uint8), levels=[0.5], colors="red", linewidths=1.2)
            axes[2].set_title("ground truth (red)", fontsize=9)
        else:
            axes[2].set_title("ground truth: no defect", fontsize=9)
        for a in axes:
            a.set_axis_off()
        fig.tight_layout()
        name = f"worst_{n:02d}_{_safe_name(r.defect + '_' + s.path.stem)}.png"
        fig.savefig(out / name)
        written.append(name)
    return written


def _rect(x: float, y: float, w: float, h: float) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.5, y - 0.5), w, h, fill=False, edgecolor="yellow", linewidth=1.2)


# --------------------------------------------------------------------------- console


def _fmt(v: float) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.4f}"


def print_report(report: EvalReport, console: Any = None) -> None:
    """A short rich table of the metrics (overall and per defect type), then where the report is."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    m = report.metrics
    # Paths are printed whole (no wrapping, no markup): they get copied into other commands.
    console.print(f"{report.bundle_name} on {report.dataset_dir}: {m.n_images} images ({m.n_good} good, "
                  f"{m.n_bad} defective); backend {report.backend} ({report.role}); image threshold "
                  f"{report.image_threshold:.4g}", markup=False, soft_wrap=True)
    table = Table(show_edge=False, caption=f"AU-PRO to {FPR_LIMIT:.0%} FPR; F1/FRR/miss at the threshold",
                  caption_justify="left")
    for col in ("", "n", "img AUROC", "px AUROC", "AU-PRO", "F1", "FRR", "miss"):
        table.add_column(col, justify="left" if not col else "right", no_wrap=True)
    rows = [("all", m)] + list(report.per_defect.items())
    for name, r in rows:
        table.add_row(name, str(r.n_bad if name != "all" else r.n_images), _fmt(r.image_auroc),
                      _fmt(r.pixel_auroc), _fmt(r.aupro), _fmt(r.f1),
                      _fmt(r.false_reject_rate) if name == "all" else "", _fmt(r.miss_rate))
    console.print(table)
    if report.n_invalid:
        console.print(f"{report.n_invalid} image(s) gave NaN/Inf and are left out of the metrics")
    if report.report_path is not None:
        console.print(f"report: {report.report_path}" + (f"  (+ {len(report.files)} plots)" if report.files else ""),
                      markup=False, soft_wrap=True)
