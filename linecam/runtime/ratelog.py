"""Warnings that repeat at most once per interval (a bad camera setting hits every frame)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any


class RateLimitedLog:
    """``warn(kind, every_s, fmt, *args)`` logs at most once per ``every_s`` per kind; thread-safe."""

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def warn(self, kind: str, every_s: float, fmt: str, *args: Any) -> bool:
        """True when this call logged."""
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(kind, -1e18) < every_s:
                return False
            self._last[kind] = now
        self._logger.warning(fmt, *args)
        return True
