"""Minimal ``sd_notify(3)`` client: tell systemd we are ready, alive, stopping.

Protocol: newline-separated ``KEY=value`` assignments in one datagram to the Unix
socket named by ``$NOTIFY_SOCKET`` (a leading ``@`` means the Linux abstract
namespace). Without ``$NOTIFY_SOCKET`` (not under systemd, or not ``Type=notify``)
every call is a no-op, so the daemon calls these unconditionally. Notification
must never take the daemon down: send errors are logged at debug level and ignored.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from collections.abc import Mapping
from pathlib import Path

logger = logging.getLogger(__name__)


def _address(raw: str) -> str | bytes:
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()  # abstract namespace
    return raw


class Notifier:
    """Sends service-manager notifications to ``address`` (None = disabled)."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self._raw_address = address or None
        self._address = _address(address) if address else None
        self._watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Notifier":
        """From ``$NOTIFY_SOCKET`` / ``$WATCHDOG_USEC`` / ``$WATCHDOG_PID``.

        The watchdog applies only when ``$WATCHDOG_PID`` is unset or is our pid
        (a child that inherited the environment must not pet the parent's watchdog).
        """
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        usec: int | None = None
        raw_usec = env.get("WATCHDOG_USEC")
        if raw_usec:
            try:
                usec = int(raw_usec)
            except ValueError:
                logger.debug("ignoring malformed WATCHDOG_USEC=%r", raw_usec)
            raw_pid = env.get("WATCHDOG_PID")
            if usec is not None and raw_pid:
                try:
                    if int(raw_pid) != os.getpid():
                        usec = None
                except ValueError:
                    logger.debug("ignoring malformed WATCHDOG_PID=%r", raw_pid)
                    usec = None
        return cls(address, usec)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to send ``WATCHDOG=1``: half the service's ``WatchdogSec``, or None."""
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def notify(self, state: str) -> bool:
        """Send ``state`` verbatim; True when it was handed to the socket."""
        if self._address is None:
            return False
        data = state.encode("utf-8", errors="replace")
        with self._lock:
            try:
                if self._sock is None:
                    # Python sockets are non-inheritable already (PEP 446): no CLOEXEC needed.
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.sendto(data, self._address)
                return True
            except OSError as exc:
                logger.debug("sd_notify to %s failed: %s", self._raw_address, exc)
                return False

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1" if status is None else f"READY=1\nSTATUS={_one_line(status)}")

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def __enter__(self) -> "Notifier":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _one_line(text: str) -> str:
    # A newline would start a new (bogus) assignment in the datagram.
    return " ".join(str(text).splitlines())


class NotifyListener:
    """The other end of ``$NOTIFY_SOCKET``: binds ``path`` and records every datagram with its
    arrival time, as systemd would see them. For tests, the soak benchmark, and checking a
    service integration by hand; the daemon never uses it.

    ``received`` holds (monotonic arrival time, datagram) pairs; ``ready`` is set on ``READY=1``.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.settimeout(0.05)
        self.received: list[tuple[float, str]] = []
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, name="notify-listener", daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self.sock.recv(4096).decode()
            except socket.timeout:
                continue
            self.received.append((time.monotonic(), msg))
            if "READY=1" in msg.split("\n"):
                self.ready.set()

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
        """Frames the daemon reported done in its latest ``STATUS=`` line."""
        for line in reversed(self.lines):
            m = re.search(r"STATUS=.* (\d+) frames,", line)
            if m:
                return int(m.group(1))
        return 0

    def close(self) -> None:
        self._stop.set()
        self._t.join()
        self.sock.close()
