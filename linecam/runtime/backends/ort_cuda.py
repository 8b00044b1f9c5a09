"""ONNX Runtime on the GPU (CUDA execution provider): the fallback when no TensorRT engine fits.

Needs the ``onnxruntime-gpu`` build (JetPack's own build on Jetson). ``InferenceSession.run``
is thread-safe, so one session serves every worker thread.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from linecam.bundle import Manifest
from linecam.errors import BundleError
from linecam.runtime.backends.base import ExpertOutput, Runner
from linecam.runtime.device import BackendUnavailable, first_line

logger = logging.getLogger(__name__)

CUDA_EP = "CUDAExecutionProvider"
ORT_GPU_HINT = ("install the GPU build: pip uninstall onnxruntime && pip install onnxruntime-gpu "
                "(on Jetson: the onnxruntime-gpu wheel built for your JetPack)")


def ort_cuda_missing_message() -> str:
    return (f"backend 'onnxruntime-cuda' needs ONNX Runtime's {CUDA_EP}, which this onnxruntime "
            f"{ort.__version__} does not have (it has: {', '.join(ort.get_available_providers())}): "
            f"{ORT_GPU_HINT}; or set model.backend: onnxruntime")


class OrtCudaRunner(Runner):
    name = "onnxruntime-cuda"

    def __init__(self, model_path: Path, manifest: Manifest, role: str = "onnx_fp32", device_id: int = 0) -> None:
        if CUDA_EP not in ort.get_available_providers():
            raise BackendUnavailable(ort_cuda_missing_message())
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.inter_op_num_threads = 1
        try:
            self._session = ort.InferenceSession(
                str(model_path), sess_options=opts,
                providers=[(CUDA_EP, {"device_id": device_id}), "CPUExecutionProvider"])
        except Exception as e:
            raise BundleError(f"ONNX Runtime (CUDA) cannot load {model_path}: {first_line(e)}; "
                              f"re-export the bundle") from None
        # onnxruntime-gpu without a usable GPU/driver silently falls back to CPU: say so instead.
        if CUDA_EP not in self._session.get_providers():
            raise BackendUnavailable(f"ONNX Runtime could not start {CUDA_EP} (no GPU, or CUDA/cuDNN libraries "
                                     f"missing; see the log): fix the CUDA install or set model.backend: onnxruntime")
        self.role = role
        self._input = manifest.input.name
        self._outputs = [manifest.outputs.anomaly_map.name, manifest.outputs.image_score.name]
        names = {o.name for o in self._session.get_outputs()}
        missing = [n for n in self._outputs if n not in names]
        if missing:
            raise BundleError(f"{model_path} does not match its manifest (missing tensors: {', '.join(missing)}); "
                              f"re-export the bundle")
        logger.info("onnxruntime %s CUDA session on %s (%s)", ort.__version__, Path(model_path).name, role)

    def run(self, x: np.ndarray) -> ExpertOutput:
        amap, score = self._session.run(self._outputs, {self._input: x})
        return ExpertOutput(anomaly_map=amap.reshape(amap.shape[-2:]), score=float(score.reshape(-1)[0]))
