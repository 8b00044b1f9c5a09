"""`linecam events` as a new user meets it (issue 21): the newest rows and the counts stay
visible at any terminal size; snapshot names are not cut to nothing; `--ng-only` counts say
what they count; piped to a file it writes plain lines as they arrive, and SIGTERM loses none."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from rich.console import Console

from linecam.events import Event, EventTable
from linecam.events.view import plain_line
from test_events import Feeder


def _ev(kind, **p):
    return Event(f"linecam/l/c/{kind}", kind, {"line": "l", "camera": "c", "sent_at": "2026-12-02T22:45:01.5Z", **p},
                 False, 0)


def _table(n: int, **kw) -> EventTable:
    t = EventTable(**kw)
    t.add(_ev("status", online=True, state="running", camera_state="up"))
    for i in range(n):
        v = "NG" if i % 5 == 0 else "OK"
        t.add(_ev("verdict", event_id=f"v{i}", frame_id=i, verdict=v, score=0.5, latency_ms={"total": 3.0},
                  n_regions=int(v == "NG")))
        if v == "NG":
            t.add(_ev("defect", event_id=f"d{i}", verdict_event_id=f"v{i}",
                      snapshot=f"/var/lib/linecam/station3/snapshots/station3_{i:09d}.jpg"))
    return t


@pytest.mark.parametrize("size", [(80, 24), (60, 12), (200, 60)])
def test_newest_rows_and_counts_fit_the_terminal(size):
    w, h = size
    t = _table(150)
    console = Console(width=w, height=h, record=True, file=open(os.devnull, "w"))
    console.print(t.render(h, w))
    lines = console.export_text().rstrip("\n").splitlines()
    assert len(lines) <= h - 1, "\n".join(lines)
    text = "\n".join(lines)
    assert " 149 " in text  # the newest verdict
    assert "OK 120" in text and "NG 30" in text  # the counts, in the title
    if w >= 80:
        assert "station3_000000145" in text  # a snapshot shows its file name, not its first 10 characters


def test_ng_only_counts_only_ng():
    t = _table(10, ng_only=True)
    assert t.counts_text().startswith("NG 2") and "OK 0" not in t.counts_text()


def test_plain_lines():
    line = plain_line(_ev("verdict", frame_id=7, verdict="NG", score=2.0, latency_ms={"total": 5.0}, n_regions=1))
    assert line is not None and "l/c" in line and "frame 7 NG" in line and "22:45:01" in line
    snap = plain_line(_ev("defect", frame_id=7, regions=[{}], snapshot="/abs/snap.jpg"))
    assert snap is not None and "/abs/snap.jpg" in snap


@pytest.mark.timeout(60)
def test_piped_to_a_file_and_stopped_with_sigterm(broker, tmp_path):
    out = tmp_path / "events.txt"
    feeder = Feeder(broker)
    try:
        with open(out, "w") as f:
            proc = subprocess.Popen([sys.executable, "-m", "linecam", "events", "--port", str(broker.port)],
                                    stdout=f, stderr=subprocess.PIPE, text=True)
            time.sleep(4.0)
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=20)
    finally:
        feeder.stop()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    lines = out.read_text().splitlines()
    verdicts = [ln for ln in lines if " verdict " in ln]
    assert len(verdicts) > 10, lines[:5]
    assert "\x1b[" not in out.read_text()  # no terminal escapes in a file
