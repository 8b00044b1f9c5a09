"""The daemon is not silent while it runs (issue 21): a periodic progress line (fps, OK/NG/skipped,
broker state, repeated while the broker stays down) and a final line without a Python dict."""

from __future__ import annotations

import logging
import re

from bundles import make_tiny_bundle
from helpers import line_config
from linecam.broker import free_port
from linecam.config import parse_config
from linecam.runtime.service import run_service


def test_progress_lines_while_running_and_plain_final_line(tmp_path, caplog):
    bundle = make_tiny_bundle(tmp_path / "b")
    raw = line_config(bundle, free_port(), tmp_path, camera={"frames": 60, "fps": 30.0},  # broker down
                      runtime={"log_interval_s": 0.5})
    cfg = parse_config(raw, tmp_path / "x.yaml")
    caplog.set_level(logging.INFO)
    run_service(cfg)
    msgs = [r.getMessage() for r in caplog.records]
    progress = [m for m in msgs if m.startswith("running: ") and " fps | " in m]
    assert len(progress) >= 2, msgs  # ~2 s of frames, a line every 0.5 s
    assert all("DOWN for" in m for m in progress[1:]), progress  # repeated while the broker stays down
    assert re.search(r"\d+ frames: OK \d+, NG \d+, skipped \d+", progress[-1])
    final = [m for m in msgs if m.startswith("stopped after")]
    assert final and "{" not in final[-1] and "60 frames" in final[-1], final
