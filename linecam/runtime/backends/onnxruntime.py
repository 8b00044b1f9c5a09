"""ONNX Runtime (CPU) runner: the default backend, always available."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from linecam.bundle import Manifest
from linecam.errors import BundleError
from linecam.runtime.backends.base import ExpertOutput, Runner

logger = logging.getLogger(__name__)


class OrtRunner(Runner):
    name = "onnxruntime"

    def __init__(self, model_path: Path, manifest: Manifest, intra_op_threads: int = 0,
                 role: str = "onnx_fp32") -> None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        # One frame at a time: parallelism comes from worker threads, not inter-op scheduling.
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning intra-op threads burn a core between frames; on a small edge CPU that
        # core belongs to acquisition and publishing (measured: 15.7 -> 8.2 ms CPU per call).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._session = ort.InferenceSession(str(model_path), sess_options=opts,
                                                 providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BundleError(f"ONNX Runtime cannot load {model_path}: {first}; re-export the bundle") from None
        self.role = role
        self._input = manifest.input.name
        names = {o.name for o in self._session.get_outputs()}
        want = [manifest.outputs.anomaly_map.name, manifest.outputs.image_score.name]
        missing = [n for n in want if n not in names]
        if missing or self._input not in {i.name for i in self._session.get_inputs()}:
            raise BundleError(f"{model_path} does not match its manifest (missing tensors: "
                              f"{', '.join(missing) or self._input}); re-export the bundle")
        self._outputs = want
        logger.info("onnxruntime %s session on %s (%s)", ort.__version__, model_path.name, role)

    def run(self, x: np.ndarray) -> ExpertOutput:
        amap, score = self._session.run(self._outputs, {self._input: x})
        return ExpertOutput(anomaly_map=amap.reshape(amap.shape[-2:]), score=float(score.reshape(-1)[0]))
