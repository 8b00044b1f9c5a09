"""Config: valid files load; every mistake names the key and the problem (exit code 2)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from linecam.config import GenICamCamera, SyntheticCamera, load_config
from linecam.errors import ConfigError

GOOD = """
line: line7
camera_id: cam2
camera:
  kind: synthetic
  fps: 30
  defect_rate: 0.1
model:
  bundle: bundles/expert
mqtt:
  host: 10.0.0.5
  port: 1884
runtime:
  queue_size: 4
"""


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "line.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def test_valid_config_and_relative_paths(tmp_path):
    cfg = load_config(_write(tmp_path, GOOD))
    assert cfg.line == "line7" and cfg.camera_id == "cam2"
    assert isinstance(cfg.camera, SyntheticCamera) and cfg.camera.fps == 30
    assert cfg.model.bundle == tmp_path / "bundles/expert"  # resolved against the config's folder
    assert cfg.mqtt.port == 1884 and cfg.runtime.queue_size == 4
    assert cfg.runtime.drop_policy == "drop_oldest"


def test_genicam_viky_kept_symbolic(tmp_path):
    cfg = load_config(_write(tmp_path, GOOD.replace("kind: synthetic\n  fps: 30\n  defect_rate: 0.1",
                                                     "kind: genicam\n  cti: viky\n  serial: '1'")))
    assert isinstance(cfg.camera, GenICamCamera) and cfg.camera.cti == "viky" and cfg.camera.serial == "1"


@pytest.mark.parametrize("text, expect", [
    (GOOD.replace("queue_size: 4", "queue_sise: 4"), "key 'runtime.queue_sise': unknown key"),
    (GOOD.replace("port: 1884", "port: many"), "key 'mqtt.port'"),
    (GOOD.replace("defect_rate: 0.1", "defect_rate: 3"), "key 'camera.synthetic.defect_rate'"),
    (GOOD.replace("  bundle: bundles/expert\n", "  backend: onnxruntime\n"), "key 'model.bundle': required key is missing"),
    (GOOD.replace("kind: synthetic", "kind: usb"), "key 'camera'"),
    (GOOD.replace("  kind: synthetic\n", ""), "missing 'kind'"),
    (GOOD.replace("line: line7", "line: line/7"), "key 'line'"),
    ("- just\n- a list\n", "top level must be a mapping"),
    ("camera: [unclosed\n", "YAML syntax error"),
])
def test_config_errors_name_the_key(tmp_path, text, expect):
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, text))
    msg = str(e.value)
    assert expect in msg, msg
    assert "\n" not in msg
    assert e.value.exit_code == 2


def test_yaml_error_has_line_number(tmp_path):
    with pytest.raises(ConfigError, match=r"line 3, column"):
        load_config(_write(tmp_path, "line: a\ncamera:\n  kind: synthetic: x\n"))


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")
