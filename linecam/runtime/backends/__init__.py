"""Inference backends: one small runner per backend behind :class:`Runner`.

ONNX Runtime (CPU) is the embedded default and always works; ``onnxruntime-cuda`` and
``tensorrt`` run on an NVIDIA GPU, and ``auto`` picks the best one this machine and
bundle allow (see :mod:`linecam.runtime.backends.select`).
"""

from __future__ import annotations

from linecam.runtime.backends.base import ExpertOutput, Runner


def make_runner(bundle, backend: str = "onnxruntime", precision: str | None = None,
                intra_op_threads: int = 0, *, workers: int = 1, cuda_graph: bool = False,
                facts=None) -> Runner:
    """Build the runner for ``bundle`` (a :class:`linecam.bundle.Bundle`).

    ``workers``: inference threads that will call ``run`` (TensorRT gives each its own
    execution context and CUDA stream). ``cuda_graph``: TensorRT replays a CUDA graph.
    ``facts``: :class:`linecam.runtime.device.DeviceFacts` (probed when None; tests inject them).
    """
    if backend == "onnxruntime":
        # The embedded default: no device probing, nothing but onnxruntime imported.
        from linecam.runtime.backends.onnxruntime import OrtRunner

        role = bundle.pick("onnxruntime", precision)
        return OrtRunner(bundle.path(role), bundle.manifest, intra_op_threads=intra_op_threads, role=role)
    from linecam.runtime.backends.select import choose_backend, open_runner
    from linecam.runtime.device import probe_device

    if facts is None:
        facts = probe_device()
    choice = choose_backend(bundle, backend, precision, facts)
    return open_runner(bundle, choice, intra_op_threads=intra_op_threads, workers=workers,
                       cuda_graph=cuda_graph, auto=backend == "auto")


__all__ = ["ExpertOutput", "Runner", "make_runner"]
