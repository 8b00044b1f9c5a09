"""Line-scan coverage: web area that was *not* inspected, reported as it happens.

A tile that gets a ``SKIPPED`` verdict (the inference queue was full: the model is slower
than the line rate, or a burst) leaves a patch of web nobody looked at. That must never be
silent: :class:`Coverage` counts it (``web_tiles_skipped``), logs a warning naming the area
in mm (rate-limited, with the running total and the share of the web), and tells the daemon
(``on_degraded(detail)``: a ``degraded`` status whose detail names the area). Once tiles are
inspected again for ``recover_s`` the daemon is told (``on_recovered(detail)``).

The inference queue itself is sized for line-scan by :func:`queue_size_for`: one camera frame
completes a whole batch of tiles at once (columns x rows per frame), so an area camera's
``runtime.queue_size`` (8) would drop most of every frame's tiles even with an idle model.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)


def tiles_per_frame(columns: int, lines_per_frame: int, stride: int) -> int:
    """Tiles one camera frame completes at most: a row of ``columns`` every ``stride`` lines."""
    return max(1, columns) * max(1, math.ceil(lines_per_frame / max(stride, 1)))


def queue_size_for(configured: int, per_frame: int) -> int:
    """The inference queue for line-scan: at least two frames' worth of tiles (one being
    worked on, one arriving), never less than ``runtime.queue_size``."""
    return max(int(configured), 2 * int(per_frame))


class Coverage:
    """Counts and reports uninspected tiles (see the module docstring). Thread-safe."""

    def __init__(self, mm_x: float, mm_of_line: Callable[[float], float],
                 on_degraded: Callable[[str], None] | None = None,
                 on_recovered: Callable[[str], None] | None = None,
                 every_s: float = 10.0, recover_s: float = 10.0) -> None:
        self._mm_x = float(mm_x)
        self._mm = mm_of_line
        self._on_degraded = on_degraded
        self._on_recovered = on_recovered
        self.every_s = every_s
        self.recover_s = recover_s
        self._lock = threading.Lock()
        self.tiles = 0  # tiles done (inspected or not)
        self.skipped = 0
        self._since_report = 0
        self._area: list[float] | None = None  # [x0, x1, y0, y1] mm of the skips since the last report
        self._last_report = -math.inf
        self._last_skip = -math.inf
        self._degraded = False

    def done(self, x0: int, x1: int, line0: int, line1: int, inspected: bool) -> None:
        """One tile's verdict went out: web px ``[x0, x1) x [line0, line1)``."""
        now = time.monotonic()
        report = recovered = None
        with self._lock:
            self.tiles += 1
            if inspected:
                if self._degraded and now - self._last_skip >= self.recover_s:
                    self._degraded = False
                    recovered = (f"line-scan: every tile inspected again for {self.recover_s:g} s "
                                 f"({self.skipped} tile(s) not inspected since the start)")
            else:
                self.skipped += 1
                self._since_report += 1
                self._last_skip = now
                a = [x0 * self._mm_x, x1 * self._mm_x, self._mm(line0), self._mm(line1)]
                if self._area is None:
                    self._area = a
                else:
                    b = self._area
                    self._area = [min(b[0], a[0]), max(b[1], a[1]), min(b[2], a[2]), max(b[3], a[3])]
                if now - self._last_report >= self.every_s:
                    x_0, x_1, y_0, y_1 = self._area
                    report = (f"line-scan: {self._since_report} tile(s) NOT INSPECTED (inference queue full: "
                              f"the model is slower than the line rate), web area cross {x_0:.1f}-{x_1:.1f} mm, "
                              f"down {y_0:.1f}-{y_1:.1f} mm; {self.skipped} of {self.tiles} tiles "
                              f"({100.0 * self.skipped / self.tiles:.1f} %) so far; lower the line rate, add "
                              "workers or use a faster model (see the README's line-scan section)")
                    self._since_report, self._area, self._last_report = 0, None, now
                    self._degraded = True
        if report is not None:
            logger.warning("%s", report)
            if self._on_degraded is not None:
                self._on_degraded(report)
        if recovered is not None:
            logger.info("%s", recovered)
            if self._on_recovered is not None:
                self._on_recovered(recovered)
