"""Replay verdicts name the file the frame came from (issue 21); the schema says so."""

from __future__ import annotations

import cv2
import numpy as np

from linecam import messages, schemas
from linecam.camera.replay import ReplaySource
from linecam.runtime.outbox import Outbox


def _verdict(**kw):
    return messages.verdict(line="l", camera="c", frame_id=3, verdict="SKIPPED", score=None, score_raw=None,
                            threshold=1.0, reason="queue_full",
                            frame_ts_ns=1, frame_clock="host_monotonic", frame_mono_ns=1, latency_ms={"total": 1.0},
                            model=None, **kw)


def test_verdict_source_validates_and_is_absent_otherwise():
    msg = _verdict(source={"path": "/data/line3/img_0007.png", "name": "img_0007.png", "index": 7, "loop": 0})
    schemas.validate(msg)
    assert msg["source"] == {"path": "/data/line3/img_0007.png", "index": 7, "loop": 0}
    plain = _verdict()
    schemas.validate(plain)
    assert "source" not in plain


def test_replay_frames_carry_their_file_into_the_verdict(tmp_path):
    for i in range(2):
        cv2.imwrite(str(tmp_path / f"img_{i}.png"), np.full((32, 32, 3), 100, np.uint8))
    src = ReplaySource(tmp_path, fps=None, loop=False)
    src.open()
    f = src.read(timeout=1.0)
    src.close()
    assert f is not None and f.meta["path"].endswith("img_0.png")
    sent = []

    class Pub:
        connected = True
        fatal_error = None

        def publish(self, topic, msg, qos=1, retain=False):
            sent.append(msg)

    out = Outbox.__new__(Outbox)  # only what skipped() needs
    out.counters = type("C", (), {"inc_all": lambda self, k: None})()
    out._common, out.thresholds, out.model_info = {"line": "l", "camera": "c"}, type("T", (), {"image": 1.0})(), None
    out.publisher, out.topics, out.linescan = Pub(), messages.topics("linecam/l/c"), None
    out.skipped(f, "queue_full")
    assert sent and sent[0]["source"]["path"].endswith("img_0.png")
    schemas.validate(sent[0])
