"""A small fault-injecting TCP proxy between an MQTT client and a real broker (fault tests, `linecam bench faults`).

Modes (``proxy.mode = ...``, switchable at any time):

* ``pass``      — bytes flow both ways;
* ``blackhole`` — a network partition *without* a reset (a pulled cable, a dead switch port):
                  every byte either way is silently swallowed, sockets stay open, new
                  connections are accepted and swallowed too; only keep-alive can notice.
                  Going back to ``pass`` closes the black-holed connections (their TCP state
                  would be gone on a real network) so that clients reconnect;
* ``no_puback`` — the broker accepts PUBLISH packets but its PUBACKs never reach the client
                  (MQTT packets from the broker are parsed; everything else passes).

:meth:`cut` closes every connection at once without an MQTT DISCONNECT (an unclean drop:
the broker publishes the client's Will).
"""

from __future__ import annotations

import socket
import threading

_PUBACK = 0x40


def _split_packets(buf: bytearray) -> list[bytes]:
    """Whole MQTT packets at the start of ``buf`` (removed from it); a partial one stays."""
    out = []
    while len(buf) >= 2:
        mult, length, i = 1, 0, 1
        while True:
            if i >= len(buf):
                return out
            b = buf[i]
            length += (b & 0x7F) * mult
            mult *= 128
            i += 1
            if not b & 0x80:
                break
        if len(buf) < i + length:
            return out
        out.append(bytes(buf[: i + length]))
        del buf[: i + length]
    return out


class FaultProxy:
    def __init__(self, broker_port: int, host: str = "127.0.0.1") -> None:
        self.broker = (host, broker_port)
        self.mode = "pass"
        self.dropped_pubacks = 0
        self._lsock = socket.socket()
        self._lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._lsock.bind((host, 0))
        self._lsock.listen(16)
        self.host, self.port = self._lsock.getsockname()
        self._lock = threading.Lock()
        self._conns: list[tuple[socket.socket, socket.socket, list[str]]] = []
        self._closed = False
        threading.Thread(target=self._accept, name="faultproxy", daemon=True).start()

    def set_mode(self, mode: str) -> None:
        assert mode in ("pass", "blackhole", "no_puback"), mode
        prev, self.mode = self.mode, mode
        if prev == "blackhole" and mode != "blackhole":
            with self._lock:
                dead = [c for c in self._conns if c[2][0] == "blackholed"]
            for c in dead:
                self._close(c)

    def cut(self) -> None:
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            self._close(c)

    def close(self) -> None:
        self._closed = True
        try:
            self._lsock.close()
        except OSError:
            pass
        self.cut()

    # -- internals ----------------------------------------------------------------------
    def _close(self, conn) -> None:
        client, upstream, _ = conn
        for s in (client, upstream):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                s.close()
            except OSError:
                pass
        with self._lock:
            if conn in self._conns:
                self._conns.remove(conn)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._lsock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.broker, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            conn = (client, upstream, ["blackholed" if self.mode == "blackhole" else "live"])
            with self._lock:
                self._conns.append(conn)
            threading.Thread(target=self._pump, args=(conn, client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(conn, upstream, client, True), daemon=True).start()

    def _pump(self, conn, src: socket.socket, dst: socket.socket, from_broker: bool) -> None:
        buf = bytearray()
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if self.mode == "blackhole":
                    conn[2][0] = "blackholed"
                    continue
                if conn[2][0] == "blackholed":
                    continue  # a connection from the partition stays dead
                if from_broker and self.mode == "no_puback":
                    buf += data
                    keep = []
                    for p in _split_packets(buf):
                        if p[0] & 0xF0 == _PUBACK:
                            self.dropped_pubacks += 1
                        else:
                            keep.append(p)
                    data = b"".join(keep)
                elif from_broker and buf:  # left-over partial packet from no_puback mode
                    data, buf = bytes(buf) + data, bytearray()
                if data:
                    dst.sendall(data)
        except OSError:
            pass
        self._close(conn)
