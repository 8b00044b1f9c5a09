"""Replay recorded images or a video as if they came from a camera."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import cv2
import numpy as np

from linecam.camera.base import FrameSource, SourceExhausted
from linecam.camera.frame import Frame
from linecam.errors import CameraError
from linecam.preprocess import read_image

logger = logging.getLogger(__name__)

#: File suffixes read from an image folder (case-insensitive).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})


class Pacer:
    """Releases one frame per ``1/fps`` seconds of ``time.monotonic`` (``fps=None``: no pacing).

    The schedule is absolute (no drift from per-frame overhead); a consumer that
    falls behind gets the next frame at once but never a catch-up burst.
    """

    def __init__(self, fps: float | None) -> None:
        if fps is not None and not fps > 0:
            raise CameraError(f"fps must be a positive number (got {fps}): or leave it out for full speed")
        self.period = None if fps is None else 1.0 / float(fps)
        self._due: float | None = None

    def reset(self) -> None:
        self._due = None

    def wait(self, timeout: float) -> bool:
        """Sleep until the next frame is due; False if that is more than ``timeout`` away."""
        if self.period is None:
            return True
        now = time.monotonic()
        if self._due is None:
            self._due = now
        delay = self._due - now
        if delay > timeout:
            time.sleep(max(timeout, 0.0))
            return False
        if delay > 0:
            time.sleep(delay)
            now = self._due
        nxt = self._due + self.period
        if nxt <= now:  # more than a period late: re-anchor instead of bursting to catch up
            nxt = now + self.period
        self._due = nxt
        return True


def to_frame_layout(img: np.ndarray, bit_depth: int, grayscale: bool) -> tuple[np.ndarray, int]:
    """An RGB / mono image from ``read_image`` or VideoCapture into the Frame layout."""
    if grayscale and img.shape[2] == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)[:, :, None]
    elif img.shape[2] == 3 and img.dtype == np.uint16:
        # Frame colour images are 8-bit: keep the 8 most significant bits.
        img = (img >> 8).astype(np.uint8)
        bit_depth = 8
    return np.ascontiguousarray(img), bit_depth


class ReplaySource(FrameSource):
    """Frames from a folder of images (sorted by name), one image file, or a video file.

    Images keep their depth (16-bit PNG/TIFF -> ``uint16`` mono, ``bit_depth=16``;
    16-bit colour is reduced to 8 bits, the Frame colour layout). ``fps`` paces the
    frames with ``time.monotonic``; ``None`` replays as fast as they are read (a
    video's own frame rate is *not* imposed). ``loop`` starts over at the end,
    otherwise ``read`` raises :class:`SourceExhausted`. ``grayscale`` turns colour
    into ``(H, W, 1)``. ``frame_id`` counts from 0 across loops; ``meta`` has
    ``path`` (the image file, or the video), ``name`` (its file name), ``index``
    (position in the folder / video) and ``loop`` (completed passes).
    """

    def __init__(
        self,
        path: str | Path,
        fps: float | None = None,
        loop: bool = False,
        grayscale: bool = False,
    ) -> None:
        self.path = Path(path)
        self.fps = fps
        self.loop = loop
        self.grayscale = grayscale
        self.name = f"replay:{self.path.name}"
        self._pacer = Pacer(fps)
        self._files: list[Path] | None = None
        self._cap: cv2.VideoCapture | None = None
        self._opened = False
        self._pos = 0
        self._passes = 0
        self._next_id = 0
        #: a video file's own frame rate (informational; None for images)
        self.native_fps: float | None = None

    # --- open / close ---------------------------------------------------------------

    def open(self) -> None:
        if self._opened:
            return
        p = self.path
        if not p.exists():
            raise CameraError(f"replay path {p} does not exist: give a folder of images or a video file")
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise CameraError(
                    f"replay folder {p} has no images ({', '.join(sorted(IMAGE_SUFFIXES))}): "
                    "point it at the folder holding them"
                )
            self._files = files
        elif p.suffix.lower() in IMAGE_SUFFIXES:
            self._files = [p]
        else:
            self._cap = self._open_video()
            fps = self._cap.get(cv2.CAP_PROP_FPS)
            self.native_fps = float(fps) if fps and fps > 0 else None
        self._opened = True
        self._pos = 0
        self._passes = 0
        self._next_id = 0
        self._pacer.reset()
        logger.info(
            "replaying %s (%s)",
            p,
            f"{len(self._files)} images" if self._files is not None else f"video, {self.native_fps} fps",
        )

    def _open_video(self) -> cv2.VideoCapture:
        cap = cv2.VideoCapture(str(self.path))
        if not cap.isOpened():
            cap.release()
            raise CameraError(
                f"cannot open {self.path} as a video: use an image folder or a video OpenCV can decode"
            )
        return cap

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
        self._cap = None
        self._files = None
        self._opened = False

    # --- read -----------------------------------------------------------------------

    def read(self, timeout: float) -> Frame | None:
        if not self._opened:
            raise CameraError(f"{self.name} is not open: call open() first")
        if not self._pacer.wait(timeout):
            return None
        if self._files is not None:
            img, bit_depth, meta = self._next_image()
        else:
            img, bit_depth, meta = self._next_video_frame()
        host_ns = time.monotonic_ns()
        frame = Frame(
            frame_id=self._next_id,
            image=img,
            timestamp_ns=host_ns,
            clock="host_monotonic",
            host_ns=host_ns,
            bit_depth=bit_depth,
            meta=meta,
        )
        self._next_id += 1
        return frame

    def _wrap(self) -> None:
        if not self.loop:
            raise SourceExhausted(f"{self.path} has no more frames")
        self._pos = 0
        self._passes += 1

    def _next_image(self) -> tuple[np.ndarray, int, dict]:
        assert self._files is not None
        if self._pos >= len(self._files):
            self._wrap()
        f = self._files[self._pos]
        try:
            img, bit_depth = read_image(f)
        except ValueError as e:
            raise CameraError(f"cannot read replay image {f}: remove or replace the file ({e})") from e
        meta = {"path": str(f), "name": f.name, "index": self._pos, "loop": self._passes}
        self._pos += 1
        img, bit_depth = to_frame_layout(img, bit_depth, self.grayscale)
        return img, bit_depth, meta

    def _next_video_frame(self) -> tuple[np.ndarray, int, dict]:
        assert self._cap is not None
        ok, bgr = self._cap.read()
        if not ok:
            if self._pos == 0:
                raise CameraError(f"video {self.path} has no readable frames: check the file")
            self._wrap()
            # Reopening is more reliable than seeking back to 0 across codecs.
            self._cap.release()
            self._cap = self._open_video()
            ok, bgr = self._cap.read()
            if not ok:
                raise CameraError(f"video {self.path} cannot be re-read for looping: check the file")
        if bgr.ndim == 2:
            img = bgr[:, :, None]
        else:
            img = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        meta = {"path": str(self.path), "name": self.path.name, "index": self._pos, "loop": self._passes}
        self._pos += 1
        img, bit_depth = to_frame_layout(img, 8, self.grayscale)
        return img, bit_depth, meta
