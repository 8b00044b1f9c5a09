"""Line-scan coverage (issue 21): with the README's line-scan geometry (a 2048 px web, 512
lines per frame, 256x256 tiles, 48 px overlap) and the default ``runtime.queue_size`` (8),
every tile of the web is inspected at the README's line rate when the model keeps up; when it
does not, the uninspected web area is reported while it happens (a warning naming the area in
mm, a ``degraded`` status with that detail), never only in a counter at the end."""

from __future__ import annotations

import logging
import time

import pytest

from bundles import make_tiny_bundle
from linecam.config import parse_config
from linecam.runtime import inspector as inspector_mod
from linecam.runtime.linescan.coverage import Coverage, queue_size_for, tiles_per_frame
from linecam.runtime.outbox import Outbox
from linecam.runtime.service import run_service

WIDTH, LINES, TILE, OVERLAP = 2048, 512, 256, 48  # the README's line-scan section


def _config(bundle, port, tmp, *, frames: int, rate: float) -> object:
    return parse_config({
        "line": "t", "camera_id": "c0",
        "camera": {"kind": "synthetic_web", "width": WIDTH, "lines_per_frame": LINES, "line_rate_hz": rate,
                   "frames": frames, "defect_rate": 0.3, "seed": 2},
        "model": {"bundle": str(bundle), "intra_op_threads": 1},
        "mqtt": {"host": "127.0.0.1", "port": port},
        "runtime": {"workers": 2, "metrics_interval_s": 0.5},  # queue_size: the default (8)
        "output": {"snapshots_dir": str(tmp / "snaps"), "snapshots_max_files": 10},
        "spool": {"path": str(tmp / "spool.db")},
        "linescan": {"enabled": True, "overlap_px": OVERLAP, "mm_per_px_cross": 0.05, "mm_per_line": 0.05,
                     "web_map": {"dir": str(tmp / "maps")}},
    }, tmp / "x.yaml")


@pytest.fixture
def bundle256(tmp_path):
    return make_tiny_bundle(tmp_path / "bundle", size=TILE, image_threshold=0.3, pixel_threshold=0.5)


def test_queue_holds_two_frames_of_tiles():
    per = tiles_per_frame(columns=10, lines_per_frame=LINES, stride=TILE - OVERLAP)
    assert per == 30  # 10 columns x 3 rows (a row every 208 lines)
    assert queue_size_for(8, per) == 60
    assert queue_size_for(256, per) == 256


def test_readme_geometry_default_queue_every_tile_inspected(broker, bundle256, tmp_path):
    """Before the fix: 30 tiles per frame into a queue of 8, most skipped (64 % in the issue)."""
    cfg = _config(bundle256, broker.port, tmp_path, frames=12, rate=10000.0)
    assert cfg.runtime.queue_size == 8
    summary = run_service(cfg)
    c = summary.counters
    assert c["tiles"] >= 12 * 20
    assert c.get("web_tiles_skipped", 0) == 0, c
    assert c.get("skipped", 0) == 0, c


def test_a_model_slower_than_the_line_is_reported_as_it_happens(broker, bundle256, tmp_path, monkeypatch, caplog):
    real = inspector_mod.Inspector.inspect

    def slow(self, image, bit_depth=8):
        time.sleep(0.03)  # ~65 tiles/s with 2 workers; the web offers ~600 tiles/s
        return real(self, image, bit_depth)

    monkeypatch.setattr(inspector_mod.Inspector, "inspect", slow)
    statuses: list[tuple[float, str, str | None]] = []
    real_status = Outbox.status

    def record(self, state, detail=None):
        statuses.append((time.monotonic(), state, detail))
        return real_status(self, state, detail)

    monkeypatch.setattr(Outbox, "status", record)
    caplog.set_level(logging.WARNING, logger="linecam.runtime.linescan.coverage")
    cfg = _config(bundle256, broker.port, tmp_path, frames=20, rate=10000.0)
    t0 = time.monotonic()
    summary = run_service(cfg)
    t_end = t0 + summary.seconds
    skipped = summary.counters.get("web_tiles_skipped", 0)
    assert skipped > 0
    warned = [r.getMessage() for r in caplog.records if "NOT INSPECTED" in r.getMessage()]
    assert warned, "no warning naming the uninspected area"
    assert "cross " in warned[0] and " mm" in warned[0] and "down " in warned[0]
    degraded = [(t, d) for t, s, d in statuses if s == "degraded" and d and "NOT INSPECTED" in d]
    assert degraded, statuses
    # as it happens: well before the run (and its drain) ended
    assert degraded[0][0] < t_end - 0.5


def test_coverage_reports_area_then_recovery():
    said, back = [], []
    cov = Coverage(0.1, lambda line: line * 0.2, said.append, back.append, every_s=100.0, recover_s=0.0)
    cov.done(0, 256, 0, 256, inspected=True)
    assert not said
    cov.done(100, 356, 512, 768, inspected=False)
    assert len(said) == 1 and "cross 10.0-35.6 mm" in said[0] and "down 102.4-153.6 mm" in said[0]
    cov.done(0, 256, 512, 768, inspected=False)  # within every_s: counted, reported with the next one
    assert len(said) == 1 and cov.skipped == 2
    cov.done(0, 256, 768, 1024, inspected=True)
    assert back and "2 tile(s) not inspected" in back[0]


def test_tiles_command_saves_web_tiles_to_fit_on(tmp_path):
    """`linecam tiles` (the README's way to make a web bundle): the tiles run would cut, as PNGs."""
    import subprocess
    import sys

    import cv2
    import yaml

    cfg = {"camera": {"kind": "synthetic_web", "width": 256, "lines_per_frame": 64, "frames": 20,
                      "line_rate_hz": None},
           "model": {"bundle": str(tmp_path / "not-needed")}, "mqtt": {"host": "127.0.0.1"},
           "linescan": {"enabled": True, "overlap_px": 16}}
    path = tmp_path / "web.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "tiles"
    proc = subprocess.run([sys.executable, "-m", "linecam", "tiles", "--config", str(path), "--out", str(out),
                           "--tile", "64", "--count", "12"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "12 tile(s) written" in proc.stdout and "export-engine fit --images" in proc.stdout
    files = sorted(out.glob("*.png"))
    assert len(files) == 12
    assert cv2.imread(str(files[0]), cv2.IMREAD_UNCHANGED).shape[:2] == (64, 64)
