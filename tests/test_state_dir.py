"""The state dir (spool, snapshots, web maps) never depends on the working directory (issue 21)."""

from __future__ import annotations

from pathlib import Path

from linecam.config import parse_config, state_dir

MIN = {"camera": {"kind": "synthetic"}, "model": {"bundle": "b"}, "mqtt": {"host": "127.0.0.1"}}


def _clear(monkeypatch):
    for var in ("LINECAM_STATE_DIR", "STATE_DIRECTORY", "XDG_STATE_HOME"):
        monkeypatch.delenv(var, raising=False)


def test_default_is_absolute_and_the_same_from_any_folder(monkeypatch, tmp_path):
    _clear(monkeypatch)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    a = state_dir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert state_dir() == a == tmp_path / "home" / ".local" / "state" / "linecam"


def test_order_linecam_then_systemd_then_xdg(monkeypatch, tmp_path):
    _clear(monkeypatch)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert state_dir() == tmp_path / "xdg" / "linecam"
    monkeypatch.setenv("STATE_DIRECTORY", f"{tmp_path}/sd:{tmp_path}/other")
    assert state_dir() == tmp_path / "sd"
    monkeypatch.setenv("LINECAM_STATE_DIR", str(tmp_path / "mine"))
    assert state_dir() == tmp_path / "mine"


def test_spool_and_snapshot_paths_are_absolute(monkeypatch, tmp_path):
    _clear(monkeypatch)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    cfg = parse_config({**MIN, "line": "l1", "camera_id": "c1"}, Path("line.yaml"))
    assert cfg.spool_settings().path == tmp_path / "home/.local/state/linecam/spool-l1-c1.db"
    assert cfg.snapshots_dir().is_absolute()
    cfg = parse_config({**MIN, "output": {"snapshots_dir": "snaps"}}, Path("line.yaml"))
    assert cfg.snapshots_dir() == tmp_path / "snaps"  # relative to the config file, made absolute


def test_demo_spools_in_its_work_dir(tmp_path):
    from linecam.demo import demo_config

    cfg = demo_config(tmp_path / "bundle", 1883, "synthetic", 10, 10.0, tmp_path / "work" / "snapshots")
    assert Path(cfg["spool"]["path"]).parent == (tmp_path / "work").resolve()
