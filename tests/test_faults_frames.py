"""Faults of the frames and the host (real mosquitto): a camera that comes back from a
reconnect with another frame size, and a step of the host's wall clock."""

from __future__ import annotations

import time
from datetime import datetime, timedelta

import pytest

from bundles import make_tiny_bundle
from helpers import collect, line_config
from linecam.camera.base import FrameSource
from linecam.camera.frame import Frame
from linecam.camera.synthetic import SyntheticLineSource
from linecam.config import parse_config
from linecam.errors import CameraError
from linecam.runtime.service import run_service


@pytest.fixture
def tiny_bundle(tmp_path):
    return make_tiny_bundle(tmp_path / "bundle", size=64, image_threshold=0.3, pixel_threshold=0.5)


class ResizedAfterReconnect(FrameSource):
    """160x160 frames; after ``fault_after`` a GenTL error; after the reopen 200x160 frames (a
    camera that lost its ROI setting in a power cycle). Frame ids continue."""

    def __init__(self, frames: int, fault_after: int) -> None:
        self.before = SyntheticLineSource(width=160, height=160, fps=50, defect_rate=0.3, seed=2, frames=frames)
        self.after = SyntheticLineSource(width=200, height=160, fps=50, defect_rate=0.3, seed=3, frames=frames)
        self.name, self.frames, self.fault_after = "resized", frames, fault_after
        self.opens, self.delivered, self.is_open, self.faulted = 0, 0, False, False

    def open(self) -> None:
        self.opens += 1
        if self.opens == 1:
            self.before.open()
        else:
            self.after.open()
        self.is_open = True

    def close(self) -> None:
        self.is_open = False

    def read(self, timeout: float) -> Frame | None:
        if not self.is_open:
            raise CameraError("not open")
        if self.delivered == self.fault_after and not self.faulted:
            self.faulted = True
            raise CameraError("GenTL error: link lost")
        src = self.before if self.opens == 1 else self.after
        f = src.read(timeout)
        if f is None:
            return None
        f.frame_id = self.delivered
        self.delivered += 1
        if self.delivered > self.frames:
            from linecam.camera.base import SourceExhausted
            raise SourceExhausted()
        return f


@pytest.mark.timeout(60)
def test_frame_size_change_after_reconnect_skips_with_reason_and_loses_nothing(broker, tiny_bundle, tmp_path,
                                                                             monkeypatch, caplog):
    import linecam.runtime.service as service

    n, k = 60, 20
    cam = ResizedAfterReconnect(n, k)
    monkeypatch.setattr(service, "open_source", lambda _cfg: cam)
    cfg = parse_config(line_config(tiny_bundle, broker.port, tmp_path, camera={"frames": n},
                                   runtime={"reconnect_delay_s": [0.1, 0.2]}), tmp_path / "x.yaml")
    events, summary = collect(broker.port, lambda: run_service(cfg), types=("verdict", "status"))
    verdicts = [e.payload for e in events if e.type == "verdict"]
    assert sorted(v["frame_id"] for v in verdicts) == list(range(n)), "one verdict per frame"
    after = [v for v in verdicts if v["frame_id"] >= k]
    assert after and all((v["verdict"], v["reason"]) == ("SKIPPED", "wrong_frame_size") for v in after)
    assert all(v["verdict"] != "SKIPPED" for v in verdicts if v["frame_id"] < k)
    assert summary.counters["skipped_wrong_frame_size"] == n - k
    lines = [r.getMessage() for r in caplog.records if "wrong_frame_size" in r.getMessage()
             or "200x160, but this line expects 160x160" in r.getMessage()]
    assert lines and "\n" not in lines[0], lines


@pytest.mark.timeout(60)
def test_host_clock_step_changes_sent_at_only(broker, tiny_bundle, tmp_path, monkeypatch):
    """Timing runs on the monotonic clock: a wall-clock step (NTP, an operator) moves ``sent_at``
    and nothing else: no verdict lost, no latency jump, no reconnect."""
    import linecam.messages.base as base

    step = {"offset": timedelta(0)}
    real = datetime

    class SteppedClock(datetime):
        @classmethod
        def now(cls, tz=None):
            return real.now(tz) + step["offset"]

    monkeypatch.setattr(base, "datetime", SteppedClock)
    n = 80
    cfg = parse_config(line_config(tiny_bundle, broker.port, tmp_path, camera={"frames": n, "fps": 40.0,
                                                                              "width": 160, "height": 160}),
                       tmp_path / "x.yaml")

    def run():
        import threading

        def stepper():
            time.sleep(1.0)
            step["offset"] = timedelta(hours=-1)  # the clock jumps an hour back
        threading.Thread(target=stepper, daemon=True).start()
        return run_service(cfg)

    events, summary = collect(broker.port, run, types=("verdict",))
    verdicts = sorted((e.payload for e in events), key=lambda v: v["frame_id"])
    assert [v["frame_id"] for v in verdicts] == list(range(n))
    sent = [real.fromisoformat(v["sent_at"].replace("Z", "+00:00")) for v in verdicts]
    assert any(b < a - timedelta(minutes=50) for a, b in zip(sent, sent[1:])), "the step happened mid-run"
    assert max(v["latency_ms"]["total"] for v in verdicts) < 2000  # no hour-long or negative latency
    assert min(v["latency_ms"]["total"] for v in verdicts) >= 0
    assert summary.counters.get("frames") == n
