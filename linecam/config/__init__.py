"""Every setting of ``linecam run``: one pydantic model per config section, and the YAML loader.

The config owns its schema: runtime and camera modules import their settings from here,
never the other way round (this package imports nothing of linecam but :mod:`linecam.errors`).

* :mod:`~linecam.config.load` — the whole file (:class:`LinecamConfig`), ``load_config``;
* :mod:`~linecam.config.sections` — camera kinds, model, thresholds, runtime, output, metrics, VLM;
* :mod:`~linecam.config.mqtt`, :mod:`~linecam.config.spool`, :mod:`~linecam.config.linescan`.
"""

from __future__ import annotations

from linecam.config.linescan import (EncoderScale, EncoderSettings, GenICamLineScan, LineScanSettings,
                                     SyntheticWebCamera, WebDefectSpec, WebMapSettings)
from linecam.config.load import LinecamConfig, load_config, parse_config, state_dir
from linecam.config.mqtt import MqttSettings
from linecam.config.sections import (CameraConfig, GenICamCamera, MetricsConfig, ModelConfig, OutputConfig,
                                     ReplayCamera, RuntimeConfig, SyntheticCamera, ThresholdsConfig, VlmConfig)
from linecam.config.spool import SpoolSettings

__all__ = [
    "CameraConfig", "EncoderScale", "EncoderSettings", "GenICamCamera", "GenICamLineScan", "LineScanSettings",
    "LinecamConfig", "MetricsConfig", "ModelConfig", "MqttSettings", "OutputConfig", "ReplayCamera", "RuntimeConfig",
    "SpoolSettings", "SyntheticCamera", "SyntheticWebCamera", "ThresholdsConfig", "VlmConfig", "WebDefectSpec",
    "WebMapSettings", "load_config", "parse_config", "state_dir",
]
