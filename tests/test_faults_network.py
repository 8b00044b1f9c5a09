"""Network faults between the daemon and a real mosquitto, through a fault-injecting TCP proxy
(:mod:`linecam.bench.faultproxy`); the subscriber talks to the broker directly.

* partition without a reset (packets silently dropped): noticed by MQTT keep-alive within
  two keep-alive periods, then reconnect; every frame's verdict arrives exactly once;
* a broker that accepts publishes but never acknowledges them: the messages stay in the
  spool, are re-sent after ``spool.resend_after_s``, and nothing is lost once acks flow again;
* unclean drops: every connection carries a fresh Last Will ``event_id``;
* the spool's disk full (ENOSPC, a 4 MB tmpfs): messages go to the broker without the spool,
  one warning line; the spool's file removed while running: re-created with what it held.
"""

from __future__ import annotations

import threading
import time

import pytest

from bundles import make_tiny_bundle
from helpers import DurableSubscriber, line_config, persistent_broker, spool_rows, wait
from linecam.bench.faultproxy import FaultProxy
from linecam.config import MqttSettings, parse_config
from linecam.runtime.publisher import MqttPublisher
from linecam.runtime.service import run_service


@pytest.fixture
def tiny_bundle(tmp_path):
    return make_tiny_bundle(tmp_path / "bundle", size=64, image_threshold=0.3, pixel_threshold=0.5)


@pytest.fixture
def net(tmp_path):
    broker = persistent_broker(tmp_path)
    broker.start()
    proxy = FaultProxy(broker.port)
    sub = DurableSubscriber(broker.port, "linecam/t/c0/#")
    try:
        yield broker, proxy, sub
    finally:
        sub.close()
        proxy.close()
        broker.close()


def one_verdict_per_frame(sub: DurableSubscriber, n: int) -> dict[int, set[str]]:
    assert sub.wait_for(lambda: len({v["frame_id"] for v in sub.payloads("verdict")}) >= n, 30)
    frames: dict[int, set[str]] = {}
    for v in sub.payloads("verdict"):
        frames.setdefault(v["frame_id"], set()).add(v["event_id"])
    assert sorted(frames) == list(range(n))
    assert all(len(ids) == 1 for ids in frames.values()), "one verdict (one event id) per frame"
    return frames


def faulted_cfg(bundle, proxy, tmp_path, n, fps, **spool):
    return parse_config(line_config(bundle, proxy.port, tmp_path, camera={"frames": n, "fps": fps,
                                                                          "width": 160, "height": 160},
                                     mqtt={"port": proxy.port, "keepalive": 5},
                                     spool={"path": str(tmp_path / "spool.db"), **spool}), tmp_path / "x.yaml")


@pytest.mark.timeout(120)
def test_partition_without_reset_is_detected_by_keepalive_and_nothing_is_lost(tmp_path, tiny_bundle, net):
    broker, proxy, sub = net
    n, fps = 400, 25.0
    cfg = faulted_cfg(tiny_bundle, proxy, tmp_path, n, fps)
    seen: dict[str, float] = {}

    def fault(daemon):
        def run():
            wait(lambda: daemon.counters.get("frames") >= 20 and daemon.publisher.connected)
            t0 = time.monotonic()
            proxy.set_mode("blackhole")
            wait(lambda: not daemon.publisher.connected, 30)
            seen["detected_s"] = time.monotonic() - t0
            seen["spooled"] = daemon.publisher.spool_stats().rows
            time.sleep(0.5)
            proxy.set_mode("pass")
            wait(lambda: daemon.publisher.connected, 30)
            seen["recovered_s"] = time.monotonic() - t0
        threading.Thread(target=run, daemon=True).start()

    summary = run_service(cfg, on_daemon=fault)
    assert summary.counters["frames"] == n
    # keep-alive 5 s: a PINGREQ after <= 5 s of silence, no answer within another 5 s
    assert 4.0 <= seen["detected_s"] <= 12.0, seen
    assert seen["recovered_s"] < seen["detected_s"] + 5.0, seen
    assert seen["spooled"] > 0, seen  # the spool held what the partition swallowed
    one_verdict_per_frame(sub, n)
    assert spool_rows(tmp_path / "spool.db") == []


@pytest.mark.timeout(120)
def test_broker_that_never_acknowledges_keeps_messages_in_the_spool_until_it_does(tmp_path, tiny_bundle, net):
    broker, proxy, sub = net
    n, fps = 200, 25.0
    cfg = faulted_cfg(tiny_bundle, proxy, tmp_path, n, fps, resend_after_s=1.0)
    seen: dict[str, float] = {}

    def fault(daemon):
        def run():
            wait(lambda: daemon.counters.get("frames") >= 20 and daemon.publisher.connected)
            proxy.set_mode("no_puback")
            t0 = time.monotonic()
            wait(lambda: daemon.publisher.spool_stats().resent > 0, 20)
            seen["resent_after_s"] = time.monotonic() - t0
            time.sleep(1.0)
            seen["unacked_rows"] = daemon.publisher.spool_stats().rows
            proxy.set_mode("pass")
        threading.Thread(target=run, daemon=True).start()

    summary = run_service(cfg, on_daemon=fault)
    assert summary.counters["frames"] == n
    assert proxy.dropped_pubacks > 0
    assert seen["unacked_rows"] > 10, seen  # unacknowledged messages stay in the spool ...
    assert 0.9 <= seen["resent_after_s"] <= 4.0, seen  # ... and are re-sent after resend_after_s
    one_verdict_per_frame(sub, n)  # re-sent copies keep their event id: de-duplicated
    assert spool_rows(tmp_path / "spool.db") == []


@pytest.mark.timeout(60)
def test_every_connection_has_a_fresh_last_will_event_id(tmp_path, net):
    broker, proxy, sub = net
    pub = MqttPublisher(MqttSettings(port=proxy.port, keepalive=5), "t", "c0", "0.1.0", None)
    pub.start()
    try:
        for i in range(3):
            assert pub.wait_connected(10)
            pub.publish_status(state="running", camera_state="up")
            assert wait(lambda: sum(s["state"] == "running" for s in sub.payloads("status")) > i, 10)
            proxy.cut()  # no DISCONNECT: the broker publishes the Will
            assert wait(lambda: sum(s["detail"] == "connection lost" for s in sub.payloads("status")) > i, 10)
            assert wait(lambda: not pub.connected, 5)
    finally:
        pub.stop()
    wills = [s for s in sub.payloads("status") if s["detail"] == "connection lost"]
    assert len(wills) == 3
    assert len({w["event_id"] for w in wills}) == 3, "a Last Will reused its event_id"


# -- the spool's disk and file --------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs (root only; the test skips with the reason otherwise)."""
    import os
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs for the full-disk test needs root")
    d = tmp_path / "disk"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def fill(disk) -> None:
    """Fill the file system up to the last byte (ENOSPC from then on)."""
    with open(disk / "filler", "wb", buffering=0) as f:
        for size in (65536, 512, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError:
                pass


@pytest.mark.timeout(120)
def test_spool_disk_full_keeps_every_verdict_flowing_and_says_so(tmp_path, tiny_bundle, net, small_disk, caplog):
    broker, proxy, sub = net
    n, fps = 150, 50.0
    cfg = parse_config(line_config(tiny_bundle, broker.port, tmp_path, camera={"frames": n, "fps": fps,
                                                                              "width": 160, "height": 160},
                                   spool={"path": str(small_disk / "spool.db")}), tmp_path / "x.yaml")

    def fault(daemon):
        def run():
            wait(lambda: daemon.counters.get("frames") >= 20)
            fill(small_disk)
        threading.Thread(target=run, daemon=True).start()

    summary = run_service(cfg, on_daemon=fault)
    assert summary.counters["frames"] == n
    one_verdict_per_frame(sub, n)  # written to the spool, or (disk full) handed to the broker directly
    lines = [r.getMessage() for r in caplog.records if "cannot write" in r.getMessage()]
    assert lines and "full" in lines[0] and "\n" not in lines[0], lines


@pytest.mark.timeout(120)
def test_spool_file_removed_while_running_is_recreated_with_what_it_held(tmp_path, tiny_bundle, net, caplog):
    import os

    broker, proxy, sub = net
    n, fps = 200, 50.0
    spool = tmp_path / "spool.db"
    cfg = faulted_cfg(tiny_bundle, proxy, tmp_path, n, fps, resend_after_s=1.0)
    seen: dict[str, int] = {}

    def fault(daemon):
        def run():
            wait(lambda: daemon.counters.get("frames") >= 20 and daemon.publisher.connected)
            proxy.set_mode("no_puback")  # the spool holds what the broker has not confirmed
            wait(lambda: daemon.publisher.spool_stats().rows >= 30)
            for suffix in ("", "-wal", "-shm"):
                os.unlink(f"{spool}{suffix}")
            wait(lambda: spool.exists(), 10)
            time.sleep(0.3)
            seen["rows_in_new_file"] = len(spool_rows(spool))
            proxy.set_mode("pass")
        threading.Thread(target=run, daemon=True).start()

    summary = run_service(cfg, on_daemon=fault)
    assert summary.counters["frames"] == n
    assert seen["rows_in_new_file"] >= 30, seen  # what the removed file held is on disk again
    msgs = [r.getMessage() for r in caplog.records if "was removed" in r.getMessage()]
    assert msgs and "re-created it with the" in msgs[0], msgs
    one_verdict_per_frame(sub, n)
    assert spool_rows(spool) == []


def test_fault_table_markdown_has_the_asked_columns():
    from linecam.bench.faults import markdown

    md = markdown({"when": "now", "frames": 10, "fps": 5.0, "keepalive_s": 5, "rows": [
        {"fault": "f", "detection_s": 1.234, "lost": 0, "duplicates": 2, "recovery_s": 3.0, "signal": "s"},
        {"fault": "g", "skipped": "needs root"}]})
    assert "| fault | detection time | messages lost | duplicates | recovery time |" in md
    assert "| f | 1.23 s | 0 | 2 | 3.00 s | s |" in md and "not run: needs root" in md
