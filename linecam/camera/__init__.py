"""Frame sources: GenICam cameras, replayed recordings, and a simulated production line.

All of them produce :class:`Frame` objects in one documented layout. The sources
are imported lazily (PEP 562), so ``import linecam.camera`` pulls in neither
harvesters nor OpenCV-heavy code until a source is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from linecam.camera.base import FrameSource, SourceExhausted
from linecam.camera.frame import Frame

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from linecam.camera.genicam import GenICamSource
    from linecam.camera.replay import ReplaySource
    from linecam.camera.synthetic import SyntheticLineSource

_LAZY = {
    "GenICamSource": "linecam.camera.genicam",
    "ReplaySource": "linecam.camera.replay",
    "SyntheticLineSource": "linecam.camera.synthetic",
}

__all__ = ["Frame", "FrameSource", "SourceExhausted", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
