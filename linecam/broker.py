"""A private mosquitto broker on a loopback port, for tests and ``linecam demo``.

    with MosquittoBroker() as broker:          # picks a free 127.0.0.1 port
        ...connect to broker.host, broker.port...
        broker.stop(); broker.start()          # same port again (fault tests)

The port is chosen when the object is made, so a client can be pointed at a broker
that is not running yet. Nothing is persisted; the log (broker + its stderr) is at
``log_path`` and its tail is in every start-up error.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from linecam.errors import LinecamError


class MosquittoNotFoundError(LinecamError):
    """The mosquitto binary is not installed."""


class BrokerStartError(LinecamError):
    """mosquitto did not start listening (bad config, port taken...)."""


def find_mosquitto() -> str:
    """Path of the mosquitto binary (``/usr/sbin`` is often not on a user's PATH)."""
    for candidate in ("/usr/sbin/mosquitto", shutil.which("mosquitto")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise MosquittoNotFoundError("mosquitto not found: apt-get install mosquitto")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class MosquittoBroker:
    """One mosquitto process with a generated config in its own temporary folder.

    ``extra_config`` lines go after the ``listener`` line, so per-listener options
    (``cafile``, ``certfile``, ``keyfile``, ``require_certificate``) apply to it, and
    global ones (``password_file``) work too. ``allow_anonymous=False`` plus a
    ``password_file`` line makes an authenticating broker.
    """

    def __init__(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        extra_config: Sequence[str] = (),
        allow_anonymous: bool = True,
        workdir: str | os.PathLike[str] | None = None,
        start_timeout: float = 10.0,
    ) -> None:
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.extra_config = list(extra_config)
        self.allow_anonymous = allow_anonymous
        self.start_timeout = start_timeout
        self._own_dir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="linecam-mosquitto-") if workdir is None else workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"
        self._proc: subprocess.Popen[bytes] | None = None

    # -- config ------------------------------------------------------------------------
    def _config_text(self) -> str:
        lines = [
            f"listener {self.port} {self.host}",
            f"allow_anonymous {'true' if self.allow_anonymous else 'false'}",
            "persistence false",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp true",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
            # Run as whoever we are: as root mosquitto would otherwise switch to the
            # 'mosquitto' user, which cannot write the log in our temp dir.
            f"user {pwd.getpwuid(os.geteuid()).pw_name}",
            *self.extra_config,
        ]
        return "\n".join(lines) + "\n"

    def log_tail(self, n: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return " | ".join(text.strip().splitlines()[-n:]) or "(empty log)"

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> MosquittoBroker:
        """Start (or restart, on the same port); returns once the port accepts connections."""
        if self.running:
            return self
        exe = find_mosquitto()
        self.config_path.write_text(self._config_text())
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [exe, "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in the terminal is for us, not the broker
            )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                rc = self._proc.returncode
                self._proc = None
                raise BrokerStartError(
                    f"mosquitto exited with code {rc} on {self.host}:{self.port}: {self.log_tail()}"
                )
            if _port_open(self.host, self.port):
                return self
            time.sleep(0.02)
        self.stop(kill=True)
        raise BrokerStartError(
            f"mosquitto did not listen on {self.host}:{self.port} within {self.start_timeout:.0f} s: {self.log_tail()}"
        )

    def stop(self, kill: bool = False, timeout: float = 5.0) -> None:
        """Stop the broker (SIGTERM; ``kill=True`` for SIGKILL, a crash). Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)

    def close(self) -> None:
        """Stop and remove the temporary folder (if we made it)."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MosquittoBroker({self.host}:{self.port}, running={self.running})"
