"""What ``linecam evaluate`` measured: metrics, per-image records, ``report.json``, the console table."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from linecam import __version__
from linecam.calibration.metrics import aupro, auroc, pixel_auroc, rates_at
from linecam.evaluate.dataset import FPR_LIMIT, MASK_RESIZE, REPORT_NAME

logger = logging.getLogger(__name__)

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


def write_json(report: EvalReport, t_start: float) -> None:
    assert report.report_path is not None
    data = report.to_dict()
    data["seconds"] = round(time.monotonic() - t_start, 3)
    report.report_path.write_text(json.dumps(data, indent=2) + "\n")


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
