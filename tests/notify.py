"""A stand-in for systemd's NOTIFY_SOCKET: records every sd_notify datagram with its arrival time."""

from __future__ import annotations

import re
import socket
import threading
import time
from pathlib import Path


class NotifyListener:
    """Binds ``path``; ``received`` holds (monotonic arrival time, datagram) pairs."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.path = path
        self.received: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self.sock.recv(4096).decode()
            except socket.timeout:
                continue
            self.received.append((time.monotonic(), msg))

    @property
    def lines(self) -> list[str]:
        return [m for _, m in self.received]

    @property
    def times(self) -> list[float]:
        """Arrival times of the watchdog keep-alives (``WATCHDOG=1``)."""
        return [t for t, m in self.received if m == "WATCHDOG=1"]

    def between(self, t0: float, t1: float) -> list[float]:
        return [t for t in self.times if t0 <= t <= t1]

    def max_gap(self) -> float:
        times = self.times
        return max(b - a for a, b in zip(times, times[1:]))

    def frames(self) -> int:
        """Frames the daemon reported done in its latest STATUS= line."""
        for line in reversed(self.lines):
            m = re.search(r"STATUS=.* (\d+) frames,", line)
            if m:
                return int(m.group(1))
        return 0

    def close(self) -> None:
        self._stop.set()
        self._t.join()
        self.sock.close()
