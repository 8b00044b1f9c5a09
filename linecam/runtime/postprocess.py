"""From a raw anomaly map to a verdict and defect regions in source-image pixels.

The model sees a (possibly cropped) region of the frame resized to its input size,
and emits an anomaly map of yet another size. :class:`Postprocessor` thresholds the
map, finds connected regions, and maps them back to the *original* frame through
:class:`linecam.preprocess.Geometry`: map pixel ``i`` covers source pixels
``[offset + i*s, offset + (i+1)*s)`` with ``s`` the source pixels per map pixel.
Integer boxes are the smallest pixel-aligned rectangles containing that span.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

from linecam.preprocess import Geometry

logger = logging.getLogger(__name__)

Verdict = Literal["OK", "NG"]

# Float slack when turning source spans into integer pixel edges, so that a span
# ending at 63.99999999 (100/3 * 3 ...) does not grow by one pixel.
_EPS = 1e-6


@dataclass(frozen=True, slots=True)
class Region:
    """One connected anomalous region, in original image pixels.

    ``bbox`` is ``(x, y, w, h)`` (top-left corner, exclusive extent), clipped to the
    frame; ``area`` the number of source pixels the region's map pixels cover
    (map pixel count x source pixels per map pixel, unclipped); ``centroid`` ``(x, y)``
    in continuous source coordinates (pixel ``k`` spans ``[k, k+1)``) and
    ``max_score`` the largest raw anomaly-map value inside the region.
    """

    bbox: tuple[int, int, int, int]
    area: int
    centroid: tuple[float, float]
    max_score: float
    #: Names of the text expert's prompts whose map reaches the pixel threshold in the region,
    #: strongest first (empty for experts without named prompts).
    labels: tuple[str, ...] = ()

    def to_dict(self, threshold: float) -> dict:
        """JSON-ready form; ``max_score`` is normalised by ``threshold`` (1.0 = at threshold).
        ``labels`` only when there are some: a message from an expert without named prompts
        stays what it was."""
        d = {
            "bbox": list(self.bbox),
            "area": self.area,
            "centroid": [round(self.centroid[0], 2), round(self.centroid[1], 2)],
            "max_score": self.max_score / threshold,
        }
        if self.labels:
            d["labels"] = list(self.labels)
        return d


def _as_2d(anomaly_map: np.ndarray) -> np.ndarray:
    if anomaly_map.ndim == 2:
        return anomaly_map
    if anomaly_map.ndim > 2 and all(d == 1 for d in anomaly_map.shape[:-2]):
        return anomaly_map.reshape(anomaly_map.shape[-2:])
    raise ValueError(f"expected an anomaly map of shape (h, w) or (1, 1, h, w), got {anomaly_map.shape}")


class Postprocessor:
    """Thresholds and region extraction for one model.

    Keeps per-map-shape scratch buffers (mask, labels), so one instance per worker
    thread; calls are then allocation-light (OpenCV still allocates the small
    per-component stats arrays).
    """

    def __init__(
        self,
        pixel_threshold: float,
        image_threshold: float,
        min_area_px: int = 0,
        max_regions: int = 32,
    ) -> None:
        if not (math.isfinite(pixel_threshold) and math.isfinite(image_threshold)):
            raise ValueError("thresholds must be finite numbers")
        if pixel_threshold <= 0 or image_threshold <= 0:
            # Scores are normalised by the thresholds in the published payload.
            raise ValueError("thresholds must be positive")
        if min_area_px < 0 or max_regions < 0:
            raise ValueError("min_area_px and max_regions must be >= 0")
        self.pixel_threshold = float(pixel_threshold)
        self.image_threshold = float(image_threshold)
        self.min_area_px = int(min_area_px)
        self.max_regions = int(max_regions)
        self._buffers: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    # -- verdict -----------------------------------------------------------------

    @staticmethod
    def is_valid(array: np.ndarray | float) -> bool:
        """False when ``array`` holds any NaN or Inf: no verdict may be derived from it.

        A float64 sum propagates NaN/Inf without allocating a boolean array the
        size of the map, and cannot overflow for float32 inputs.
        """
        a = np.asarray(array)
        if a.size == 0:
            return False
        return bool(np.isfinite(a.sum(dtype=np.float64)))

    def verdict(self, score_raw: float) -> Verdict:
        """``"NG"`` iff ``score_raw >= image_threshold``; a NaN/Inf score is an error, not OK."""
        score = float(score_raw)
        if not math.isfinite(score):
            raise ValueError(f"image score is {score}: check is_valid() before asking for a verdict")
        return "NG" if score >= self.image_threshold else "OK"

    # -- regions -----------------------------------------------------------------

    def _scratch(self, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        buf = self._buffers.get(shape)
        if buf is None:
            buf = (np.empty(shape, dtype=np.uint8), np.empty(shape, dtype=np.int32))
            self._buffers[shape] = buf
        return buf

    def regions(
        self,
        anomaly_map: np.ndarray,
        geometry: Geometry,
        image_size: tuple[int, int] | None = None,
        label_maps: np.ndarray | None = None,
        names: Sequence[str] = (),
    ) -> list[Region]:
        """Connected regions of ``anomaly_map >= pixel_threshold`` in source pixels.

        Boxes are clipped to the model's view (``geometry``) and, when given,
        to ``image_size`` = ``(height, width)`` of the source frame. Regions whose
        ``area`` is below ``min_area_px`` are dropped; the ``max_regions``
        highest-scoring remain, sorted by ``max_score`` descending. A map with
        NaN never yields a region there (NaN compares false); check
        :meth:`is_valid` first. ``label_maps`` ``(K, h, w)`` (same grid as the map) with
        ``names``: each region's ``labels`` are the names whose map reaches the pixel
        threshold somewhere inside it (IAD-GPT's mask-to-label step).
        """
        amap = _as_2d(anomaly_map)
        if amap.dtype.kind != "f":
            amap = amap.astype(np.float32)
        h, w = amap.shape
        mask, labels = self._scratch((h, w))
        np.greater_equal(amap, self.pixel_threshold, out=mask.view(np.bool_))
        n, labels, stats, centroids = cv2.connectedComponentsWithStats(
            mask, labels=labels, connectivity=8, ltype=cv2.CV_32S
        )
        if n <= 1 or self.max_regions == 0:
            return []

        sx, sy = geometry.scale_for(h, w)
        ox, oy = geometry.offset_x, geometry.offset_y
        # Clip bounds: the model's view, intersected with the frame when known.
        cx0 = max(0, math.floor(ox + _EPS))
        cy0 = max(0, math.floor(oy + _EPS))
        cx1 = math.ceil(ox + geometry.width - _EPS)
        cy1 = math.ceil(oy + geometry.height - _EPS)
        if image_size is not None:
            cy1 = min(cy1, int(image_size[0]))
            cx1 = min(cx1, int(image_size[1]))

        # Per-label maximum of the map over the foreground only (label 0 is background).
        fg = mask.view(np.bool_)
        # Same dtype as the map: a casting ufunc.at takes numpy's slow path (~4x).
        vals = amap[fg]
        maxes = np.full(n, -np.inf, dtype=vals.dtype)
        np.maximum.at(maxes, labels[fg], vals)

        # Select in numpy so the Python loop below is bounded by max_regions even on a
        # noisy map with thousands of specks.
        areas = np.rint(stats[:, cv2.CC_STAT_AREA] * (sx * sy)).astype(np.int64)
        keep = np.flatnonzero(areas[1:] >= self.min_area_px) + 1
        if keep.size > self.max_regions:
            top_k = np.argpartition(-maxes[keep], self.max_regions - 1)[: self.max_regions]
            keep = keep[top_k]

        out: list[Region] = []
        for k in keep.tolist():
            left, top, bw, bh = (int(v) for v in stats[k, :4])
            area = int(areas[k])
            x0 = max(cx0, math.floor(ox + left * sx + _EPS))
            y0 = max(cy0, math.floor(oy + top * sy + _EPS))
            x1 = min(cx1, math.ceil(ox + (left + bw) * sx - _EPS))
            y1 = min(cy1, math.ceil(oy + (top + bh) * sy - _EPS))
            if x1 <= x0 or y1 <= y0:
                continue  # entirely outside the frame (view larger than the image)
            mx, my = centroids[k]
            named: tuple[str, ...] = ()
            if label_maps is not None and names:
                peak = label_maps[:, labels == k].max(axis=1)  # per prompt, over this region's map pixels
                named = tuple(names[i] for i in np.argsort(-peak, kind="stable") if peak[i] >= self.pixel_threshold)
            out.append(
                Region(
                    bbox=(x0, y0, x1 - x0, y1 - y0),
                    area=area,
                    # cv2 centroids are means of pixel indices; index i's centre is i + 0.5.
                    centroid=(float(ox + (mx + 0.5) * sx), float(oy + (my + 0.5) * sy)),
                    max_score=float(maxes[k]),
                    labels=named,
                )
            )
        out.sort(key=lambda r: r.max_score, reverse=True)
        return out
