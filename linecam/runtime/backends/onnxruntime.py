"""ONNX Runtime runner, on the CPU (the default backend, always available) or on the GPU
through the CUDA execution provider (``onnxruntime-gpu``; JetPack's own build on Jetson).

On the CPU each worker thread runs through its own IOBinding with preallocated outputs, so a
frame allocates no output arrays: the map :meth:`OrtRunner.run` returns is that thread's
buffer until its next call (``reuses_buffers``; the daemon copies NG maps it keeps).

One runner for both: the only difference is the provider list handed to the session
factory (:mod:`linecam.runtime.session`). ``InferenceSession.run`` is thread-safe, so one
session serves every worker thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
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


@dataclass(slots=True)
class _Binding:
    shape: tuple[int, ...]
    io: Any  # ort.IOBinding
    amap: np.ndarray  # (h, w) view of the bound map output
    score: np.ndarray  # flat view of the bound score output
    map_buffer: np.ndarray  # keeps the bound memory alive
    input_ptr: int
    input_ref: np.ndarray | None  # keeps the bound input alive
    label_maps: np.ndarray | None = None  # (K, h, w) view of the bound per-prompt maps, if any


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
        if manifest.outputs.label_maps is not None:  # the text expert's named prompts
            want.append(manifest.outputs.label_maps.name)
        missing = [n for n in want if n not in names]
        if missing or self._input not in {i.name for i in self._session.get_inputs()}:
            raise BundleError(f"{model_path} does not match its manifest (missing tensors: "
                              f"{', '.join(missing) or self._input}); re-export the bundle")
        self._outputs = want
        self._cuda = cuda
        #: Per worker thread: its IOBinding and output buffers (one session serves every thread).
        self._local = threading.local()
        # The map returned by run() is this thread's output buffer, rewritten by its next call.
        self.reuses_buffers = not cuda
        logger.info("onnxruntime %s session (%s) on %s (%s)", ort.__version__, self.name, Path(model_path).name, role)

    def run(self, x: np.ndarray) -> ExpertOutput:
        if self._cuda:
            amap, score, *named = self._session.run(self._outputs, {self._input: x})
            return ExpertOutput(anomaly_map=amap.reshape(amap.shape[-2:]), score=float(score.reshape(-1)[0]),
                                label_maps=named[0].reshape(named[0].shape[-3:]) if named else None)
        b = getattr(self._local, "binding", None)
        if b is None or b.shape != x.shape:
            b = self._local.binding = self._bind(x)
        if not x.flags.c_contiguous or x.dtype != np.float32:
            x = np.ascontiguousarray(x, dtype=np.float32)
        if b.input_ptr != x.ctypes.data:  # the preprocessor's buffer is the same every frame: bound once
            b.io.bind_cpu_input(self._input, x)
            b.input_ptr, b.input_ref = x.ctypes.data, x
        self._session.run_with_iobinding(b.io)
        return ExpertOutput(anomaly_map=b.amap, score=float(b.score[0]), label_maps=b.label_maps)

    def _bind(self, x: np.ndarray) -> _Binding:
        """This thread's IOBinding for inputs shaped like ``x``: outputs written into arrays
        allocated once (ORT otherwise allocates the map, 256 KB at 256x256, on every call)."""
        first = self._session.run(self._outputs, {self._input: x})  # learns the output shapes
        io = self._session.io_binding()
        bufs = [np.empty(a.shape, np.float32) for a in first]
        for name, arr in zip(self._outputs, bufs):
            io.bind_output(name, "cpu", 0, np.float32, list(arr.shape), arr.ctypes.data)
        out_map, out_score = bufs[0], bufs[1]
        named = bufs[2].reshape(bufs[2].shape[-3:]) if len(bufs) > 2 else None
        return _Binding(x.shape, io, out_map.reshape(out_map.shape[-2:]), out_score.reshape(-1), out_map, -1, None,
                        named)
