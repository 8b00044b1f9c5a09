"""The one way linecam builds an ONNX Runtime session.

Every runner (CPU and CUDA), the export side's accuracy gate and quantizer, the VLM engine
and the benchmarks open their models here, so that what the benchmark calls the model's
ceiling and what the daemon runs share one set of session options (threads, graph
optimisation, no spinning).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnxruntime as ort

from linecam.errors import BundleError

logger = logging.getLogger(__name__)

CPU_EP = "CPUExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"
#: Provider list of a CPU session.
CPU: tuple[str, ...] = (CPU_EP,)


def session_options(intra_op_threads: int = 0, *, log_severity_level: int | None = None) -> ort.SessionOptions:
    """The options every linecam session uses; only the thread count varies.

    ``intra_op_threads``: ONNX Runtime's threads inside one call (0 = its default, one per core).
    """
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(intra_op_threads)
    # One call at a time per caller: parallelism comes from worker threads, not inter-op scheduling.
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning intra-op threads burn a core between calls; on a small edge CPU that core
    # belongs to acquisition and publishing (measured: 15.7 -> 8.2 ms CPU per call).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if log_severity_level is not None:
        opts.log_severity_level = int(log_severity_level)
    return opts


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def make_session(path: str | Path, *, providers: Sequence[Any] = CPU, intra_op_threads: int = 0,
                 log_severity_level: int | None = None, hint: str = "re-export the bundle") -> ort.InferenceSession:
    """An ``InferenceSession`` on ``path`` with :func:`session_options`.

    ``providers``: ONNX Runtime's provider list (names or ``(name, options)`` pairs).
    A model ONNX Runtime cannot load is a :class:`BundleError` naming the file; ``hint``
    says what to do about it.
    """
    opts = session_options(intra_op_threads, log_severity_level=log_severity_level)
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=list(providers))
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
        raise BundleError(f"ONNX Runtime cannot load {path}: {_first_line(e)}; {hint}") from None


__all__ = ["CPU", "CPU_EP", "CUDA_EP", "make_session", "session_options"]
