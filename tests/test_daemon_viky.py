"""The daemon acquiring from a real GenTL producer (viky.cti, through harvesters)."""

from __future__ import annotations

import threading

import pytest

pytest.importorskip("harvesters")
pytest.importorskip("genicam")

from bundles import make_tiny_bundle  # noqa: E402
from linecam import schemas  # noqa: E402
from linecam.config import parse_config  # noqa: E402
from linecam.events import subscribe  # noqa: E402
from linecam.runtime.service import run_service  # noqa: E402


def test_daemon_on_viky(broker, tmp_path):
    bundle = make_tiny_bundle(tmp_path / "b", size=64, image_threshold=0.3, pixel_threshold=0.5)
    cfg = parse_config({
        "line": "t", "camera_id": "viky",
        "camera": {"kind": "genicam", "cti": "viky", "serial": "0", "num_buffers": 4,
                   "features": {"AcquisitionFrameRate": 50.0, "BouncingBallSize": 40}},
        "model": {"bundle": str(bundle)},
        "mqtt": {"host": "127.0.0.1", "port": broker.port},
        "output": {"snapshots_dir": str(tmp_path / "snaps")},
        "spool": {"path": str(tmp_path / "spool.db")},
    }, tmp_path / "x.yaml")
    verdicts = []

    def stop_after(daemon):
        # stop from outside once enough frames went through, like SIGTERM would
        def watch():
            while daemon.counters.get("frames") < 25 and not daemon.stopping:
                threading.Event().wait(0.05)
            daemon.request_stop()
        threading.Thread(target=watch, daemon=True).start()

    with subscribe("127.0.0.1", broker.port, prefix="linecam/t/viky", types=("verdict",)) as sub:
        summary = run_service(cfg, on_daemon=stop_after)
        while True:
            ev = sub.poll(timeout=1.0)
            if ev is None:
                break
            schemas.validate(ev.payload)
            verdicts.append(ev.payload)
    assert summary.counters["frames"] >= 25
    assert len(verdicts) == summary.counters["frames"]
    ids = [v["frame_id"] for v in verdicts]
    assert len(set(ids)) == len(ids)
    # viky draws a dark square on white: the darkness model must see it in every frame
    inspected = [v for v in verdicts if v["verdict"] != "SKIPPED"]
    assert inspected and all(v["score_raw"] > 0.3 for v in inspected)
