"""The one frame type every source produces and the runtime consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

Clock = Literal["device", "host_monotonic", "host_realtime"]


@dataclass(slots=True)
class Frame:
    """One image from a source, in linecam's single documented layout.

    ``image`` layout (whatever the camera's pixel format was):
      * colour: ``(H, W, 3)`` ``uint8``, **RGB** order, C-contiguous;
      * mono:   ``(H, W, 1)`` ``uint8`` (8-bit) or ``uint16`` (10/12/16-bit, values
        ``0 .. 2**bit_depth - 1``, not shifted).

    ``timestamp_ns`` is in the clock named by ``clock`` (the camera's own clock when
    it has one, else host monotonic). ``host_ns`` is always ``time.monotonic_ns()``
    when the frame became available on the host: end-to-end latency is measured
    from it, so it is comparable across sources.
    """

    frame_id: int
    image: np.ndarray
    timestamp_ns: int
    clock: Clock
    host_ns: int
    bit_depth: int = 8
    #: Ground truth where the source knows it (synthetic line): True = defective part.
    truth: bool | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])
