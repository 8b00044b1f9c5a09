"""The frame-source interface (GenICam, replay, synthetic all implement it)."""

from __future__ import annotations

import abc
from types import TracebackType

from linecam.camera.frame import Frame


class SourceExhausted(Exception):
    """A finite source (replay without looping, a frame budget) has no more frames."""


class FrameSource(abc.ABC):
    """A camera-like thing that yields :class:`Frame` objects.

    Usage::

        with source:                      # open() / close()
            frame = source.read(timeout=2.0)   # None on timeout

    ``read`` never blocks longer than ``timeout`` seconds. It returns ``None`` on
    a timeout, raises :class:`SourceExhausted` when a finite source ends, and
    :class:`linecam.errors.CameraError` (one line, says what to do) on a fault
    such as an unplugged camera. ``read`` is called from one thread only.
    """

    #: Short human name used in logs and status messages, e.g. ``genicam:0``.
    name: str = "source"

    @abc.abstractmethod
    def open(self) -> None: ...

    @abc.abstractmethod
    def read(self, timeout: float) -> Frame | None: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> "FrameSource":
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
