"""The downsampled map of the web: defect boxes and gaps, written as a PNG."""

from __future__ import annotations

import bisect
import logging
import math
import os
import threading
from pathlib import Path

import cv2
import numpy as np

logger = logging.getLogger(__name__)


class WebMap:
    """A downsampled grey image of the web, with defect boxes, gaps and skipped tiles drawn
    on it by :meth:`render`. Web pixels are averaged in ``sx`` x ``sy`` blocks, ``sy`` chosen
    so that a map pixel covers about as many mm down-web as across."""

    GAP_ROWS = 6
    #: The band under the map: mm scale (across and down) and the colour legend.
    LEGEND_ROWS = 30
    #: Boxes kept for drawing at most (a run with more draws the first ones only).
    MAX_BOXES = 50_000

    def __init__(self, web_width: int, mm_per_px_cross: float, mm_per_line: float, max_width: int = 1024,
                 max_height: int = 16384) -> None:
        self.mm_x, self.mm_line = float(mm_per_px_cross), float(mm_per_line)
        self.sx = max(1, math.ceil(web_width / max_width))
        self.sy = max(1, round(self.sx * mm_per_px_cross / mm_per_line))
        self.width = math.ceil(web_width / self.sx)
        self.max_height = max_height
        self._lock = threading.Lock()
        self._chunks: list[np.ndarray] = []
        self._rows = 0
        self._carry: np.ndarray | None = None
        self._seg_lines: list[int] = []  # first web line of each segment
        self._seg_rows: list[float] = []  # its map row
        self._gaps: list[tuple[int, int]] = []  # map rows [a, b)
        self._boxes: list[tuple[int, int, int, int, str]] = []  # web px x0, y0, x1, y1, label
        self._skipped: list[tuple[int, int, int, int]] = []

    @staticmethod
    def _grey(image: np.ndarray, bit_depth: int) -> np.ndarray:
        img = image
        if img.dtype != np.uint8:
            img = (img >> max(bit_depth - 8, 0)).astype(np.uint8)
        if img.ndim == 3 and img.shape[2] == 3:
            return cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
        return img.reshape(img.shape[0], img.shape[1])

    def add(self, image: np.ndarray, bit_depth: int, line0: int, new_segment: bool) -> None:
        grey = self._grey(image, bit_depth)
        with self._lock:
            if new_segment:
                self._carry = None  # a partial block never spans a gap
                if self._seg_lines:
                    self._append(np.zeros((self.GAP_ROWS, self.width), np.uint8))
                    self._gaps.append((self._rows - self.GAP_ROWS, self._rows))
                self._seg_lines.append(int(line0))
                self._seg_rows.append(float(self._rows))
            data = grey if self._carry is None else np.concatenate([self._carry, grey])
            n = data.shape[0] // self.sy
            if n:
                block = data[: n * self.sy]
                self._append(cv2.resize(block, (self.width, n), interpolation=cv2.INTER_AREA))
            self._carry = data[n * self.sy :].copy() if data.shape[0] % self.sy else None
            if self._rows > self.max_height:
                self._halve()

    def _append(self, rows: np.ndarray) -> None:
        self._chunks.append(rows)
        self._rows += rows.shape[0]

    def _halve(self) -> None:
        img = np.concatenate(self._chunks)
        img = cv2.resize(img, (self.width, max(1, img.shape[0] // 2)), interpolation=cv2.INTER_AREA)
        self._chunks, self._rows = [img], img.shape[0]
        self.sy *= 2
        self._seg_rows = [r / 2 for r in self._seg_rows]
        self._gaps = [(a // 2, max(a // 2 + 1, b // 2)) for a, b in self._gaps]
        self._carry = None

    def _row(self, line: float) -> float:
        i = max(0, bisect.bisect_right(self._seg_lines, line) - 1)
        if not self._seg_lines:
            return 0.0
        return self._seg_rows[i] + (line - self._seg_lines[i]) / self.sy

    def box(self, x0: int, y0: int, x1: int, y1: int, label: str = "") -> None:
        with self._lock:
            if len(self._boxes) < self.MAX_BOXES:
                self._boxes.append((x0, y0, x1, y1, label))

    def skipped(self, x0: int, y0: int, x1: int, y1: int) -> None:
        with self._lock:
            if len(self._skipped) < self.MAX_BOXES:
                self._skipped.append((x0, y0, x1, y1))

    def render(self) -> np.ndarray:
        """The map as a BGR uint8 image: defects red, skipped (uninspected) tiles blue, gaps yellow;
        under it a legend band (``LEGEND_ROWS``) with the mm scale."""
        with self._lock:
            chunks = list(self._chunks)
            boxes, skipped, gaps = list(self._boxes), list(self._skipped), list(self._gaps)
            rows = [(self._row(y0), self._row(y1), x0, x1, lab) for x0, y0, x1, y1, lab in boxes]
            srows = [(self._row(y0), self._row(y1), x0, x1) for x0, y0, x1, y1 in skipped]
        grey = np.concatenate(chunks) if chunks else np.zeros((1, self.width), np.uint8)
        img = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
        for a, b in gaps:
            img[a:b] = (0, 220, 255)
        for r0, r1, x0, x1 in srows:
            cv2.rectangle(img, (int(x0 / self.sx), int(r0)), (max(int(x0 / self.sx), math.ceil(x1 / self.sx) - 1),
                                                               max(int(r0), math.ceil(r1) - 1)), (255, 80, 0), 1)
        for r0, r1, x0, x1, lab in rows:
            p0 = (int(x0 / self.sx) - 2, int(r0) - 2)
            p1 = (math.ceil(x1 / self.sx) + 1, math.ceil(r1) + 1)
            cv2.rectangle(img, p0, p1, (0, 0, 255), 1)
            if lab:
                cv2.putText(img, lab, (p1[0] + 2, max(p0[1] + 8, 8)), cv2.FONT_HERSHEY_PLAIN, 0.7, (0, 0, 255), 1)
        return np.concatenate([img, self._legend()])

    def _legend(self) -> np.ndarray:
        """White band: a cross-web scale bar in mm, the down-web scale, what the colours mean."""
        band = np.full((self.LEGEND_ROWS, self.width, 3), 255, np.uint8)
        mm_per_map_px = self.mm_x * self.sx
        steps = [s * 10.0 ** e for e in range(-1, 5) for s in (1, 2, 5)]
        bar_mm = max([s for s in steps if s / mm_per_map_px <= 0.3 * self.width] or [steps[0]])
        bar = max(1, int(round(bar_mm / mm_per_map_px)))
        black, font = (0, 0, 0), cv2.FONT_HERSHEY_PLAIN
        cv2.line(band, (4, 10), (4 + bar, 10), black, 2)
        for x in (4, 4 + bar):
            cv2.line(band, (x, 6), (x, 14), black, 1)
        cv2.putText(band, f"{bar_mm:g} mm across; down: 1 px = {self.sy * self.mm_line:.3g} mm", (bar + 10, 14),
                    font, 0.8, black, 1, cv2.LINE_8)
        x = 4
        for text, colour in (("defect", (0, 0, 255)), ("not inspected", (255, 80, 0)), ("web gap", (0, 220, 255))):
            cv2.rectangle(band, (x, 19), (x + 8, 27), colour, -1)
            cv2.putText(band, text, (x + 11, 27), font, 0.8, black, 1, cv2.LINE_8)
            x += 11 + 8 * len(text) + 12
        return band

    def write(self, path: Path) -> Path:
        """Encode the map as PNG and replace ``path`` atomically."""
        ok, data = cv2.imencode(".png", self.render())
        if not ok:
            raise OSError(f"PNG encoding of the web map failed ({path})")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{path.name}")
        tmp.write_bytes(data.tobytes())
        os.replace(tmp, path)
        return path
