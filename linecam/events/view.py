"""`linecam events`: the live table (on a terminal) or one plain line per message (piped),
and :class:`EventTable`, the table itself.

The table always fits the terminal: it shows as many of the newest verdict rows as the
terminal's height leaves room for, the counts in its title (never cropped away). Piped to a
file (or with ``--plain``), each message is one line written and flushed as it arrives, so
nothing is held back when the command is stopped (SIGTERM is handled like Ctrl-C).
"""

from __future__ import annotations

import json
import signal
import sys
from collections import OrderedDict, deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import click

from linecam.errors import LinecamError
from linecam.events import Event, subscribe

# -- presentation ---------------------------------------------------------------------------
_VERDICT_STYLE = {"OK": "green", "NG": "bold red", "SKIPPED": "yellow"}


class EventTable:
    """The live view: the newest verdicts (snapshot filled in when the defect arrives),
    per-camera status and running counts. ``add(event)`` then ``render(height, width)``:
    as many of the newest rows as ``height`` lines hold (all kept rows without it)."""

    def __init__(self, rows: int = 200, ng_only: bool = False) -> None:
        self.max_rows = rows
        self.ng_only = ng_only
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
            self._status[cam] = status_text(p)

    def counts_text(self) -> str:
        if self.ng_only:
            return f"NG {self.counts.get('NG', 0)} (--ng-only: OK and SKIPPED not received)"
        return "  ".join(f"{k} {n}" for k, n in self.counts.items())

    def render(self, height: int | None = None, width: int | None = None) -> Any:
        from rich.table import Table

        title = " | ".join(self._status.values()) or "waiting for status..."
        title = f"{title}   [bold]{self.counts_text()}[/]"
        # Lines the frame of a table takes: title, top rule, header, header rule, bottom rule.
        # The title wraps to the table's width (narrower than the terminal): count conservatively.
        plain_title = title.replace("[bold]", "").replace("[/]", "")
        title_lines = 1 + (len(plain_title) // max(min(width, 45), 20) if width else 0)
        web = list(self._web)
        budget = None if height is None else max(height - 1, 8)
        if budget is not None and web:
            web = web[-max(2, min(len(web), budget // 3)):]
            budget -= len(web) + 5
        rows = list(self._rows.values())
        if budget is not None:
            room, shown = budget - 4 - title_lines, []
            for row in reversed(rows):  # newest first, until the terminal is full
                need = 1 + (1 if row["desc"] else 0)
                if room < need:
                    break
                room -= need
                shown.append(row)
            rows = shown[::-1]
        t = Table(title=title, expand=False)
        cams = len({row["cam"] for row in rows}) > 1  # one camera: it is in the title
        # A narrow terminal drops the least useful columns rather than cutting every one to "…".
        show = {"camera": cams, "time": width is None or width >= 74 + 10 * cams,
                "snapshot": width is None or width >= 62 + 10 * cams}
        for col, just in (("time", "left"), ("camera", "left"), ("frame", "right"), ("verdict", "center"),
                          ("score", "right"), ("ms", "right"), ("regions", "right")):
            if show.get(col, True):
                t.add_column(col, justify=just, no_wrap=True)  # type: ignore[arg-type]
        if show["snapshot"]:
            t.add_column("snapshot", no_wrap=True, overflow="ellipsis", min_width=12)
        for row in rows:
            p = row["p"]
            v = str(p.get("verdict"))
            score = p.get("score")
            total = (p.get("latency_ms") or {}).get("total")
            snap = row["snapshot"] or ""
            cells = {
                "time": _clock(p), "camera": row["cam"], "frame": _frame_label(p),
                "verdict": f"[{_VERDICT_STYLE.get(v, '')}]{v}[/]" if v in _VERDICT_STYLE else v,
                "score": "-" if score is None else f"{score:.3f}",
                "ms": "-" if total is None else f"{total:.1f}",
                "regions": str(p.get("n_regions", 0)) if v != "SKIPPED" else (p.get("reason") or "-"),
                "snapshot": Path(snap).name if snap not in ("", "-") else snap,  # full path: --json / --plain
            }
            t.add_row(*[cells[str(c.header)] for c in t.columns])
            if row["desc"]:
                t.add_row(*[""] * (len(t.columns) - 1), f"[italic]↳ {row['desc']}[/]")
        if web:
            from rich.console import Group

            return Group(t, _web_table(web))
        return t


def _clock(p: dict[str, Any]) -> str:
    """HH:MM:SS of a message's ``sent_at`` (RFC 3339)."""
    sent = str(p.get("sent_at") or "")
    return sent[11:19] if len(sent) >= 19 else ""


def status_text(p: dict[str, Any]) -> str:
    online = "online" if p.get("online") else "OFFLINE"
    detail = f" ({p['detail']})" if p.get("detail") else ""
    return f"{p.get('line')}/{p.get('camera')}: {p.get('state')}, {online}, camera {p.get('camera_state')}{detail}"


def plain_line(ev: Event) -> str | None:
    """One line of text for a message (``linecam events`` piped, or ``--plain``)."""
    p = ev.payload
    cam = f"{p.get('line')}/{p.get('camera')}"
    head = f"{_clock(p)} {ev.type:<11} {cam}"
    if ev.type == "verdict":
        score = p.get("score")
        total = (p.get("latency_ms") or {}).get("total")
        extra = f"regions {p.get('n_regions', 0)}" if p.get("verdict") != "SKIPPED" else f"reason {p.get('reason')}"
        return (f"{head} frame {_frame_label(p)} {p.get('verdict')} score "
                f"{'-' if score is None else f'{score:.3f}'} latency "
                f"{'-' if total is None else f'{total:.1f}'} ms {extra}")
    if ev.type == "defect":
        return f"{head} frame {p.get('frame_id')} regions {len(p.get('regions') or [])} snapshot {p.get('snapshot')}"
    if ev.type == "description":
        text = p.get("text") if p.get("status") == "ok" else f"({p.get('status')}: {p.get('reason')})"
        return f"{head} frame {p.get('frame_id')} defect {p.get('defect_event_id')}: {text}"
    if ev.type == "web_defect":
        return (f"{head} defect {p.get('defect_id')} down {p.get('down_mm', 0):.1f} mm cross "
                f"{p.get('cross_mm', 0):.1f} mm size {p.get('width_mm', 0):.1f} x {p.get('length_mm', 0):.1f} mm "
                f"score {p.get('score', 0):.2f}")
    if ev.type == "web_gap":
        return (f"{head} GAP {p.get('from_mm', 0):.1f} - {p.get('to_mm', 0):.1f} mm down-web ({p.get('reason')}, "
                f"{p.get('missing_frames')} frame(s) lost)")
    if ev.type == "status":
        return f"{head} {status_text(p)}"
    return None


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
@click.option("--plain/--table", "plain", default=None,
              help="One text line per message, flushed as it arrives / the live table. Default: the table on a "
                   "terminal, plain lines when piped or redirected.")
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
    plain: bool | None, count: int | None, timeout: float | None, validate: bool, username: str | None,
    password_file: Path | None, tls: bool, ca_file: Path | None, protocol: Literal["5", "3.1.1"],
) -> None:
    """Watch verdicts, defects and status from the line (live table on a terminal, plain lines when
    piped, JSON lines with --json). Ctrl-C or SIGTERM stops it; what was received is written."""
    out = sys.stdout
    if plain is None:
        plain = not out.isatty()
    old_term = None
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):  # stop like Ctrl-C: flushed, exit 0

        def _term(signum: int, frame: object) -> None:
            raise KeyboardInterrupt

        try:
            old_term = signal.signal(signal.SIGTERM, _term)
        except ValueError:  # not the main thread (tests): nothing to install
            old_term = None
    try:
        rc = _events(host, port, prefix, ng_only, camera, as_json, plain, count, timeout, validate, username,
                     password_file, tls, ca_file, protocol)
    except LinecamError as e:  # also when run outside the linecam group
        click.echo(f"error: {e}", err=True)
        ctx.exit(e.exit_code)
    except KeyboardInterrupt:
        rc = 0
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        sys.stdout.flush()
    ctx.exit(rc)


def _events(
    host: str, port: int, prefix: str, ng_only: bool, camera: str | None, as_json: bool, plain: bool,
    count: int | None, timeout: float | None, validate: bool, username: str | None, password_file: Path | None,
    tls: bool, ca_file: Path | None, protocol: Literal["5", "3.1.1"],
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
        elif plain:
            out = sys.stdout
            for ev in events:
                line = plain_line(ev)
                if line is not None:
                    out.write(line + "\n")
                    out.flush()
                if ev.type == "verdict":
                    verdicts += 1
                    if count is not None and verdicts >= count:
                        break
        else:
            from rich.console import Console
            from rich.live import Live

            table = EventTable(ng_only=ng_only)
            console = Console(file=sys.stdout)
            with Live(table.render(console.height, console.width), console=console, refresh_per_second=8,
                      transient=False, vertical_overflow="crop") as live:
                for ev in events:
                    table.add(ev)
                    live.update(table.render(console.height, console.width))
                    if ev.type == "verdict":
                        verdicts += 1
                        if count is not None and verdicts >= count:
                            break
    if count is not None and verdicts < count:
        click.echo(f"timeout: {verdicts} of {count} verdicts received", err=True)
        return 1
    return 0
