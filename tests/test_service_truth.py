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


def test_password_over_plain_tcp_gets_a_warning(tmp_path, tiny_bundle):
    from linecam.runtime.service import plaintext_password_warning

    secret = tmp_path / "secret"
    secret.write_text("pw\n")
    plain = parse_config(line_config(tiny_bundle, 1883, tmp_path,
                                     mqtt={"username": "u", "password_file": str(secret)}), tmp_path / "x.yaml")
    why = plaintext_password_warning(plain)
    assert why is not None and "plain TCP" in why and "pw" not in why.replace("password", "")
    anonymous = parse_config(line_config(tiny_bundle, 1883, tmp_path), tmp_path / "x.yaml")
    assert plaintext_password_warning(anonymous) is None


def test_docs_and_unit_agree_with_the_code():
    readme = (REPO / "README.md").read_text()
    unit = (REPO / "systemd" / "linecam@.service").read_text()
    sysreadme = (REPO / "systemd" / "README.md").read_text()
    exit4 = next(line for line in readme.splitlines() if line.startswith("| 4 |"))
    assert "unknown serial" not in exit4  # an unknown serial is retried (documented below the table)
    assert "LINECAM_CACHE_DIR" not in unit + sysreadme + readme  # read by nothing
    assert "password_file: $CREDENTIALS_DIRECTORY/" in readme and "LoadCredential=" in readme
    assert "/var/lib/linecam/webmaps" not in readme  # outside StateDirectory=: not writable
    assert "<bundle>/trt/" in sysreadme


@pytest.mark.timeout(120)
def test_a_slow_vlm_never_holds_a_verdict_up(broker, tmp_path, monkeypatch):
    """The claim "the VLM never delays verdicts" is about waiting: each description here takes
    1 s of *sleep* (no CPU), 20x the frame period, and the VLM is busy for the whole run, so a
    verdict that waited for it at all would be late by ~0.5 s on average. Bound: no verdict
    latency above 250 ms (a quarter of one description; 17-38 ms seen on this shared 2-core
    machine at load 10), and the median within 25 ms of the same line without a VLM (medians
    alone swing 0.7-5.5 ms here between identical runs). CPU contention of a real VLM is the
    README's matter."""
    import statistics
    import time as _time
    from types import SimpleNamespace

    import linecam.runtime.service as service
    from linecam.runtime.vlm.worker import DescriptionWorker

    class SleepyVlm:
        def generate(self, image, prompt, *, max_new_tokens=8, on_token=None, should_stop=None):
            _time.sleep(1.0)
            return SimpleNamespace(text="a scratch", tokens=[1, 2], stop_reason="max_tokens", timings_ms={})

    busy = {"n": 0}

    def make(cfg, publish):
        if cfg.vlm.bundle is None:
            return None
        busy["n"] += 1
        return DescriptionWorker(SleepyVlm(), publish, line=cfg.line, camera=cfg.camera_id, backlog=4, nice=0,
                                 model_info={"name": "sleepy", "sha256": "0" * 64, "file": "vlm_fp32"})

    monkeypatch.setattr(service, "make_describer", make)
    # 0.775 splits this line roughly in half: both OK and NG frames occur
    bundle = make_tiny_bundle(tmp_path / "expert", size=64, image_threshold=0.775, pixel_threshold=0.5)

    def run(vlm: bool, sub: str):
        cfg = line_config(bundle, broker.port, tmp_path / sub, camera={"frames": 40, "fps": 20.0})
        if vlm:
            cfg["vlm"] = {"bundle": str(tmp_path)}  # any folder: make_describer is replaced above
        events, _ = collect(broker.port, lambda: run_service(parse_config(cfg, tmp_path / "x.yaml")),
                            types=("verdict", "description"), settle=1.0)
        lat = [e.payload["latency_ms"]["total"] for e in events
               if e.type == "verdict" and e.payload["verdict"] != "SKIPPED"]
        return lat, sum(e.type == "description" for e in events)

    without, _ = run(False, "without")
    with_vlm, n_desc = run(True, "with")
    assert busy["n"] == 1 and n_desc >= 3, n_desc  # the VLM really was busy (>= 2 s of descriptions)
    m0, m1 = statistics.median(without), statistics.median(with_vlm)
    print(f"\nverdict latency median without / with a busy VLM: {m0:.2f} / {m1:.2f} ms, max {max(with_vlm):.1f} ms")
    assert max(with_vlm) < 250.0
    assert m1 <= m0 + 25.0
