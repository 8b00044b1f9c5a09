"""Workstation side: train, export and calibrate region experts (needs the ``export`` extra).

Importing this package does not import torch: the heavy modules load on first use,
so ``export-engine --help`` is instant and numpy-only helpers stay usable without it.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {
    "fit_scratch_expert": "linecam.export.scratch",
    "ScratchExpert": "linecam.export.scratch",
    "export_onnx": "linecam.export.onnx_export",
    "synthesize": "linecam.export.anomalies",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'linecam.export' has no attribute {name!r}")
    return getattr(import_module(module), name)
