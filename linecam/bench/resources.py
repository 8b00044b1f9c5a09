"""CPU and memory while a mode runs: this process, its children (mosquitto, the
subscriber) and everything else on the machine.

Sampled from a background thread with psutil every ``interval`` seconds. CPU is in
percent of one core (200 = two cores busy), like ``top``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import psutil


@dataclass(slots=True)
class _Sample:
    t: float
    own_cpu_s: float  # this process, all threads
    children_cpu_s: float
    busy_cpu_s: float  # whole machine, all cores (user + system + ...)
    rss_mb: float
    children_rss_mb: float


def _cpu_s(times: Any) -> float:
    return float(times.user + times.system)


class ResourceMonitor:
    """``with ResourceMonitor() as mon: ...`` then ``mon.summary()``."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self._proc = psutil.Process()
        self._samples: list[_Sample] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._children: dict[int, psutil.Process] = {}
        self._n = 0

    def _sample(self) -> _Sample:
        # Keep the same Process objects across samples: psutil caches their identity. Listing
        # children walks all of /proc, so it is done every few samples only (the bench must
        # not cost the daemon it measures).
        if self._n % 4 == 0:
            for child in self._proc.children(recursive=True):
                self._children.setdefault(child.pid, child)
        self._n += 1
        ch_cpu = ch_rss = 0.0
        for pid, child in list(self._children.items()):
            try:
                with child.oneshot():
                    ch_cpu += _cpu_s(child.cpu_times())
                    ch_rss += child.memory_info().rss
            except psutil.Error:  # exited: its last CPU time is lost, at most one interval
                del self._children[pid]
        sysc = psutil.cpu_times()
        busy = float(sum(sysc)) - float(sysc.idle) - float(getattr(sysc, "iowait", 0.0))
        with self._proc.oneshot():
            own = _cpu_s(self._proc.cpu_times())
            rss = self._proc.memory_info().rss
        return _Sample(time.monotonic(), own, ch_cpu, busy, rss / 1e6, ch_rss / 1e6)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._samples.append(self._sample())

    def __enter__(self) -> ResourceMonitor:
        self._samples = [self._sample()]
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="bench-resources", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._samples.append(self._sample())

    def summary(self) -> dict[str, float | int | None]:
        """Mean CPU % (this process, children, other processes), peak RSS, sample count."""
        s = self._samples
        if len(s) < 2:
            return {"seconds": 0.0, "samples": len(s), "cpu_percent_process": None, "cpu_percent_children": None,
                    "cpu_percent_other": None, "rss_mb_max": None, "children_rss_mb_max": None}
        dt = max(s[-1].t - s[0].t, 1e-9)
        own = (s[-1].own_cpu_s - s[0].own_cpu_s) / dt * 100
        # Children come and go: sum positive steps instead of last - first.
        ch = sum(max(b.children_cpu_s - a.children_cpu_s, 0.0) for a, b in zip(s, s[1:])) / dt * 100
        busy = (s[-1].busy_cpu_s - s[0].busy_cpu_s) / dt * 100
        return {
            "seconds": round(dt, 3),
            "samples": len(s),
            "cpu_percent_process": round(own, 1),
            "cpu_percent_children": round(ch, 1),
            # What the rest of the machine used meanwhile (other users of shared cores).
            "cpu_percent_other": round(max(busy - own - ch, 0.0), 1),
            "rss_mb_max": round(max(x.rss_mb for x in s), 1),
            "children_rss_mb_max": round(max(x.children_rss_mb for x in s), 1),
        }
