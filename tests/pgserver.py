"""A private PostgreSQL server on a free loopback port, in a temporary folder (tests).

Uses the Debian package's binaries (/usr/lib/postgresql/<v>/bin). As root it runs them as
the ``postgres`` user (initdb refuses root). Trust authentication on 127.0.0.1 only.

    with PgServer() as pg:
        pg.url("linecam")   # postgresql://postgres@127.0.0.1:<port>/linecam (created)
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from linecam.broker import free_port


def find_pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


class PgServer:
    def __init__(self) -> None:
        bindir = find_pg_bin()
        if bindir is None:
            raise FileNotFoundError("PostgreSQL not installed: apt-get install postgresql")
        self.bin = bindir
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="linecam-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "pg.log"
        self._as_root = os.geteuid() == 0
        if self._as_root:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self._ids = (pw.pw_uid, pw.pw_gid)

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        def demote() -> None:
            if self._as_root:
                os.setgid(self._ids[1])
                os.setuid(self._ids[0])

        return subprocess.run([str(self.bin / args[0]), *args[1:]], check=check, capture_output=True, text=True,
                              preexec_fn=demote, cwd=self.dir, timeout=120)

    def start(self) -> PgServer:
        if not self.data.exists():
            self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8")
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        r = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w", "-t", "60", "start",
                      check=False)
        if r.returncode != 0:
            raise RuntimeError(f"postgres did not start: {r.stderr.strip()} {self.log.read_text()[-2000:]}")
        return self

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop", check=False)

    def createdb(self, name: str) -> None:
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name, check=False)

    def url(self, name: str = "linecam") -> str:
        self.createdb(name)
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PgServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_port_closed(port: int, timeout: float = 10.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        except OSError:
            return
        time.sleep(0.05)
