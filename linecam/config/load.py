"""The daemon's YAML config, validated with pydantic: the whole file (:class:`LinecamConfig`)
and its loader.

One file per camera (``/etc/linecam/<instance>.yaml`` under systemd). Unknown keys
are errors: a typo in a hand-edited config must not silently fall back to a default.
Paths may use ``~`` and ``$VARIABLES`` (e.g. ``$CREDENTIALS_DIRECTORY/mqtt-password``);
relative ones are resolved against the config file's folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator

from linecam.config.linescan import LineScanSettings
from linecam.config.mqtt import MqttSettings
from linecam.config.sections import (CameraConfig, GenICamCamera, MetricsConfig, ModelConfig, OutputConfig,
                                     ReplayCamera, RuntimeConfig, StrictModel, ThresholdsConfig, VlmConfig)
from linecam.config.spool import SpoolSettings
from linecam.errors import ConfigError

_ID = r"^[A-Za-z0-9_.-]+$"  # safe inside an MQTT topic level and a file name


class LinecamConfig(StrictModel):
    line: Annotated[str, Field(pattern=_ID)] = "line1"
    camera_id: Annotated[str, Field(pattern=_ID)] = "cam0"
    camera: CameraConfig
    model: ModelConfig
    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    thresholds: ThresholdsConfig = Field(default_factory=ThresholdsConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    spool: SpoolSettings = Field(default_factory=SpoolSettings)
    #: Line-scan mode: tiles, overlap, mm positions, web gaps, web map (linecam.runtime.linescan).
    linescan: LineScanSettings = Field(default_factory=LineScanSettings)
    vlm: VlmConfig = Field(default_factory=VlmConfig)
    #: Prometheus /metrics (linecam.runtime.prometheus).
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("camera", mode="before")
    @classmethod
    def _camera_kind_first(cls, v: Any) -> Any:
        if isinstance(v, dict) and "kind" not in v:
            raise ValueError("missing 'kind' (one of: genicam, replay, synthetic, synthetic_web)")
        return v

    def snapshots_dir(self) -> Path:
        if self.output.snapshots_dir is not None:
            return self.output.snapshots_dir.absolute()  # event snapshot paths: usable by a subscriber
        return state_dir() / "snapshots"

    def spool_settings(self) -> SpoolSettings:
        """The spool section with its path filled in: one spool per line/camera, so two
        daemons sharing a state directory never re-send each other's messages."""
        if self.spool.path is not None:
            return self.spool
        return self.spool.model_copy(update={"path": state_dir() / f"spool-{self.line}-{self.camera_id}.db"})


def state_dir() -> Path:
    """Where the spool, snapshots and web maps go unless the config says otherwise; absolute,
    whatever the working directory: ``$LINECAM_STATE_DIR`` (the systemd unit sets it to its
    StateDirectory), else ``$STATE_DIRECTORY`` (systemd's own variable, first entry), else
    ``$XDG_STATE_HOME/linecam``, else ``~/.local/state/linecam``."""
    state = os.environ.get("LINECAM_STATE_DIR")
    if not state and os.environ.get("STATE_DIRECTORY"):
        state = os.environ["STATE_DIRECTORY"].split(":")[0]
    if not state:
        xdg = os.environ.get("XDG_STATE_HOME")
        base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".local" / "state"
        return (base / "linecam").absolute()
    return Path(state).expanduser().absolute()


def _printable(text: str) -> str:
    """One line: a key with a newline or a control character in it must not break the message."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def _format_error(path: Path, err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if not str(p).startswith("function-"))
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key (check the spelling; see the README's config reference)"
    elif first["type"] == "missing":
        msg = "required key is missing"
    more = err.error_count() - 1
    tail = f" (+{more} more problem{'s' if more > 1 else ''})" if more else ""
    return _printable(f"{path}: key '{loc or '(top level)'}': {msg}{tail}")


def _resolve_paths(cfg: LinecamConfig, base: Path) -> LinecamConfig:
    def fix(p: Path | None) -> Path | None:
        if p is None:
            return None
        # $VARIABLES too: systemd hands credentials over in $CREDENTIALS_DIRECTORY.
        p = Path(os.path.expandvars(str(p))).expanduser()
        return p if p.is_absolute() else (base / p)

    cfg.model.bundle = fix(cfg.model.bundle)  # type: ignore[assignment]
    cfg.output.snapshots_dir = fix(cfg.output.snapshots_dir)
    cfg.spool.path = fix(cfg.spool.path)
    cfg.linescan.web_map.dir = fix(cfg.linescan.web_map.dir)
    cfg.vlm.bundle = fix(cfg.vlm.bundle)
    if isinstance(cfg.camera, ReplayCamera):
        cfg.camera.path = fix(cfg.camera.path)  # type: ignore[assignment]
    if isinstance(cfg.camera, GenICamCamera) and cfg.camera.cti != "viky":
        cfg.camera.cti = str(fix(Path(cfg.camera.cti)))
    for name in ("password_file", "ca_file", "cert_file", "key_file"):
        if getattr(cfg.mqtt, name, None) is not None:
            setattr(cfg.mqtt, name, fix(getattr(cfg.mqtt, name)))
    return cfg


def parse_config(data: Any, source: Path, base: Path | None = None) -> LinecamConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys (camera:, model:, mqtt: ...)")
    try:
        cfg = LinecamConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(source, e)) from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to be a linecam config: check the file") from None
    return _resolve_paths(cfg, base if base is not None else source.parent)


def load_config(path: str | Path) -> LinecamConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found: pass --config with the path to your YAML file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(_printable(f"cannot read config file {path}: {e}")) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(_printable(f"{path}{where}: YAML syntax error: {problem}")) from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a linecam config: check the file") from None
    return parse_config(data, path)
