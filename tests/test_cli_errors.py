"""`linecam run` on bad input: one clear line, a non-zero exit, no traceback.
A broker that is down at start is not an error: the daemon retries and says so."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from bundles import make_tiny_bundle
from linecam.broker import free_port


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "linecam", *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def write_cfg(tmp_path: Path, cfg: dict) -> Path:
    p = tmp_path / "line.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def base_cfg(tmp_path: Path, bundle: Path, port: int = 1883) -> dict:
    return {"camera": {"kind": "synthetic", "frames": 30, "fps": 30},
            "model": {"bundle": str(bundle)}, "mqtt": {"host": "127.0.0.1", "port": port},
            "output": {"snapshots_dir": str(tmp_path / "snaps")}, "spool": {"path": str(tmp_path / "spool.db")}}


def assert_one_line_error(proc: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in errors[0], errors[0]


def test_bad_config_key(tmp_path):
    cfg = base_cfg(tmp_path, tmp_path / "b")
    cfg["runtime"] = {"queue_sise": 3}
    assert_one_line_error(run_cli("run", "--config", str(write_cfg(tmp_path, cfg))), 2,
                          "runtime.queue_sise", "unknown key")


def test_missing_config_file(tmp_path):
    assert_one_line_error(run_cli("run", "--config", str(tmp_path / "nope.yaml")), 2, "not found")


def test_missing_bundle_file(tmp_path):
    bundle = make_tiny_bundle(tmp_path / "b")
    (bundle / "model.onnx").unlink()
    assert_one_line_error(run_cli("run", "--config", str(write_cfg(tmp_path, base_cfg(tmp_path, bundle)))), 3,
                          "model.onnx", "is missing")


def test_missing_cti(tmp_path):
    bundle = make_tiny_bundle(tmp_path / "b")
    cfg = base_cfg(tmp_path, bundle)
    cfg["camera"] = {"kind": "genicam", "cti": str(tmp_path / "absent.cti")}
    assert_one_line_error(run_cli("run", "--config", str(write_cfg(tmp_path, cfg))), 4, "absent.cti")


def test_check_command(tmp_path):
    bundle = make_tiny_bundle(tmp_path / "b")
    proc = run_cli("check", "--config", str(write_cfg(tmp_path, base_cfg(tmp_path, bundle))))
    assert proc.returncode == 0, proc.stderr
    assert "bundle ok: tiny-darkness" in proc.stdout


def test_unreachable_broker_keeps_retrying_then_stops_cleanly(tmp_path):
    bundle = make_tiny_bundle(tmp_path / "b")
    cfg = base_cfg(tmp_path, bundle, port=free_port())  # nothing listens there
    cfg["camera"]["frames"] = None
    proc = subprocess.Popen([sys.executable, "-m", "linecam", "run", "--config", str(write_cfg(tmp_path, cfg))],
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    time.sleep(4.0)
    assert proc.poll() is None, "the daemon must not exit while the broker is down"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "unreachable" in err and "retrying" in err
    assert "Traceback" not in err
