"""Broker faults end to end (real mosquitto on loopback): no verdict lost.

1. The broker is stopped for a while during a run, then restarted: the subscriber ends
   with every frame's verdict.
2. The same, with the daemon SIGKILLed during the outage and restarted (``linecam run``
   as a subprocess): every verdict the first run had made reaches the subscriber, with its
   original event id, from the spool.

The subscriber keeps a persistent MQTT session on a broker that saves sessions across its
restart, so what is published while it reconnects is queued for it, not missed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from bundles import make_tiny_bundle
from linecam.runtime.sdnotify import NotifyListener
from linecam import schemas
from linecam.config import parse_config
from linecam.runtime.service import run_service
from helpers import DurableSubscriber, line_cfg, persistent_broker, spool_rows

REPO = Path(__file__).resolve().parents[1]


def by_frame(verdicts: list[dict]) -> dict[int, set[str]]:
    """frame_id -> the distinct event ids seen for it (a re-sent duplicate has the same id)."""
    out: dict[int, set[str]] = {}
    for v in verdicts:
        out.setdefault(v["frame_id"], set()).add(v["event_id"])
    return out


def sent_at(msg: dict) -> datetime:
    return datetime.fromisoformat(msg["sent_at"].replace("Z", "+00:00"))


@pytest.fixture
def tiny_bundle(tmp_path):
    return make_tiny_bundle(tmp_path / "bundle", size=64, image_threshold=0.3, pixel_threshold=0.5)


@pytest.mark.timeout(120)
def test_broker_outage_mid_run_every_frame_gets_its_verdict(tmp_path, tiny_bundle):
    n, fps = 150, 50.0
    broker = persistent_broker(tmp_path)
    broker.start()
    try:
        sub = DurableSubscriber(broker.port, "linecam/t/c0/#")
        cfg = parse_config(line_cfg(tiny_bundle, broker.port, tmp_path, n, fps), tmp_path / "x.yaml")
        seen: dict[str, int] = {"max_spooled": 0, "frames_at_stop": -1, "frames_at_start": -1}

        def outage(daemon):
            def run():
                while daemon.counters.get("frames") < 30:
                    time.sleep(0.01)
                broker.stop()
                seen["frames_at_stop"] = daemon.counters.get("frames")
                t_end = time.monotonic() + 1.5
                while time.monotonic() < t_end:
                    seen["max_spooled"] = max(seen["max_spooled"], daemon.publisher.spool_stats().rows)
                    time.sleep(0.02)
                broker.start()
                seen["frames_at_start"] = daemon.counters.get("frames")
            threading.Thread(target=run, daemon=True).start()

        summary = run_service(cfg, on_daemon=outage)
        assert summary.counters["frames"] == n
        # the outage really was in the middle of the run, and the spool held the verdicts
        assert 30 <= seen["frames_at_stop"] < seen["frames_at_start"] < n, seen
        assert seen["max_spooled"] >= 40, seen
        assert sub.wait_for(lambda: len(by_frame(sub.payloads("verdict"))) >= n, 30)
        verdicts = sub.payloads("verdict")
        for v in verdicts:
            schemas.validate(v)
        frames = by_frame(verdicts)
        assert sorted(frames) == list(range(n))
        assert all(len(ids) == 1 for ids in frames.values()), "one verdict (event id) per frame"
        # defects for every NG verdict too (they are spooled the same way)
        ng = {next(iter(frames[v["frame_id"]])) for v in verdicts if v["verdict"] == "NG"}
        assert sub.wait_for(lambda: {d["verdict_event_id"] for d in sub.payloads("defect")} >= ng, 10)
        assert spool_rows(tmp_path / "spool.db") == []
        status = sub.payloads("status")
        assert any(s["state"] == "running" for s in status) and status[-1]["online"] is False
        sub.close()
    finally:
        broker.close()


def start_daemon(cfg_path: Path, notify: Path, log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", NOTIFY_SOCKET=str(notify),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "linecam", "run", "--config", str(cfg_path)],
                            stdout=subprocess.DEVNULL, stderr=open(log, "ab"), env=env)


def wait_until(pred, timeout: float, proc: subprocess.Popen | None = None, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"daemon exited early ({proc.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.timeout(180)
def test_daemon_sigkilled_during_outage_restarts_and_delivers_every_verdict(tmp_path, tiny_bundle):
    n, fps = 300, 50.0
    broker = persistent_broker(tmp_path)
    broker.start()
    cfg_path = tmp_path / "line.yaml"
    cfg_path.write_text(yaml.safe_dump(line_cfg(tiny_bundle, broker.port, tmp_path, n, fps)))
    log = tmp_path / "daemon.log"
    notify = NotifyListener(tmp_path / "notify.sock")
    procs: list[subprocess.Popen] = []
    try:
        sub = DurableSubscriber(broker.port, "linecam/t/c0/verdict")
        procs.append(first := start_daemon(cfg_path, notify.path, log))
        wait_until(lambda: len(sub.payloads("verdict")) >= 30, 60, first, "the first verdicts")
        broker.stop()
        at_stop = notify.frames()
        # let the daemon inspect (and spool) a good part of the line while the broker is away
        wait_until(lambda: notify.frames() >= at_stop + 80, 30, first, "frames during the outage")
        time.sleep(0.3)  # the verdicts of the frames reported done are committed by now
        done_before_kill = notify.frames()
        first.kill()  # SIGKILL: no clean shutdown, paho's memory is gone
        first.wait(10)
        t_kill = datetime.now(timezone.utc)
        assert first.returncode == -9
        on_disk = [r for r in spool_rows(tmp_path / "spool.db") if r["type"] == "verdict"]
        assert len(on_disk) >= 80, len(on_disk)  # the outage's verdicts are in the spool

        procs.append(second := start_daemon(cfg_path, notify.path, log))  # broker still down
        time.sleep(1.0)
        broker.start()
        second.wait(120)
        assert second.returncode == 0, log.read_text()[-3000:]
        t_restart_done = datetime.now(timezone.utc)

        def run1():
            return [v for v in sub.payloads("verdict") if sent_at(v) < t_kill]

        wait_until(lambda: len(by_frame(run1())) >= done_before_kill, 30, what="the first run's verdicts")
        first_run = by_frame(run1())
        # every frame the first run finished has its verdict, with one event id, from 0 up without gaps
        assert set(range(done_before_kill)) <= set(first_run), sorted(set(range(done_before_kill)) - set(first_run))
        assert sorted(first_run) == list(range(max(first_run) + 1))
        assert all(len(ids) == 1 for ids in first_run.values())
        # and what sat in the dead daemon's spool went out byte for byte (same event ids)
        received_ids = {v["event_id"] for v in sub.payloads("verdict")}
        assert {r["event_id"] for r in on_disk} <= received_ids
        # the restarted daemon's own run is complete too
        wait_until(lambda: len(by_frame([v for v in sub.payloads("verdict") if sent_at(v) > t_kill])) >= n, 30,
                   what="the second run's verdicts")
        second_run = by_frame([v for v in sub.payloads("verdict") if t_kill < sent_at(v) < t_restart_done])
        assert sorted(second_run) == list(range(n)) and all(len(ids) == 1 for ids in second_run.values())
        assert spool_rows(tmp_path / "spool.db") == []
        text = log.read_text()
        assert "from a previous run: sending them first" in text and "Traceback" not in text
        sub.close()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        notify.close()
        broker.close()


@pytest.mark.timeout(60)
def test_full_spool_drops_the_oldest_and_the_status_says_so(tmp_path, tiny_bundle):
    n, cap = 40, 10
    broker = persistent_broker(tmp_path)
    broker.start()
    sub = DurableSubscriber(broker.port, "linecam/t/c0/#")  # its session outlives the outage
    broker.stop()
    try:
        cfg_dict = line_cfg(tiny_bundle, broker.port, tmp_path, n, fps=200.0)
        cfg_dict["spool"]["max_rows"] = cap
        cfg_dict["output"]["snapshots"] = False
        cfg = parse_config(cfg_dict, tmp_path / "x.yaml")

        def broker_back_at_the_end(daemon):
            def run():
                deadline = time.monotonic() + 15.0
                # Every frame judged (frames counts acquisition; "ng" is counted after inference) ...
                while (sum(daemon.counters.get(k) for k in ("ok", "ng", "skipped", "invalid_output")) < n
                       and time.monotonic() < deadline):
                    time.sleep(0.02)
                # ... and, as defect events trail their verdicts (snapshot thread), every message has met
                # the full spool (bounded: if fewer are ever dropped, the assertion below says so).
                while (daemon.counters.get("spool_dropped") < n + daemon.counters.get("ng") - cap
                       and time.monotonic() < deadline):
                    time.sleep(0.02)
                time.sleep(0.3)
                broker.start()
            threading.Thread(target=run, daemon=True).start()

        summary = run_service(cfg, on_daemon=broker_back_at_the_end)
        assert summary.counters["frames"] == n
        dropped = summary.counters["spool_dropped"]
        ng = summary.counters.get("ng", 0)
        assert dropped == n + ng - cap  # verdicts + defects beyond the cap: the oldest went
        assert sub.wait_for(lambda: any(s["online"] is False for s in sub.payloads("status")), 20)
        time.sleep(0.5)
        kept = sub.payloads("verdict") + sub.payloads("defect")
        assert len(kept) == cap
        # the newest were kept: the last verdict of the line is among them, the first is not
        frames = {m["frame_id"] for m in kept}
        assert n - 1 in frames and 0 not in frames
        full = [s for s in sub.payloads("status") if s["detail"] and "spool full" in s["detail"]]
        assert full and full[0]["state"] == "degraded" and "oldest" in full[0]["detail"]
        sub.close()
    finally:
        broker.close()
