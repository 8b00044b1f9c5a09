"""Latency percentiles over a recent window, and thread-safe counters.

:class:`LatencyStats` keeps the last ``capacity`` samples of each stage in a
preallocated ring buffer: ``add`` on the hot path is a lock, an index and a store.
Percentiles use numpy's default (linear) method, so they match ``numpy.percentile``
on the same window. :func:`percentile_summary` does the same for a whole run.
:meth:`LatencyStats.track_histogram` adds cumulative bucket counts (Prometheus histograms,
read at scrape time) under the same lock: no second lock per sample.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Iterable, Sequence

import numpy as np

DEFAULT_PERCENTILES = (50, 90, 99)


def _key(p: float) -> str:
    return f"p{p:g}"


class _Ring:
    __slots__ = ("buf", "pos", "total", "hist", "sum")

    def __init__(self, capacity: int, n_buckets: int = 0) -> None:
        self.buf = np.empty(capacity, dtype=np.float64)
        self.pos = 0  # next write index
        self.total = 0  # samples ever added
        #: With a histogram: samples per bucket (not cumulative; the last is +Inf) and their sum.
        self.hist: list[int] | None = [0] * (n_buckets + 1) if n_buckets else None
        self.sum = 0.0

    def window(self) -> np.ndarray:
        n = min(self.total, self.buf.shape[0])
        return self.buf[:n]  # order does not matter for percentiles / max


class LatencyStats:
    """Recent-window latency statistics per named stage (milliseconds)."""

    def __init__(self, capacity: int = 2048, stages: Iterable[str] = ()) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = int(capacity)
        self._lock = threading.Lock()
        self._rings: dict[str, _Ring] = {s: _Ring(self.capacity) for s in stages}
        #: Histogram bucket upper bounds (ms, ascending) once :meth:`track_histogram` was called.
        self._edges: tuple[float, ...] = ()

    def track_histogram(self, edges_ms: Sequence[float]) -> None:
        """From now on also count every sample into buckets with these upper bounds (ms,
        ascending; ``+Inf`` is implied), cumulative since this call (:meth:`reset` keeps them):
        one bisect per sample under the lock ``add`` takes anyway."""
        edges = tuple(float(e) for e in edges_ms)
        if list(edges) != sorted(set(edges)):
            raise ValueError("histogram edges must be ascending and distinct")
        with self._lock:
            self._edges = edges
            for ring in self._rings.values():
                ring.hist, ring.sum = [0] * (len(edges) + 1), 0.0

    def histogram(self, stage: str) -> tuple[list[tuple[float, int]], float] | None:
        """``([(upper bound ms, cumulative count), ..., (inf, count)], sum ms)`` of ``stage``, or
        None without :meth:`track_histogram`."""
        with self._lock:
            ring = self._rings.get(stage)
            if not self._edges or ring is None or ring.hist is None:
                return None
            counts, total_ms = list(ring.hist), ring.sum
        out, acc = [], 0
        for edge, n in zip((*self._edges, float("inf")), counts):
            acc += n
            out.append((edge, acc))
        return out, total_ms

    def _new_ring(self, stage: str) -> _Ring:  # under the lock: the one allocation of a new stage
        ring = self._rings[stage] = _Ring(self.capacity, len(self._edges))
        return ring

    def add(self, stage: str, ms: float) -> None:
        with self._lock:
            ring = self._rings.get(stage) or self._new_ring(stage)
            ring.buf[ring.pos] = ms
            ring.pos = (ring.pos + 1) % self.capacity
            ring.total += 1
            if ring.hist is not None:
                ring.hist[bisect_left(self._edges, ms)] += 1
                ring.sum += ms

    def add_all(self, stages: Sequence[str], values: Sequence[float]) -> None:
        """One sample for each of ``stages`` (same order as ``values``) under one lock: the
        daemon's per-frame call (five stages, one lock instead of five)."""
        cap = self.capacity
        with self._lock:
            rings, edges = self._rings, self._edges
            for stage, ms in zip(stages, values):
                ring = rings.get(stage) or self._new_ring(stage)
                ring.buf[ring.pos] = ms
                ring.pos = (ring.pos + 1) % cap
                ring.total += 1
                hist = ring.hist
                if hist is not None:  # Prometheus histograms (track_histogram): same lock
                    hist[bisect_left(edges, ms)] += 1
                    ring.sum += ms

    def count(self, stage: str) -> int:
        """Samples ever added to ``stage`` (not just those in the window)."""
        with self._lock:
            ring = self._rings.get(stage)
            return 0 if ring is None else ring.total

    def _window_copy(self, stage: str) -> np.ndarray | None:
        with self._lock:
            ring = self._rings.get(stage)
            if ring is None or ring.total == 0:
                return None
            return ring.window().copy()  # compute outside the lock

    def percentiles(self, stage: str, ps: Sequence[float] = DEFAULT_PERCENTILES) -> dict[str, float | None]:
        """``{"p50": ..., "p90": ..., ...}`` over the recent window; values None if no samples."""
        data = self._window_copy(stage)
        if data is None:
            return {_key(p): None for p in ps}
        values = np.percentile(data, ps)
        return {_key(p): float(v) for p, v in zip(ps, values)}

    def summary(self, ps: Sequence[float] = DEFAULT_PERCENTILES) -> dict[str, dict[str, float | int]]:
        """``{stage: {"p50", "p90", "p99", "max", "n", "total"}}`` for stages with samples.

        ``n`` is the number of samples in the window, ``total`` all ever added.
        """
        with self._lock:
            windows = {
                s: (r.window().copy(), r.total) for s, r in self._rings.items() if r.total > 0
            }
        out: dict[str, dict[str, float | int]] = {}
        for stage, (data, total) in windows.items():
            values = np.percentile(data, ps)
            entry: dict[str, float | int] = {_key(p): float(v) for p, v in zip(ps, values)}
            entry["max"] = float(data.max())
            entry["n"] = int(data.shape[0])
            entry["total"] = int(total)
            out[stage] = entry
        return out

    def reset(self) -> None:
        with self._lock:
            for ring in self._rings.values():
                ring.pos = 0
                ring.total = 0


class Counters:
    """Named integer counters (frames, verdicts, drops...), safe across threads."""

    def __init__(self, names: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, int] = {n: 0 for n in names}

    def inc(self, name: str, n: int = 1) -> int:
        with self._lock:
            v = self._values.get(name, 0) + n
            self._values[name] = v
            return v

    def inc_all(self, names: Sequence[str]) -> None:
        """Add one to each of ``names`` under one lock (a frame's verdict and its frame count)."""
        with self._lock:
            values = self._values
            for name in names:
                values[name] = values.get(name, 0) + 1

    def set(self, name: str, value: int) -> None:
        with self._lock:
            self._values[name] = int(value)

    def get(self, name: str) -> int:
        with self._lock:
            return self._values.get(name, 0)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)


def percentile_summary(
    samples: Sequence[float] | np.ndarray, ps: Sequence[float] = DEFAULT_PERCENTILES
) -> dict[str, float | int | None]:
    """Whole-run summary: ``{"n", "mean", "min", "p50", "p90", "p99", "max"}``.

    With no samples, ``n`` is 0 and every other value is None (JSON ``null``).
    """
    data = np.asarray(samples, dtype=np.float64).ravel()
    keys = ["mean", "min", *(_key(p) for p in ps), "max"]
    if data.size == 0:
        return {"n": 0, **{k: None for k in keys}}
    values = np.percentile(data, ps)
    out: dict[str, float | int | None] = {
        "n": int(data.size),
        "mean": float(data.mean()),
        "min": float(data.min()),
    }
    out.update({_key(p): float(v) for p, v in zip(ps, values)})
    out["max"] = float(data.max())
    return out
