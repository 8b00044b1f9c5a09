"""LatencyStats / Counters / percentile_summary against numpy on the same data."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from linecam.runtime.stats import Counters, LatencyStats, percentile_summary


def test_percentiles_match_numpy_and_hand_values():
    s = LatencyStats(capacity=1000)
    for v in range(1, 101):  # 1..100 ms
        s.add("infer", float(v))
    p = s.percentiles("infer")
    # numpy linear method on 1..100: p50 = 50.5, p90 = 90.1, p99 = 99.01
    assert p == pytest.approx({"p50": 50.5, "p90": 90.1, "p99": 99.01})
    rng = np.random.default_rng(0)
    data = rng.gamma(2.0, 3.0, size=777)
    for v in data:
        s.add("pre", float(v))
    expected = np.percentile(data, [50, 90, 99, 99.9])
    got = s.percentiles("pre", (50, 90, 99, 99.9))
    assert list(got) == ["p50", "p90", "p99", "p99.9"]
    assert list(got.values()) == pytest.approx(list(expected))


def test_ring_wraps_to_recent_window():
    s = LatencyStats(capacity=10)
    for v in range(25):  # only 15..24 remain
        s.add("e2e", float(v))
    summ = s.summary()["e2e"]
    assert summ["n"] == 10 and summ["total"] == 25
    assert summ["max"] == 24.0
    window = np.arange(15, 25, dtype=float)
    assert summ["p50"] == pytest.approx(np.percentile(window, 50))
    assert summ["p99"] == pytest.approx(np.percentile(window, 99))
    assert s.count("e2e") == 25


def test_summary_keys_and_empty_stages():
    s = LatencyStats(stages=["a", "b"])
    assert s.summary() == {}
    assert s.percentiles("a") == {"p50": None, "p90": None, "p99": None}
    assert s.percentiles("never") == {"p50": None, "p90": None, "p99": None}
    s.add("a", 2.0)
    summ = s.summary()
    assert set(summ) == {"a"}
    assert summ["a"] == {"p50": 2.0, "p90": 2.0, "p99": 2.0, "max": 2.0, "n": 1, "total": 1}
    s.reset()
    assert s.summary() == {}


def test_thread_safety():
    s = LatencyStats(capacity=100_000)
    c = Counters(["frames"])

    def work():
        for i in range(5000):
            s.add("x", float(i))
            c.inc("frames")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert s.summary()["x"]["n"] == 20_000
    assert c.get("frames") == 20_000


def test_counters():
    c = Counters(["ok", "ng"])
    assert c.snapshot() == {"ok": 0, "ng": 0}
    assert c.inc("ok") == 1
    c.inc("ng", 3)
    c.inc("dropped")
    c.set("queue_depth", 7)
    snap = c.snapshot()
    assert snap == {"ok": 1, "ng": 3, "dropped": 1, "queue_depth": 7}
    c.inc("ok")
    assert snap["ok"] == 1  # snapshot is a copy
    assert c.get("missing") == 0


def test_percentile_summary():
    data = [5.0, 1.0, 3.0, 2.0, 4.0]
    out = percentile_summary(data)
    assert out["n"] == 5 and out["min"] == 1.0 and out["max"] == 5.0 and out["mean"] == 3.0
    for p in (50, 90, 99):
        assert out[f"p{p}"] == pytest.approx(np.percentile(data, p))
    assert out["p90"] == pytest.approx(4.6)
    assert percentile_summary([]) == {
        "n": 0, "mean": None, "min": None, "p50": None, "p90": None, "p99": None, "max": None
    }


def test_histogram_buckets_are_cumulative_and_survive_reset():
    s = LatencyStats(capacity=4, stages=("a",))
    assert s.histogram("a") is None  # off until asked for
    s.add("a", 0.5)  # before tracking: not counted
    s.track_histogram([1.0, 10.0])
    s.add_all(("a", "b"), (1.0, 20.0))  # 1.0 lands in le=1 (upper bounds are inclusive)
    for v in (0.2, 5.0, 10.0, 11.0, 50.0):
        s.add("a", v)
    buckets, total = s.histogram("a")
    assert buckets == [(1.0, 2), (10.0, 4), (float("inf"), 6)]
    assert total == pytest.approx(1.0 + 0.2 + 5.0 + 10.0 + 11.0 + 50.0)
    assert s.histogram("b") == ([(1.0, 0), (10.0, 0), (float("inf"), 1)], 20.0)  # a stage new after tracking
    s.reset()  # the window restarts; Prometheus counts never go back
    assert s.histogram("a")[0][-1] == (float("inf"), 6) and s.count("a") == 0
    with pytest.raises(ValueError):
        s.track_histogram([2.0, 1.0])
