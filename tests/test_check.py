"""`linecam check` catches what `linecam run` would reject before its first frame, with the
same one-line error and the same exit code (issue 21: `check` said "config ok" for configs
`run` then rejected)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bundles import make_tiny_bundle
from linecam.broker import free_port


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "linecam", *args], capture_output=True, text=True, timeout=90,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("b") / "b")  # 64x64 tiles


def _cfg(tmp: Path, bundle: Path, **over) -> Path:
    cfg = {"camera": {"kind": "synthetic", "frames": 5, "fps": 30}, "model": {"bundle": str(bundle)},
           "mqtt": {"host": "127.0.0.1", "port": free_port()},  # nothing listens: run fails before that matters
           "output": {"snapshots_dir": str(tmp / "snaps")}, "spool": {"path": str(tmp / "spool.db")}}
    cfg.update(over)
    p = tmp / "line.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _web(width: int) -> dict:
    return {"kind": "synthetic_web", "width": width, "lines_per_frame": 64, "frames": 4, "line_rate_hz": None}


CASES = {
    "password_file": (lambda t: {"mqtt": {"host": "127.0.0.1", "port": free_port(), "username": "u",
                                          "password_file": str(t / "absent.secret")}}, 2, "mqtt.password_file"),
    "replay_path": (lambda t: {"camera": {"kind": "replay", "path": str(t / "no-such-folder")}}, 4, "replay path"),
    "overlap": (lambda t: {"camera": _web(256), "linescan": {"enabled": True, "overlap_px": 64}}, 2,
                "linescan.overlap_px"),
    "web_narrower_than_tile": (lambda t: {"camera": _web(48), "linescan": {"enabled": True, "overlap_px": 8}}, 2,
                               "narrower than the 64 px tile"),
    "vlm_bundle": (lambda t: {"vlm": {"bundle": str(t / "no-vlm")}}, 3, "no-vlm"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_check_rejects_what_run_rejects(case, bundle, tmp_path):
    over, code, needle = CASES[case]
    path = _cfg(tmp_path, bundle, **over(tmp_path))
    checked = _cli("check", "--config", str(path))
    ran = _cli("run", "--config", str(path))
    for proc in (checked, ran):
        assert "Traceback" not in proc.stderr, proc.stderr
    assert ran.returncode == code, ran.stderr[-2000:]
    assert checked.returncode == code, (checked.stdout, checked.stderr)
    err = [line for line in checked.stderr.splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and needle in err[0], checked.stderr


def test_check_ok_lists_what_it_checked(bundle, tmp_path):
    proc = _cli("check", "--config", str(_cfg(tmp_path, bundle, camera=_web(256),
                                              linescan={"enabled": True, "overlap_px": 16})))
    assert proc.returncode == 0, proc.stderr
    for part in ("config ok", "bundle ok", "mqtt ok", "camera ok", "linescan ok", "state ok"):
        assert part in proc.stdout, proc.stdout
