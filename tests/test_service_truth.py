"""What the service says about itself: one ``starting`` status and a final ``stopped`` status
with the run's real counts; exit codes as documented (README, systemd unit)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from bundles import make_tiny_bundle
from helpers import collect, line_config
from linecam.broker import MosquittoBroker
from linecam.camera.genicam import CameraUnavailable
from linecam.config import parse_config
from linecam.errors import BrokerError
from linecam.runtime.device import BackendUnavailable
from linecam.runtime.service import run_service

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_bundle(tmp_path):
    return make_tiny_bundle(tmp_path / "bundle", size=64, image_threshold=0.3, pixel_threshold=0.5)


@pytest.mark.timeout(60)
def test_one_starting_status_and_a_truthful_final_status(broker, tiny_bundle, tmp_path):
    n = 50
    cfg = parse_config(line_config(tiny_bundle, broker.port, tmp_path, camera={"frames": n, "fps": 100.0,
                                                                              "width": 160, "height": 160}),
                       tmp_path / "x.yaml")
    events, summary = collect(broker.port, lambda: run_service(cfg), types=("status",))
    status = [e.payload for e in events]
    assert [s["state"] for s in status].count("starting") == 1, [s["state"] for s in status]
    final = status[-1]
    c = summary.counters
    assert (final["online"], final["state"]) == (False, "stopped")
    assert (final["frames"], final["ng"], final["dropped"]) == (n, c.get("ng", 0), c.get("skipped", 0))
    assert c.get("ng", 0) > 0 and final["fps"] > 0


def test_backend_unavailable_exits_3_which_systemd_does_not_restart():
    assert BackendUnavailable("x").exit_code == 3
    unit = (REPO / "systemd" / "linecam@.service").read_text()
    prevent = re.search(r"^RestartPreventExitStatus=(.*)$", unit, re.M).group(1).split()
    assert "3" in prevent


@pytest.mark.timeout(60)
def test_refused_login_exits_5_while_the_camera_is_down(tmp_path, tiny_bundle, monkeypatch):
    import linecam.runtime.service as service
    from linecam.camera.synthetic import SyntheticLineSource

    class Absent(SyntheticLineSource):
        def open(self):
            raise CameraUnavailable("no camera with serial '42': cameras seen: none")

    monkeypatch.setattr(service, "open_source", lambda _cfg: Absent(width=64, height=64, fps=10))
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        pytest.skip("mosquitto_passwd not found: apt-get install mosquitto")
    pw = tmp_path / "passwd"
    subprocess.run([tool, "-c", "-b", str(pw), "linecam", "s3cret"], check=True, capture_output=True)
    pw.chmod(0o600)
    secret = tmp_path / "secret"
    secret.write_text("wrong\n")
    with MosquittoBroker(allow_anonymous=False, extra_config=[f"password_file {pw}"]) as b:
        cfg = parse_config(line_config(tiny_bundle, b.port, tmp_path,
                                       mqtt={"username": "linecam", "password_file": str(secret)},
                                       runtime={"reconnect_delay_s": [5, 30]}), tmp_path / "x.yaml")
        with pytest.raises(BrokerError) as e:
            run_service(cfg)
    assert e.value.exit_code == 5 and "refused" in str(e.value)
