"""Which frames the model may judge: the line's one frame size and pixel layout.

A frame the model must not judge (another size or pixel layout than the line's, a buffer
the source could not convert, too small for the bundle's crop) gets ``SKIPPED`` with reason
``wrong_frame_size`` / ``wrong_pixel_format`` and one line saying why.
"""

from __future__ import annotations

import numpy as np

from linecam.camera.frame import Frame
from linecam.preprocess import CropSpec


class FrameCheck:
    """The line's frame layout: size from the config or the first frame; layout (channels,
    dtype, bit depth) from the first frame. Used by the acquisition thread only."""

    def __init__(self, frame_size: tuple[int, int] | None, crop: CropSpec | None) -> None:
        self._frame_size = frame_size
        self._crop = crop
        self._frame_layout: tuple[int, str, int] | None = None
        self._last_ok: tuple | None = None  # (shape, dtype, bit depth) of the last frame that passed

    def problem(self, frame: Frame) -> tuple[str, str] | None:
        """(reason, one line) when the model must not judge this frame, else None."""
        invalid = frame.meta.get("invalid") if frame.meta else None
        if invalid:  # the source got a buffer it could not convert
            return "wrong_pixel_format", str(invalid)
        img = frame.image
        # Hot path: a frame exactly like the last accepted one needs no further checks.
        if (self._last_ok is not None and isinstance(img, np.ndarray)
                and (img.shape, img.dtype, frame.bit_depth) == self._last_ok):
            return None
        if (not isinstance(img, np.ndarray) or img.ndim != 3 or img.shape[2] not in (1, 3)
                or img.dtype not in (np.uint8, np.uint16) or not 1 <= frame.bit_depth <= img.dtype.itemsize * 8
                or (img.shape[2] == 3 and img.dtype != np.uint8) or 0 in img.shape):
            what = (f"{img.shape} {img.dtype}, bit_depth {frame.bit_depth}" if isinstance(img, np.ndarray)
                    else type(img).__name__)
            return "wrong_pixel_format", (f"image {what} is not (H, W, 1) uint8/uint16 or (H, W, 3) uint8: "
                                          "check the camera's pixel_format")
        layout = (int(img.shape[2]), str(img.dtype), int(frame.bit_depth))
        if self._frame_layout is None:
            self._frame_layout = layout
        elif layout != self._frame_layout:
            c, d, b = self._frame_layout
            return "wrong_pixel_format", (f"{img.shape[2]} channel(s) {img.dtype} {frame.bit_depth}-bit, but this "
                                          f"line started with {c} channel(s) {d} {b}-bit: was the camera's "
                                          "PixelFormat changed? restart linecam after a deliberate change")
        h, w = int(img.shape[0]), int(img.shape[1])
        if self._frame_size is None:
            self._frame_size = (w, h)
        if (w, h) != self._frame_size:
            ew, eh = self._frame_size
            return "wrong_frame_size", (f"{w}x{h}, but this line expects {ew}x{eh} (runtime.frame_size or the "
                                        "first frame): was the camera's ROI changed?")
        crop = self._crop
        if crop is not None and (crop.left + crop.width > w or crop.top + crop.height > h):
            return "wrong_frame_size", (f"{w}x{h} is too small for the bundle's crop {crop.width}x{crop.height} at "
                                        f"({crop.left}, {crop.top}): use the camera ROI the model was made for")
        self._last_ok = (img.shape, img.dtype, frame.bit_depth)
        return None
