"""The subscriber side: watch a line's verdicts, defects and status (``linecam events``).

    with subscribe("127.0.0.1", 1883, ng_only=True, timeout=60) as events:
        for ev in events:                    # Event(topic, type, payload, retained, received_mono_ns)
            print(ev.type, ev.payload["frame_id"])

:func:`subscribe` returns once the broker has confirmed the subscription, so what is
published after it returns is received. It yields :class:`Event` objects whose
``payload`` is the decoded (and, with ``validate=True``, schema-checked) message,
exactly as published. It survives broker restarts (paho reconnects and we
re-subscribe); a retained status is delivered on (re)subscribe with ``retained=True``.
"""

from __future__ import annotations

import json
import logging
import queue
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import click
import jsonschema
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from linecam import schemas
from linecam.errors import BrokerError, LinecamError
from linecam.paho_log import paho_logger

logger = logging.getLogger(__name__)

DEFAULT_TYPES: tuple[str, ...] = ("verdict", "defect", "status", "description", "web_defect", "web_gap")

#: Called with (topic, raw payload, why) for a message that is not JSON or not valid.
InvalidHandler = Callable[[str, bytes, str], None]


@dataclass(frozen=True, slots=True)
class Event:
    """One received message. ``payload`` is the JSON object as published."""

    topic: str
    type: str
    payload: dict[str, Any]
    retained: bool
    #: time.monotonic_ns() on receipt.
    received_mono_ns: int

    @property
    def latency_ms(self) -> float | None:
        """Publisher build -> receipt; meaningful only when both run on the same host."""
        sent = self.payload.get("mono_ns")
        return None if not isinstance(sent, int) else (self.received_mono_ns - sent) / 1e6


def _log_invalid(topic: str, raw: bytes, why: str) -> None:
    logger.warning("ignored invalid message on %s: %s", topic, why)


class Subscription(Iterator[Event]):
    """An open subscription; iterate it for :class:`Event` objects, ``close()`` when done.

    Iteration ends when ``timeout`` seconds (from subscribing) have passed, or never
    with ``timeout=None``.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 1883,
        prefix: str = "linecam/+/+",
        types: Sequence[str] = DEFAULT_TYPES,
        ng_only: bool = False,
        camera: str | None = None,
        timeout: float | None = None,
        *,
        validate: bool = True,
        username: str | None = None,
        password: str | None = None,
        tls: bool = False,
        ca_file: str | Path | None = None,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
        protocol: Literal["5", "3.1.1"] = "5",
        connect_timeout: float = 10.0,
        on_invalid: InvalidHandler | None = None,
    ) -> None:
        self.address = f"{host}:{port}"
        self.ng_only, self.camera, self.validate = ng_only, camera, validate
        self.on_invalid = on_invalid or _log_invalid
        p = prefix.rstrip("/")
        if not p or "#" in p:
            raise LinecamError(f"topic prefix {prefix!r} is empty or has '#': use '+' for one level, e.g. linecam/+/+")
        self.topic_filters = [f"{p}/{t}" for t in types]
        self.invalid = 0
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._q: queue.SimpleQueue[tuple[str, bytes, bool, int]] = queue.SimpleQueue()
        self._ready: queue.SimpleQueue[str | None] = queue.SimpleQueue()  # None = subscribed, str = error
        self._closed = False

        c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"linecam-events-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311,
        )
        c.enable_logger(paho_logger(f"{__name__}.paho"))
        c.reconnect_delay_set(1, 10)
        if username:
            c.username_pw_set(username, password)
        if tls:
            try:
                c.tls_set(
                    ca_certs=str(ca_file) if ca_file else None,
                    certfile=str(cert_file) if cert_file else None,
                    keyfile=str(key_file) if key_file else None,
                )
            except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
                raise LinecamError(f"cannot load the TLS files: {e}") from None
        c.on_connect = self._on_connect
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        self._client = c
        try:
            c.connect(host, port, keepalive=30)
        except OSError as e:
            raise LinecamError(
                f"cannot reach MQTT broker {self.address} ({e.strerror or e}): is it running? check --host / --port"
            ) from None
        c.loop_start()
        try:
            error = self._ready.get(timeout=connect_timeout)
        except queue.Empty:
            error = f"MQTT broker {self.address} did not confirm the subscription within {connect_timeout:.0f} s"
        if error is not None:
            self.close()
            raise BrokerError(error)

    # -- paho callbacks (network thread: keep them light) ----------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, props: Any) -> None:
        if reason_code.is_failure:
            client.disconnect()  # do not retry a refusal
            self._ready.put(
                f"MQTT broker {self.address} refused the connection ({reason_code}): check --username / password"
            )
            return
        client.subscribe([(t, 1) for t in self.topic_filters])

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        if all(getattr(rc, "is_failure", False) for rc in codes):
            self._ready.put(f"MQTT broker {self.address} refused the subscription to {self.topic_filters}: check ACLs")
        else:
            self._ready.put(None)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self._q.put((msg.topic, msg.payload, bool(msg.retain), time.monotonic_ns()))

    # -- iteration ------------------------------------------------------------------------
    def __iter__(self) -> Subscription:
        return self

    def __next__(self) -> Event:
        while True:
            if self._closed:
                raise StopIteration
            wait = 0.25 if self._deadline is None else min(0.25, self._deadline - time.monotonic())
            if wait <= 0:
                raise StopIteration
            try:
                topic, raw, retained, t_ns = self._q.get(timeout=wait)
            except queue.Empty:
                continue
            event = self._decode(topic, raw, retained, t_ns)
            if event is not None and self._wanted(event):
                return event

    def poll(self, timeout: float) -> Event | None:
        """The next wanted event, or ``None`` if none arrives within ``timeout`` seconds
        (for loops that must also watch something else, e.g. a daemon process)."""
        end = time.monotonic() + timeout
        while not self._closed:
            left = end - time.monotonic()
            if left <= 0:
                return None
            try:
                topic, raw, retained, t_ns = self._q.get(timeout=left)
            except queue.Empty:
                return None
            event = self._decode(topic, raw, retained, t_ns)
            if event is not None and self._wanted(event):
                return event
        return None

    def _decode(self, topic: str, raw: bytes, retained: bool, t_ns: int) -> Event | None:
        try:
            payload = json.loads(raw)
            if not isinstance(payload, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            self.invalid += 1
            self.on_invalid(topic, raw, f"not JSON: {e}")
            return None
        if self.validate:
            try:
                schemas.validate(payload)
            except jsonschema.ValidationError as e:
                self.invalid += 1
                where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
                self.on_invalid(topic, raw, f"{where}: {e.message}")
                return None
        kind = payload.get("type") or topic.rsplit("/", 1)[-1]
        return Event(topic, str(kind), payload, retained, t_ns)

    def _wanted(self, ev: Event) -> bool:
        if self.camera is not None and ev.payload.get("camera") != self.camera:
            return False
        if self.ng_only and ev.type == "verdict" and ev.payload.get("verdict") != "NG":
            return False
        return True

    # -- lifecycle ------------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def subscribe(
    host: str = "127.0.0.1",
    port: int = 1883,
    prefix: str = "linecam/+/+",
    types: Sequence[str] = DEFAULT_TYPES,
    ng_only: bool = False,
    camera: str | None = None,
    timeout: float | None = None,
    **kwargs: Any,
) -> Subscription:
    """Subscribe to ``<prefix>/<type>`` for each type; see :class:`Subscription` for the
    keyword options (validate, username, password, tls, ca_file, cert_file, key_file,
    protocol, connect_timeout, on_invalid). ``ng_only`` drops OK / SKIPPED verdicts
    (other types pass); ``camera`` keeps only that camera's messages."""
    return Subscription(host, port, prefix, types, ng_only, camera, timeout, **kwargs)


# -- presentation ---------------------------------------------------------------------------
_VERDICT_STYLE = {"OK": "green", "NG": "bold red", "SKIPPED": "yellow"}


class EventTable:
    """The live view: the latest verdicts (snapshot filled in when the defect arrives),
    per-camera status and running counts. ``add(event)`` then ``render()``."""

    def __init__(self, rows: int = 20) -> None:
        self.max_rows = rows
        self._rows: OrderedDict[str, dict[str, Any]] = OrderedDict()  # verdict event_id -> row
        self._status: dict[str, str] = {}
        self._by_defect: dict[str, str] = {}  # defect event_id -> verdict event_id (to place descriptions)
        self.counts = {"OK": 0, "NG": 0, "SKIPPED": 0}
        self._web: deque[tuple[str, dict[str, Any]]] = deque(maxlen=rows)  # line-scan: web defects and gaps

    def add(self, ev: Event) -> None:
        p = ev.payload
        cam = f"{p.get('line')}/{p.get('camera')}"
        if ev.type == "verdict":
            v = str(p.get("verdict"))
            self.counts[v] = self.counts.get(v, 0) + 1
            self._rows[str(p.get("event_id"))] = {"cam": cam, "p": p, "snapshot": None, "desc": None}
            while len(self._rows) > self.max_rows:
                self._rows.popitem(last=False)
            while len(self._by_defect) > 4 * self.max_rows:
                self._by_defect.pop(next(iter(self._by_defect)))
        elif ev.type == "defect":
            row = self._rows.get(str(p.get("verdict_event_id")))
            if row is not None:
                row["snapshot"] = p.get("snapshot") or "-"
                self._by_defect[str(p.get("event_id"))] = str(p.get("verdict_event_id"))
        elif ev.type == "description":
            # Joined on the defect's event id: the description shows under its defect's verdict.
            row = self._rows.get(self._by_defect.get(str(p.get("defect_event_id")), ""))
            if row is not None:
                row["desc"] = p.get("text") if p.get("status") == "ok" else f"({p.get('status')}: {p.get('reason')})"
        elif ev.type in ("web_defect", "web_gap"):
            self._web.append((cam, p))
        elif ev.type == "status":
            online = "online" if p.get("online") else "OFFLINE"
            detail = f" ({p['detail']})" if p.get("detail") else ""
            self._status[cam] = f"{cam}: {p.get('state')}, {online}, camera {p.get('camera_state')}{detail}"

    def render(self) -> Any:
        from rich.table import Table

        t = Table(
            title=" | ".join(self._status.values()) or "waiting for status...",
            caption="  ".join(f"{k} {n}" for k, n in self.counts.items()),
            expand=False,
        )
        for col, just in (("camera", "left"), ("frame", "right"), ("verdict", "center"), ("score", "right"),
                          ("latency ms", "right"), ("regions", "right"), ("snapshot", "left")):
            t.add_column(col, justify=just)  # type: ignore[arg-type]
        for row in self._rows.values():
            p = row["p"]
            v = str(p.get("verdict"))
            score = p.get("score")
            total = (p.get("latency_ms") or {}).get("total")
            t.add_row(
                row["cam"],
                _frame_label(p),
                f"[{_VERDICT_STYLE.get(v, '')}]{v}[/]" if v in _VERDICT_STYLE else v,
                "-" if score is None else f"{score:.3f}",
                "-" if total is None else f"{total:.1f}",
                str(p.get("n_regions", 0)) if v != "SKIPPED" else (p.get("reason") or "-"),
                row["snapshot"] or "",
            )
            if row["desc"]:
                t.add_row("", "", "", "", "", "", f"[italic]↳ {row['desc']}[/]")
        if self._web:
            from rich.console import Group

            return Group(t, _web_table(self._web))
        return t


def _frame_label(p: dict[str, Any]) -> str:
    """The frame id; for a line-scan tile, its id and down-web position."""
    tile = p.get("tile")
    if not isinstance(tile, dict):
        return str(p.get("frame_id"))
    y0, y1 = tile.get("down_extent_mm") or (0.0, 0.0)
    return f"tile {p.get('frame_id')} @ {y0:.1f}-{y1:.1f} mm"


def _web_table(rows: Sequence[tuple[str, dict[str, Any]]]) -> Any:
    """Line-scan mode: web defects (positions in mm) and web gaps, latest last."""
    from rich.table import Table

    t = Table(title="web defects (mm from the run's first line / the web's left edge)", expand=False)
    for col, just in (("camera", "left"), ("defect", "right"), ("down-web mm", "right"), ("cross-web mm", "right"),
                      ("size mm (across x along)", "right"), ("score", "right"), ("tiles", "left")):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for cam, p in rows:
        if p.get("type") == "web_gap":
            missing = p.get("missing_frames")
            t.add_row(cam, "[yellow]GAP[/]", f"{p.get('from_mm', 0):.1f} - {p.get('to_mm', 0):.1f}", "",
                      f"{missing} frame(s) lost" if missing is not None else "length unknown", "",
                      str(p.get("reason")))
            continue
        tiles = [str(i) for i in p.get("tile_ids") or []]
        t.add_row(cam, str(p.get("defect_id")), f"{p.get('down_mm', 0):.1f}", f"{p.get('cross_mm', 0):.1f}",
                  f"{p.get('width_mm', 0):.1f} x {p.get('length_mm', 0):.1f}", f"{p.get('score', 0):.2f}",
                  ", ".join(tiles[:6]) + (" ..." if len(tiles) > 6 else ""))
    return t


@click.command("events")
@click.option("--host", default="127.0.0.1", show_default=True, help="MQTT broker host.")
@click.option("--port", default=1883, show_default=True, type=int, help="MQTT broker port.")
@click.option("--prefix", default="linecam/+/+", show_default=True, help="Topic prefix (wildcards allowed).")
@click.option("--ng-only", is_flag=True, help="Only NG verdicts (defect and status messages still shown).")
@click.option("--camera", default=None, help="Only this camera id.")
@click.option("--json", "as_json", is_flag=True, help="Print each message as one JSON line instead of a table.")
@click.option("--count", type=click.IntRange(min=1), default=None, help="Exit after N verdicts.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop after S seconds (exit 1 if --count was not reached).")
@click.option("--validate/--no-validate", default=True, show_default=True,
              help="Check every message against its JSON Schema; invalid ones are reported on stderr and skipped.")
@click.option("--username", default=None, help="Broker username.")
@click.option("--password-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="File whose first line is the broker password.")
@click.option("--tls", is_flag=True, help="Connect with TLS.")
@click.option("--ca-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="CA certificate for --tls (default: system CAs).")
@click.option("--protocol", type=click.Choice(["5", "3.1.1"]), default="5", show_default=True)
@click.pass_context
def events_command(
    ctx: click.Context, host: str, port: int, prefix: str, ng_only: bool, camera: str | None, as_json: bool,
    count: int | None, timeout: float | None, validate: bool, username: str | None, password_file: Path | None,
    tls: bool, ca_file: Path | None, protocol: Literal["5", "3.1.1"],
) -> None:
    """Watch verdicts, defects and status from the line (live table, or JSON lines with --json)."""
    try:
        rc = _events(host, port, prefix, ng_only, camera, as_json, count, timeout, validate, username,
                     password_file, tls, ca_file, protocol)
    except LinecamError as e:  # also when run outside the linecam group
        click.echo(f"error: {e}", err=True)
        ctx.exit(e.exit_code)
    except KeyboardInterrupt:
        rc = 0
    ctx.exit(rc)


def _events(
    host: str, port: int, prefix: str, ng_only: bool, camera: str | None, as_json: bool, count: int | None,
    timeout: float | None, validate: bool, username: str | None, password_file: Path | None, tls: bool,
    ca_file: Path | None, protocol: Literal["5", "3.1.1"],
) -> int:
    password = None
    if password_file is not None:
        try:
            password = (password_file.read_text(encoding="utf-8").splitlines() or [""])[0]
        except OSError as e:
            raise LinecamError(f"cannot read --password-file {password_file}: {e.strerror}") from None

    def report_invalid(topic: str, raw: bytes, why: str) -> None:
        click.echo(f"invalid message on {topic}: {why}", err=True)

    verdicts = 0
    with subscribe(host, port, prefix, ng_only=ng_only, camera=camera, timeout=timeout, validate=validate,
                   username=username, password=password, tls=tls, ca_file=ca_file, protocol=protocol,
                   on_invalid=report_invalid) as events:
        if as_json:
            for ev in events:
                click.echo(json.dumps(ev.payload, separators=(",", ":"), ensure_ascii=False))
                if ev.type == "verdict":
                    verdicts += 1
                    if count is not None and verdicts >= count:
                        break
        else:
            from rich.console import Console
            from rich.live import Live

            table = EventTable()
            console = Console(file=click.get_text_stream("stdout"))
            with Live(table.render(), console=console, refresh_per_second=8, transient=False) as live:
                for ev in events:
                    table.add(ev)
                    live.update(table.render())
                    if ev.type == "verdict":
                        verdicts += 1
                        if count is not None and verdicts >= count:
                            break
    if count is not None and verdicts < count:
        click.echo(f"timeout: {verdicts} of {count} verdicts received", err=True)
        return 1
    return 0
