"""sd_notify client against real AF_UNIX datagram sockets (path and abstract)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from linecam.runtime.sdnotify import Notifier

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sd_notify is Linux-only")


def _recv(sock: socket.socket) -> bytes:
    sock.settimeout(2.0)
    return sock.recv(4096)


@pytest.fixture
def path_socket(tmp_path):
    path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    yield s, path
    s.close()


@pytest.fixture
def abstract_socket():
    name = f"linecam-test-{uuid.uuid4().hex}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(b"\0" + name.encode())
    yield s, "@" + name
    s.close()


def test_messages_to_path_socket(path_socket, monkeypatch):
    sock, path = path_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    with Notifier.from_env() as n:
        assert n.enabled
        assert n.ready(status="camera up, broker up")
        assert _recv(sock) == b"READY=1\nSTATUS=camera up, broker up"
        assert n.ready()
        assert _recv(sock) == b"READY=1"
        assert n.status("12.5 fps\nsecond line")
        assert _recv(sock) == b"STATUS=12.5 fps second line"
        assert n.watchdog()
        assert _recv(sock) == b"WATCHDOG=1"
        assert n.stopping()
        assert _recv(sock) == b"STOPPING=1"


def test_messages_to_abstract_socket(abstract_socket):
    sock, address = abstract_socket
    n = Notifier.from_env({"NOTIFY_SOCKET": address})
    assert n.watchdog()
    assert _recv(sock) == b"WATCHDOG=1"
    n.close()


def test_unset_env_is_a_no_op():
    n = Notifier.from_env({})
    assert not n.enabled
    assert n.watchdog_interval_s is None
    assert n.ready("x") is False
    assert n.watchdog() is False
    assert n.stopping() is False


def test_send_failure_never_raises(tmp_path):
    n = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens.sock")})
    assert n.enabled
    assert n.ready("x") is False
    assert n.watchdog() is False


def test_watchdog_interval():
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "10000000"}
    assert Notifier.from_env(env).watchdog_interval_s == pytest.approx(5.0)
    assert Notifier.from_env({**env, "WATCHDOG_PID": str(os.getpid())}).watchdog_interval_s == pytest.approx(5.0)
    assert Notifier.from_env({**env, "WATCHDOG_PID": str(os.getpid() + 1)}).watchdog_interval_s is None
    assert Notifier.from_env({**env, "WATCHDOG_PID": "junk"}).watchdog_interval_s is None
    assert Notifier.from_env({**env, "WATCHDOG_USEC": "abc"}).watchdog_interval_s is None
    assert Notifier.from_env({**env, "WATCHDOG_USEC": "0"}).watchdog_interval_s is None
    assert Notifier.from_env({"WATCHDOG_USEC": "3000000"}).watchdog_interval_s == pytest.approx(1.5)


# --- the shipped unit file -----------------------------------------------------------

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "linecam@.service"


def _directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_unit_declares_the_contract_linecam_implements():
    d = _directives(UNIT.read_text())
    assert d["Type"] == ["notify"] and d["NotifyAccess"] == ["main"]
    assert d["WatchdogSec"] == ["10"]
    assert d["Restart"] == ["on-failure"] and d["RestartSec"] == ["2"]
    assert d["StartLimitIntervalSec"] == ["60"] and d["StartLimitBurst"] == ["5"]
    assert d["ExecStart"] == ["/usr/bin/env linecam run --config /etc/linecam/%i.yaml"]
    assert d["DynamicUser"] == ["yes"] and d["StateDirectory"] == ["linecam/%i"]
    assert "LINECAM_STATE_DIR=%S/linecam/%i" in d["Environment"]
    assert d["CapabilityBoundingSet"] == [""]
    assert d["DevicePolicy"] == ["closed"]
    assert "PrivateDevices" not in d  # would hide the GPU and USB cameras


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unit_passes_systemd_analyze_verify(tmp_path):
    shutil.copy(UNIT, tmp_path / UNIT.name)
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{tmp_path}:", "SYSTEMD_LOG_COLOR": "0"}
    # Both the template file itself and an instance (which expands %i).
    for args in ([str(tmp_path / UNIT.name)], ["linecam@station1.service"]):
        proc = subprocess.run(
            ["systemd-analyze", "verify", *args], env=env, capture_output=True, text=True, timeout=60
        )
        output = proc.stdout + proc.stderr
        # systemd-analyze exits 0 on unknown keys / bad values and only prints them,
        # so any line about our unit is a failure, except a missing `linecam` binary.
        complaints = [
            line for line in output.splitlines()
            if "linecam@" in line and "is not executable" not in line
        ]
        assert complaints == [], output
        assert proc.returncode == 0 or "is not executable" in output, output
