"""ONNX Runtime runner, on the CPU (the default backend, always available) or on the GPU
through the CUDA execution provider (``onnxruntime-gpu``; JetPack's own build on Jetson).

One runner for both: the only difference is the provider list handed to the session
factory (:mod:`linecam.runtime.session`). ``InferenceSession.run`` is thread-safe, so one
session serves every worker thread.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from linecam.bundle import Manifest
from linecam.errors import BundleError
from linecam.runtime.backends.base import ExpertOutput, Runner
from linecam.runtime.device import BackendUnavailable
from linecam.runtime.session import CPU, CPU_EP, CUDA_EP, make_session

logger = logging.getLogger(__name__)

ORT_GPU_HINT = ("install the GPU build: pip uninstall onnxruntime && pip install onnxruntime-gpu "
                "(on Jetson: the onnxruntime-gpu wheel built for your JetPack)")


def ort_cuda_missing_message() -> str:
    return (f"backend 'onnxruntime-cuda' needs ONNX Runtime's {CUDA_EP}, which this onnxruntime "
            f"{ort.__version__} does not have (it has: {', '.join(ort.get_available_providers())}): "
            f"{ORT_GPU_HINT}; or set model.backend: onnxruntime")


def cuda_providers(device_id: int = 0) -> list[Any]:
    """The provider list of a CUDA session (CPU for the ops CUDA does not have)."""
    return [(CUDA_EP, {"device_id": device_id}), CPU_EP]


class OrtRunner(Runner):
    """The region expert on ONNX Runtime; ``providers`` picks CPU (default) or CUDA."""

    name = "onnxruntime"

    def __init__(self, model_path: Path, manifest: Manifest, intra_op_threads: int = 0,
                 role: str = "onnx_fp32", providers: Sequence[Any] = CPU) -> None:
        cuda = any((p[0] if isinstance(p, tuple) else p) == CUDA_EP for p in providers)
        if cuda:
            self.name = "onnxruntime-cuda"
            if CUDA_EP not in ort.get_available_providers():
                raise BackendUnavailable(ort_cuda_missing_message())
        self._session = make_session(model_path, providers=providers, intra_op_threads=intra_op_threads)
        # onnxruntime-gpu without a usable GPU/driver silently falls back to CPU: say so instead.
        if cuda and CUDA_EP not in self._session.get_providers():
            raise BackendUnavailable(f"ONNX Runtime could not start {CUDA_EP} (no GPU, or CUDA/cuDNN libraries "
                                     f"missing; see the log): fix the CUDA install or set model.backend: onnxruntime")
        self.role = role
        self._input = manifest.input.name
        names = {o.name for o in self._session.get_outputs()}
        want = [manifest.outputs.anomaly_map.name, manifest.outputs.image_score.name]
        missing = [n for n in want if n not in names]
        if missing or self._input not in {i.name for i in self._session.get_inputs()}:
            raise BundleError(f"{model_path} does not match its manifest (missing tensors: "
                              f"{', '.join(missing) or self._input}); re-export the bundle")
        self._outputs = want
        logger.info("onnxruntime %s session (%s) on %s (%s)", ort.__version__, self.name, Path(model_path).name, role)

    def run(self, x: np.ndarray) -> ExpertOutput:
        amap, score = self._session.run(self._outputs, {self._input: x})
        return ExpertOutput(anomaly_map=amap.reshape(amap.shape[-2:]), score=float(score.reshape(-1)[0]))
