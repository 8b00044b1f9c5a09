"""The runner interface every region-expert backend implements."""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np


@dataclass(slots=True)
class ExpertOutput:
    #: (h, w) float32 anomaly map at model resolution (raw units).
    anomaly_map: np.ndarray
    #: Image-level raw score.
    score: float
    #: (K, h, w) named per-prompt maps (the manifest's ``outputs.label_maps``), or None.
    label_maps: np.ndarray | None = None


class Runner(abc.ABC):
    """Runs the region expert on one preprocessed NCHW float32 input.

    ``run`` must be safe to call from several worker threads at once.
    """

    name: str = "runner"
    #: Bundle role of the model file, e.g. "onnx_fp32".
    role: str = ""
    #: True when ``run`` returns views of buffers the next call overwrites (keep a copy to hold
    #: a result past it). ONNX Runtime's ``run`` and the TensorRT runner return fresh arrays.
    reuses_buffers: bool = False

    @abc.abstractmethod
    def run(self, x: np.ndarray) -> ExpertOutput: ...

    def close(self) -> None:  # pragma: no cover - backends with device memory override
        pass
