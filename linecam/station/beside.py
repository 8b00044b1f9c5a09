"""The operator station beside a line on one machine (``linecam demo --view``): ``linecam record``
into an SQLite file and ``linecam view`` on a local port, each its own process, like on a plant PC."""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from linecam.errors import LinecamError


class StationBeside:
    def __init__(self, broker_port: int, workdir: Path, http_port: int = 8080, vlm_bundle: Path | None = None) -> None:
        self.broker_port, self.workdir, self.http_port = broker_port, workdir, http_port
        self.vlm_bundle = vlm_bundle
        self.db = str((workdir / "record.db").resolve())
        self.url = f"http://127.0.0.1:{http_port}/"
        self._procs: list[subprocess.Popen[bytes]] = []

    def _spawn(self, *args: str, log: str) -> subprocess.Popen[bytes]:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        p = subprocess.Popen([sys.executable, "-m", "linecam", *args], stdout=subprocess.DEVNULL,
                             stderr=open(self.workdir / log, "w"), env=env)
        self._procs.append(p)
        return p

    def start(self, timeout: float = 30.0) -> StationBeside:
        atexit.register(self.close)
        from linecam.station.store import open_store

        open_store(self.db).close()  # schema in place before the view opens it read-only
        self._spawn("record", "--db", self.db, "--port", str(self.broker_port), "--group", "",
                    "--client-id", f"linecam-demo-record-{os.getpid()}", log="record.log")
        extra = ["--vlm-bundle", str(self.vlm_bundle), "--vlm-precision", "fp32"] if self.vlm_bundle else []
        view = self._spawn("view", "--port", str(self.broker_port), "--http-port", str(self.http_port), "--db",
                           self.db, "--title", "linecam demo line", *extra, log="view.log")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if view.poll() is not None:
                tail = (self.workdir / "view.log").read_text(errors="replace").strip().splitlines()[-1:]
                self.close()
                raise LinecamError(f"linecam view did not start: {' '.join(tail)} (try --view-port)")
            try:
                urllib.request.urlopen(self.url, timeout=1).read()
                return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        self.close()
        raise LinecamError(f"linecam view did not answer on {self.url} within {timeout:.0f} s")

    def linger(self, console: Any) -> None:
        """Keep the page up after the line stopped, until Ctrl-C."""
        console.print(f"[bold]the page stays at[/] {self.url} (history: linecam history --db {self.db}); "
                      "Ctrl-C to stop")
        try:
            while all(p.poll() is None for p in self._procs):
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        self.close()

    def close(self) -> None:
        for p in self._procs:
            if p.poll() is None:
                p.terminate()
        for p in self._procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        self._procs.clear()
