"""The accuracy gate: a quantized (FP16 / INT8) region expert may replace the FP32 model only
if it still separates good from defective parts and its anomaly map still agrees.

:func:`compare` runs the reference and every candidate on ONNX Runtime CPU over the same
preprocessed inputs and measures, per candidate:

* image AUROC and its drop in points (``100 * (ref - cand)``), with the drop's 95 % interval
  (DeLong, paired): on 64 + 64 images it spanned 3-4 points for real-photo students, so a failure whose interval
  reaches below the bound says to measure on more images (``--gate-images``);
* Pearson correlation of the anomaly maps with the reference's, pooled over every pixel
  of every image (a quantized map that no longer agrees fails even if AUROC holds:
  regions, their sizes and the pixel threshold all come from the map);
* max and p99 of ``|map - ref map|``, and the max ``|score - ref score|``, relative to the
  reference map's range over the set (the units the bundle's thresholds live in);
* pixel AUROC (and its drop) when defect masks are given.

:meth:`GateReport.enforce` turns that into a verdict with three default bounds: AUROC drop,
map Pearson, and score agreement. The last one is not decoration: calibrating on good
images only clips the channels that fire on defects, and the INT8 model then scores a
defect 0.2 where FP32 says 0.9 - image AUROC unchanged (ranking survives), map Pearson
still ~0.93, but every threshold fitted on the FP32 model is now wrong (measured on a
ScratchExpert; see tests/test_quantize.py). When the image AUROC cannot be measured (the
set has only good or only defective images) the gate says so and judges on map and score
agreement alone; a Pearson that cannot be computed (a constant map) fails.
No torch here (numpy + onnxruntime).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from linecam.calibration import metrics
from linecam.errors import BundleError
from linecam.runtime.device import first_line

logger = logging.getLogger(__name__)

MAP_NAME = "anomaly_map"
SCORE_NAME = "score"
#: Default bounds (CLI: ``--max-auroc-drop``, ``--min-map-pearson``, ``--max-score-diff``).
MAX_AUROC_DROP = 0.5
MIN_PEARSON = 0.9
#: Largest |score - ref score| as a fraction of the reference map's range. A well calibrated
#: INT8 ScratchExpert measured 1-2 % on its old sigmoid map, 4 % on the unbounded one (issue 21:
#: logit errors above p = 0.5 now show), FP16 < 0.1 %; good-only calibration 73-89 %.
MAX_SCORE_DIFF = 0.1


@dataclass
class CandidateMetrics:
    name: str
    path: str
    auroc: float | None
    #: 100 x (reference AUROC - candidate AUROC); None when AUROC is not measurable.
    auroc_drop: float | None
    pearson: float | None
    #: max / p99 of |map - ref map| over all pixels, as a fraction of the reference map's range.
    map_max_rel_diff: float
    map_p99_rel_diff: float
    #: max over images of |score - ref score|, as a fraction of the reference map's range.
    score_max_rel_diff: float
    pixel_auroc: float | None = None
    pixel_auroc_drop: float | None = None
    #: 95 % interval of ``auroc_drop`` (points; DeLong, paired): how far another draw of as many
    #: images could move it. None when AUROC is not measurable.
    auroc_drop_ci95: tuple[float, float] | None = None
    #: Problems found while running (non-finite outputs), independent of the bounds.
    errors: list[str] = field(default_factory=list)


@dataclass
class Verdict:
    name: str
    passed: bool
    reasons: list[str]


def _num(v: float | None) -> float | None:
    """JSON-able: NaN/inf become None."""
    return None if v is None or not math.isfinite(v) else float(v)


@dataclass
class GateReport:
    reference: str
    n_images: int
    n_defective: int
    reference_auroc: float | None
    reference_pixel_auroc: float | None
    candidates: dict[str, CandidateMetrics]
    notes: list[str] = field(default_factory=list)
    #: Bounds and outcome of the last :meth:`evaluate` / :meth:`enforce`.
    max_auroc_drop: float = MAX_AUROC_DROP
    min_pearson: float = MIN_PEARSON
    max_score_diff: float = MAX_SCORE_DIFF
    #: Optional bound on the pixel AUROC drop (points); None: reported, not enforced.
    max_pixel_auroc_drop: float | None = None
    forced: bool = False

    @property
    def auroc_measurable(self) -> bool:
        return self.reference_auroc is not None

    @property
    def auroc_step(self) -> float | None:
        """Points of image AUROC one swapped (good, defective) pair is worth on this set."""
        pairs = self.n_defective * (self.n_images - self.n_defective)
        return 100.0 / pairs if pairs else None

    def resolution_note(self) -> str | None:
        """A note when the AUROC bound is only a handful of swapped pairs (a small set)."""
        step = self.auroc_step
        if step is None or self.max_auroc_drop >= 50 * step:
            return None
        return (f"image AUROC on {self.n_defective} defective x {self.n_images - self.n_defective} good images: "
                f"one swapped pair moves it {step:.3g} points, so the {self.max_auroc_drop:g}-point bound is "
                f"{self.max_auroc_drop / step:.0f} pair(s); more labelled images make the gate steadier")

    def all_notes(self) -> list[str]:
        extra = self.resolution_note()
        return [*self.notes, *([extra] if extra else [])]

    def verdicts(self) -> list[Verdict]:
        """Pass/fail per candidate under the report's bounds (set by :meth:`evaluate`)."""
        out = []
        for name, c in self.candidates.items():
            reasons = list(c.errors)
            if self.auroc_measurable:
                if c.auroc is None or c.auroc_drop is None:
                    reasons.append("image AUROC not measurable on its scores")
                elif c.auroc_drop > self.max_auroc_drop:
                    # Signed like the "-X points" beside it (a change, negative = a loss); gate.json
                    # keeps the drop's own interval (positive = a loss).
                    ci = "" if c.auroc_drop_ci95 is None else \
                        f"; 95 % interval on this set {-c.auroc_drop_ci95[1]:+.2f} to {-c.auroc_drop_ci95[0]:+.2f}"
                    reasons.append(f"image AUROC {100 * self.reference_auroc:.2f} -> {100 * c.auroc:.2f} "
                                   f"(-{c.auroc_drop:.2f} points > {self.max_auroc_drop:g} allowed{ci})")
            if c.pearson is None:
                reasons.append("map agreement not measurable (a constant anomaly map)")
            elif c.pearson < self.min_pearson:
                reasons.append(f"map Pearson {c.pearson:.3f} < {self.min_pearson:g}")
            if c.score_max_rel_diff > self.max_score_diff:
                reasons.append(f"scores differ by up to {c.score_max_rel_diff:.1%} of the map range "
                               f"(> {self.max_score_diff:.1%}: thresholds fitted on the reference no longer fit)")
            if (self.max_pixel_auroc_drop is not None and c.pixel_auroc_drop is not None
                    and c.pixel_auroc_drop > self.max_pixel_auroc_drop):
                reasons.append(f"pixel AUROC -{c.pixel_auroc_drop:.2f} points > {self.max_pixel_auroc_drop:g} allowed")
            out.append(Verdict(name, not reasons, reasons))
        return out

    def evaluate(self, max_auroc_drop: float = MAX_AUROC_DROP, min_pearson: float = MIN_PEARSON,
                 max_score_diff: float = MAX_SCORE_DIFF, max_pixel_auroc_drop: float | None = None) -> bool:
        """Set the bounds; True if every candidate passes them."""
        self.max_auroc_drop, self.min_pearson = float(max_auroc_drop), float(min_pearson)
        self.max_score_diff = float(max_score_diff)
        self.max_pixel_auroc_drop = None if max_pixel_auroc_drop is None else float(max_pixel_auroc_drop)
        return all(v.passed for v in self.verdicts())

    @property
    def passed(self) -> bool:
        return all(v.passed for v in self.verdicts())

    def enforce(self, max_auroc_drop: float = MAX_AUROC_DROP, force: bool = False, *,
                min_pearson: float = MIN_PEARSON, max_score_diff: float = MAX_SCORE_DIFF,
                max_pixel_auroc_drop: float | None = None) -> GateReport:
        """Raise :class:`BundleError` (one line) if a candidate fails; with ``force`` log a warning instead."""
        self.forced = False
        if self.evaluate(max_auroc_drop, min_pearson, max_score_diff, max_pixel_auroc_drop):
            return self
        failed = [v for v in self.verdicts() if not v.passed]
        what = "; ".join(f"{v.name}: {', '.join(v.reasons)}" for v in failed)
        how = (f"re-calibrate on more, representative good images, keep the FP32/FP16 model, or accept it with "
               f"--max-auroc-drop / --min-map-pearson / --max-score-diff (now {self.max_auroc_drop:g} / "
               f"{self.min_pearson:g} / {self.max_score_diff:g}) or --force")
        if any(self._drop_within_noise(v.name) for v in failed):
            how = (f"the image-AUROC drop is within this set's noise ({self.n_defective} defective, "
                   f"{self.n_images - self.n_defective} good images; its 95 % interval reaches below the bound): "
                   f"--gate-images measures it on more; or {how}")
        basis = "" if self.auroc_measurable else \
            " (image AUROC not measurable on this set: judged on map and score agreement)"
        msg = f"accuracy gate failed for {', '.join(v.name for v in failed)}{basis}: {what}; {how}"
        if force:
            self.forced = True
            logger.warning("--force: %s", msg)
            return self
        raise BundleError(msg)

    def _drop_within_noise(self, name: str) -> bool:
        """``name`` fails on its AUROC drop, but the drop's interval reaches below the bound."""
        c = self.candidates[name]
        return (self.auroc_measurable and c.auroc_drop is not None and c.auroc_drop > self.max_auroc_drop
                and c.auroc_drop_ci95 is not None and c.auroc_drop_ci95[0] <= self.max_auroc_drop)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (NaN -> null), with the bounds and verdicts of the last evaluation."""
        cands = {}
        for name, c in self.candidates.items():
            d = asdict(c)
            cands[name] = {k: (_num(v) if isinstance(v, float) else [_num(x) for x in v] if isinstance(v, tuple)
                               else v) for k, v in d.items()}
        return {
            "reference": self.reference,
            "n_images": self.n_images,
            "n_defective": self.n_defective,
            "reference_auroc": _num(self.reference_auroc),
            "reference_pixel_auroc": _num(self.reference_pixel_auroc),
            "bounds": {"max_auroc_drop": self.max_auroc_drop, "min_map_pearson": self.min_pearson,
                       "max_score_diff": self.max_score_diff, "max_pixel_auroc_drop": self.max_pixel_auroc_drop},
            "basis": ("image AUROC, map and score agreement" if self.auroc_measurable
                      else "map and score agreement only (image AUROC not measurable)"),
            "candidates": cands,
            "verdicts": {v.name: {"passed": v.passed, "reasons": v.reasons} for v in self.verdicts()},
            "passed": self.passed,
            "forced": self.forced,
            "notes": self.all_notes(),
        }

    def table(self) -> str:
        """Plain-text table, one row per model (reference first)."""
        def f(v: float | None, spec: str) -> str:
            return "-" if v is None or not math.isfinite(v) else format(v, spec)

        head = ("model", "AUROC", "drop pts", "pixAUROC", "map r", "map max", "map p99", "score max", "verdict")
        rows = [("reference", f(None if self.reference_auroc is None else 100 * self.reference_auroc, ".2f"), "",
                 f(None if self.reference_pixel_auroc is None else 100 * self.reference_pixel_auroc, ".2f"),
                 "1", "0", "0", "0", "")]
        verdicts = {v.name: v for v in self.verdicts()}
        for name, c in self.candidates.items():
            v = verdicts[name]
            rows.append((name, f(None if c.auroc is None else 100 * c.auroc, ".2f"), f(c.auroc_drop, "+.2f"),
                         f(None if c.pixel_auroc is None else 100 * c.pixel_auroc, ".2f"), f(c.pearson, ".4f"),
                         f(c.map_max_rel_diff, ".2%"), f(c.map_p99_rel_diff, ".2%"), f(c.score_max_rel_diff, ".2%"),
                         "pass" if v.passed else "FAIL"))
        widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
        lines = ["  ".join(str(x).rjust(w) if i else str(x).ljust(w) for i, (x, w) in enumerate(zip(r, widths)))
                 for r in [head, *rows]]
        lines.append(f"{self.n_images} images ({self.n_defective} defective); bounds: AUROC drop <= "
                     f"{self.max_auroc_drop:g} points, map Pearson >= {self.min_pearson:g}, score diff <= "
                     f"{self.max_score_diff:.0%} of the map range"
                     + ("" if self.max_pixel_auroc_drop is None else
                        f", pixel AUROC drop <= {self.max_pixel_auroc_drop:g} points")
                     + (" (forced)" if self.forced else ""))
        lines += [f"note: {n}" for n in self.all_notes()]
        for v in verdicts.values():
            if not v.passed:
                lines.append(f"{v.name}: " + "; ".join(v.reasons))
        return "\n".join(lines)


def run_expert(path: Path, inputs: np.ndarray, threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(maps [N, h, w], scores [N]) of the region expert ``path`` on ORT CPU, one image at a time
    (``inputs``: preprocessed [N, 3, H, W]). The one ORT runner of the export side: the gate,
    distillation and threshold fitting all score models through it."""
    from linecam.runtime.session import make_session

    try:
        sess = make_session(path, intra_op_threads=threads or 0, log_severity_level=3)
    except Exception as e:
        raise BundleError(f"cannot load {path} on ONNX Runtime CPU: {first_line(e)}") \
            from None
    ins = sess.get_inputs()
    if len(ins) != 1:
        raise BundleError(f"{path} has {len(ins)} inputs; the gate compares single-input region experts")
    outs = sess.get_outputs()
    names = [o.name for o in outs]
    map_name = MAP_NAME if MAP_NAME in names else next((o.name for o in outs if len(o.shape) == 4), None)
    score_name = SCORE_NAME if SCORE_NAME in names else next((n for n in names if n != map_name), None)
    if map_name is None or score_name is None:
        raise BundleError(f"{path} has outputs {names}: expected an anomaly map [1,1,H,W] and a score [1]")
    n = inputs.shape[0]
    maps: np.ndarray | None = None
    scores = np.empty(n, np.float64)
    for i in range(n):
        m, s = sess.run([map_name, score_name], {ins[0].name: inputs[i : i + 1]})
        m = np.asarray(m, np.float32)
        if m.ndim < 2 or m.size != m.shape[-1] * m.shape[-2]:
            raise BundleError(f"{path}: anomaly map has shape {list(m.shape)}, expected [1, 1, h, w]")
        if maps is None:  # the map may be coarser than the input (a student's is 1/8)
            maps = np.empty((n, *m.shape[-2:]), np.float32)
        maps[i] = m.reshape(maps.shape[1:])
        scores[i] = float(np.asarray(s).reshape(-1)[0])
    assert maps is not None
    return maps, scores


def _pixel_auroc(masks: np.ndarray | None, maps: np.ndarray) -> float | None:
    if masks is None:
        return None
    if masks.shape[1:] != maps.shape[1:]:
        # Coarse maps are judged at the masks' (input) resolution, bilinear, as `linecam evaluate` does:
        # shrinking the masks instead would erase thin defects.
        import cv2

        size = (masks.shape[2], masks.shape[1])
        maps = np.stack([cv2.resize(m, size, interpolation=cv2.INTER_LINEAR) for m in maps])
    v = metrics.pixel_auroc(masks > 0.5, maps)
    return None if math.isnan(v) else v


def compare(reference_onnx: str | Path, candidates: Mapping[str, str | Path], inputs: np.ndarray,
            labels: np.ndarray, masks: np.ndarray | None = None, *, threads: int | None = None,
            max_auroc_drop: float = MAX_AUROC_DROP, min_pearson: float = MIN_PEARSON,
            max_score_diff: float = MAX_SCORE_DIFF) -> GateReport:
    """Run the reference and each candidate on ORT CPU over ``inputs`` and measure agreement.

    ``inputs``: preprocessed ``[N, 3, H, W]`` float32 (as the bundle's Preprocessor makes them);
    ``labels``: ``[N]``, 1 = defective; ``masks``: optional ``[N, H, W]`` defect masks (> 0.5 =
    defective pixel) for pixel AUROC. The report's bounds start at ``max_auroc_drop``,
    ``min_pearson`` and ``max_score_diff``; :meth:`GateReport.enforce` applies (and may change) them.
    """
    x = np.asarray(inputs)
    if x.ndim != 4 or x.shape[1] != 3 or x.shape[0] == 0:
        raise BundleError(f"gate inputs must be a non-empty [N, 3, H, W] array, got shape {list(x.shape)}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.asarray(labels).reshape(-1)
    if y.shape[0] != x.shape[0]:
        raise BundleError(f"gate has {x.shape[0]} inputs but {y.shape[0]} labels")
    y = y.astype(bool)
    if masks is not None:
        masks = np.asarray(masks)
        if masks.ndim == 4 and masks.shape[1] == 1:
            masks = masks[:, 0]
        if masks.shape != (x.shape[0], x.shape[2], x.shape[3]):
            raise BundleError(f"gate masks have shape {list(masks.shape)}, expected "
                              f"{[x.shape[0], x.shape[2], x.shape[3]]}")
    if not candidates:
        raise BundleError("the gate needs at least one candidate model to compare with the reference")

    notes: list[str] = []
    ref_maps, ref_scores = run_expert(Path(reference_onnx), x, threads)
    if not (np.isfinite(ref_maps).all() and np.isfinite(ref_scores).all()):
        raise BundleError(f"the reference model {reference_onnx} gives non-finite outputs: fix it before gating")
    ref_auroc = metrics.auroc(y, ref_scores)
    n_def = int(y.sum())
    if math.isnan(ref_auroc):
        notes.append(f"image AUROC not measurable: the set has {n_def} defective and {len(y) - n_def} good "
                     f"image(s); the gate judges on map agreement only (add both kinds to judge detection)")
        ref_auroc_v: float | None = None
    else:
        ref_auroc_v = ref_auroc
        if ref_auroc < 0.7:
            notes.append(f"the reference's own image AUROC is {100 * ref_auroc:.1f}: this set hardly tells "
                         f"detection apart, so an AUROC drop says little")
    ref_pix = _pixel_auroc(masks, ref_maps)
    if masks is not None and ref_pix is None:
        notes.append("pixel AUROC not measurable: the masks have no defective (or no good) pixel")
    map_range = float(ref_maps.max() - ref_maps.min())
    if map_range <= 0:
        notes.append("the reference anomaly map is constant over the set: map agreement cannot be measured")
    elif n_def == 0:
        notes.append(f"no defective images: map differences are relative to a good-only map range "
                     f"({map_range:.3g}), which makes them strict")
    den = map_range if map_range > 0 else max(float(np.abs(ref_maps).max()), 1e-12)

    results: dict[str, CandidateMetrics] = {}
    for name, path in candidates.items():
        maps, scores = run_expert(Path(path), x, threads)
        errors = []
        if not (np.isfinite(maps).all() and np.isfinite(scores).all()):
            errors.append("non-finite outputs")
            maps = np.nan_to_num(maps, nan=0.0, posinf=0.0, neginf=0.0)
            scores = np.nan_to_num(scores, nan=0.0, posinf=0.0, neginf=0.0)
        au = None if ref_auroc_v is None else metrics.auroc(y, scores)
        ci = None
        if au is not None:
            _, lo, hi = metrics.auroc_difference(y, ref_scores, scores)
            ci = (100.0 * lo, 100.0 * hi)
        r = metrics.pearson(ref_maps, maps)
        diff = np.abs(maps - ref_maps).reshape(-1)
        pix = _pixel_auroc(masks, maps)
        results[name] = CandidateMetrics(
            name=name, path=str(path), auroc=au,
            auroc_drop=None if au is None or ref_auroc_v is None else 100.0 * (ref_auroc_v - au),
            pearson=None if math.isnan(r) else r,
            map_max_rel_diff=float(diff.max()) / den,
            map_p99_rel_diff=float(np.percentile(diff, 99)) / den,
            score_max_rel_diff=float(np.abs(scores - ref_scores).max()) / den,
            pixel_auroc=pix,
            pixel_auroc_drop=None if pix is None or ref_pix is None else 100.0 * (ref_pix - pix),
            auroc_drop_ci95=ci,
            errors=errors,
        )
    report = GateReport(reference=str(reference_onnx), n_images=int(x.shape[0]), n_defective=n_def,
                        reference_auroc=ref_auroc_v, reference_pixel_auroc=ref_pix, candidates=results,
                        notes=notes, max_auroc_drop=float(max_auroc_drop), min_pearson=float(min_pearson),
                        max_score_diff=float(max_score_diff))
    logger.debug("accuracy gate:\n%s", report.table())
    return report
