"""The README's commands, in order, on a fresh checkout (issue 21): `linecam demo`, `linecam
check`, `linecam run` stopped with Ctrl-C, `linecam events` piped to a file and stopped with
SIGTERM. Every command must succeed with output free of tracebacks and warning floods.

Slow: the first `demo` fits the demo expert (minutes on 2 CPU cores). Set
``LINECAM_DEMO_CACHE`` to a fitted demo work dir (``.cache/demo`` of an earlier run) to reuse
its bundle: the cache key still has to match, as in a user's second run.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from linecam.broker import MosquittoBroker

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

FLOODS = re.compile(r"DeprecationWarning|FutureWarning|UserWarning|\[INFO\]|Traceback")


def _clean(name: str, text: str, max_warnings: int = 5) -> None:
    assert "Traceback" not in text, f"{name}:\n{text[-3000:]}"
    floods = [ln for ln in text.splitlines() if FLOODS.search(ln)]
    assert not floods, f"{name}: {floods[:5]}"
    warnings = [ln for ln in text.splitlines() if " WARNING " in ln or ln.startswith("WARNING")]
    assert len(warnings) <= max_warnings, f"{name}: {len(warnings)} warnings: {warnings[:5]}"


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A fresh clone of this checkout's HEAD (what a new user has), sharing the venv."""
    dst = tmp_path / "linecam"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(REPO), str(dst)], check=True, timeout=120)
    cache = os.environ.get("LINECAM_DEMO_CACHE")
    if cache and (Path(cache) / "bundle.key").is_file():
        (dst / ".cache" / "demo").mkdir(parents=True)
        for name in ("bundle", "bundle.key"):
            src = Path(cache) / name
            (shutil.copytree if src.is_dir() else shutil.copy)(src, dst / ".cache" / "demo" / name)
    return dst


def _cmd(checkout: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "linecam", *args]


def _env(checkout: Path, home: Path) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(checkout), PYTHONUNBUFFERED="1", HOME=str(home),
                LINECAM_STATE_DIR="", XDG_STATE_HOME="", COLUMNS="100")


@pytest.mark.timeout(1800)  # the first demo fits its expert: minutes, more on a loaded machine
def test_readme_commands_in_order(checkout, tmp_path):
    env = _env(checkout, tmp_path / "home")
    # 1. the demo
    demo = subprocess.run(_cmd(checkout, "demo", "--frames", "40"), cwd=checkout, env=env, capture_output=True,
                          text=True, timeout=1800)
    assert demo.returncode == 0, demo.stderr[-3000:]
    _clean("demo", demo.stdout + demo.stderr)
    assert "Summary: 40 verdicts" in demo.stdout, demo.stdout[-2000:]
    cfg_path = checkout / ".cache" / "demo" / "line-synthetic.yaml"
    assert not (checkout / "linecam-state").exists()  # the demo's spool stays in its work dir

    # 2. check the config the demo wrote
    check = subprocess.run(_cmd(checkout, "check", "--config", str(cfg_path)), cwd=checkout, env=env,
                           capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stderr
    _clean("check", check.stdout + check.stderr)
    assert "bundle ok" in check.stdout and "camera ok" in check.stdout

    # 3. run it against a broker, with `linecam events` piped to a file; Ctrl-C, then SIGTERM
    with MosquittoBroker() as broker:
        cfg = yaml.safe_load(cfg_path.read_text())
        cfg["mqtt"]["port"] = broker.port
        cfg["camera"]["frames"] = None  # an endless line: stopped by Ctrl-C
        cfg["runtime"]["log_interval_s"] = 1.0
        line_yaml = tmp_path / "line.yaml"
        line_yaml.write_text(yaml.safe_dump(cfg))
        events_txt = tmp_path / "events.txt"
        with open(events_txt, "w") as out:
            events = subprocess.Popen(_cmd(checkout, "events", "--port", str(broker.port)), cwd=checkout, env=env,
                                      stdout=out, stderr=subprocess.PIPE, text=True)
            time.sleep(2.0)
            run = subprocess.Popen(_cmd(checkout, "run", "--config", str(line_yaml)), cwd=checkout, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            time.sleep(8.0)
            run.send_signal(signal.SIGINT)
            run_out, run_err = run.communicate(timeout=60)
            time.sleep(1.0)
            events.send_signal(signal.SIGTERM)
            _, ev_err = events.communicate(timeout=30)
    assert run.returncode == 0, run_err[-3000:]
    _clean("run", run_out + run_err)
    assert "running: " in run_err and " fps | " in run_err  # the progress line
    final = [ln for ln in run_err.splitlines() if "stopped after" in ln]
    assert final and "{" not in final[-1]
    assert events.returncode == 0, ev_err
    _clean("events", ev_err)
    text = events_txt.read_text()
    assert "\x1b[" not in text
    assert sum(" verdict " in ln for ln in text.splitlines()) >= 10, text[:2000]
    assert "state=" not in text and "running, online" in text  # the status, as plain text
