"""``roc.png``, ``scores_hist.png`` and the worst cases' heatmap overlays (matplotlib, lazily)."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from linecam.calibration.metrics import roc_curve
from linecam.preprocess import Preprocessor
from linecam.evaluate.dataset import GOOD, HIST_NAME, REPORT_NAME, ROC_NAME, Sample, read_frame, read_mask
from linecam.evaluate.report import EvalReport, ImageRecord

logger = logging.getLogger(__name__)

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


def write_plots(out: Path, report: EvalReport, samples: list[Sample], maps: list[np.ndarray], pre: Preprocessor,
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
