"""Inference backends: one small runner per backend behind :class:`Runner`.

ONNX Runtime (CPU) is the embedded default and always works; TensorRT joins later.
"""

from __future__ import annotations

from linecam.runtime.backends.base import ExpertOutput, Runner


def make_runner(bundle, backend: str = "onnxruntime", precision: str | None = None,
                intra_op_threads: int = 0) -> Runner:
    """Build the runner for ``bundle`` (a :class:`linecam.bundle.Bundle`)."""
    if backend == "onnxruntime":
        from linecam.runtime.backends.onnxruntime import OrtRunner

        role = bundle.pick("onnxruntime", precision)
        return OrtRunner(bundle.path(role), bundle.manifest, intra_op_threads=intra_op_threads, role=role)
    raise ValueError(f"unknown backend {backend!r}")


__all__ = ["ExpertOutput", "Runner", "make_runner"]
