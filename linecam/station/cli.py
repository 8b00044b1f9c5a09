"""Command lines of the operator station: ``linecam record | history | view | ask``.

``register(cli)`` adds them to the ``linecam`` group (the one hook in linecam/cli.py).
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path

import click

from linecam.errors import LinecamError

DEFAULT_DB = "linecam-state/record.db"

_db_option = click.option("--db", default=DEFAULT_DB, show_default=True,
                          help="Record database: an SQLite file path / sqlite:///… URL, or postgresql://user@host/db.")


def _password(password_file: Path | None) -> str | None:
    if password_file is None:
        return None
    try:
        return (password_file.read_text(encoding="utf-8").splitlines() or [""])[0]
    except OSError as e:
        raise LinecamError(f"cannot read --password-file {password_file}: {e.strerror}") from None


def _logging(level: str) -> None:
    from linecam.cli import setup_logging

    setup_logging(level)


def _mqtt_options(f):  # type: ignore[no-untyped-def]
    for opt in reversed([
        click.option("--host", default="127.0.0.1", show_default=True, help="MQTT broker host."),
        click.option("--port", default=1883, show_default=True, type=int, help="MQTT broker port."),
        click.option("--prefix", default="linecam/+/+", show_default=True, help="Topic prefix (wildcards allowed)."),
        click.option("--username", default=None, help="Broker username."),
        click.option("--password-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="File whose first line is the broker password."),
        click.option("--tls", is_flag=True, help="Connect with TLS."),
        click.option("--ca-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="CA certificate for --tls."),
    ]):
        f = opt(f)
    return f


@click.command("record")
@_db_option
@_mqtt_options
@click.option("--group", default="linecam-record", show_default=True,
              help="MQTT 5 shared-subscription group: recorders in one group split the stream ('' = no sharing).")
@click.option("--client-id", default=None,
              help="Stable MQTT client id (the broker keeps this recorder's session and queues for it while it "
                   "restarts). Default: linecam-record-<group>-<hostname>; give each recorder on one host its own.")
@click.option("--copy-snapshots", is_flag=True,
              help="Also copy each defect's snapshot file into the database (when this machine can read it).")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]), default="INFO")
def record_command(db: str, host: str, port: int, prefix: str, username: str | None, password_file: Path | None,
                   tls: bool, ca_file: Path | None, group: str, client_id: str | None, copy_snapshots: bool,
                   log_level: str) -> None:
    """Store every verdict, defect, description and status in a database, once each, until Ctrl-C."""
    _logging(log_level)
    from linecam.station.recorder import Recorder, RecorderSettings
    from linecam.station.store import open_store

    store = open_store(db)
    settings = RecorderSettings(host=host, port=port, prefix=prefix, group=group or None, client_id=client_id,
                                username=username, password=_password(password_file), tls=tls, ca_file=ca_file,
                                copy_snapshots=copy_snapshots)
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    rec = Recorder(store, settings).start()
    log = logging.getLogger("linecam.station.record")
    try:
        while not stop.wait(30):
            s = rec.stats
            log.info("recorded %d new, %d duplicate(s), %d invalid, %d snapshot(s)", s.stored, s.duplicates,
                     s.invalid, s.snapshots)
    finally:
        rec.stop()
        store.close()
    s = rec.stats
    click.echo(f"recorded {s.stored} new message(s), {s.duplicates} duplicate(s) ignored, {s.invalid} invalid, "
               f"{s.snapshots} snapshot(s)", err=True)


@click.command("history")
@_db_option
@click.option("--since", default="8h", show_default=True, help="A span before now (30m, 8h, 2d) or an ISO time.")
@click.option("--until", default=None, help="An ISO time (default: now).")
@click.option("--ng", "ng_only", is_flag=True, help="Only NG verdicts (with their defects and descriptions).")
@click.option("--camera", default=None, help="Only this camera id.")
@click.option("--line", default=None, help="Only this line.")
@click.option("--type", "types", multiple=True,
              type=click.Choice(["verdict", "defect", "description", "status", "web_defect", "web_gap"]),
              help="Only these message types (repeatable).")
@click.option("--rate", is_flag=True, help="NG rate per hour and camera instead of events.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True,
              help="json: one message per line, exactly as published (with --rate: one hour per line).")
@click.option("--limit", type=click.IntRange(min=1), default=None)
def history_command(db: str, since: str, until: str | None, ng_only: bool, camera: str | None, line: str | None,
                    types: tuple[str, ...], rate: bool, fmt: str, limit: int | None) -> None:
    """What the record database holds: events of a window, or the NG rate per hour."""
    from linecam.station.history import history_text
    from linecam.station.store import open_store

    store = open_store(db, create=False)
    try:
        sys.stdout.write(history_text(store, since=since, until=until, ng_only=ng_only, camera=camera, line=line,
                                      types=types, fmt=fmt, rate=rate, limit=limit))
    finally:
        store.close()


@click.command("view")
@_mqtt_options
@click.option("--db", default=None, help="Record database for history and stored snapshots (optional).")
@click.option("--bind", default="127.0.0.1", show_default=True,
              help="Address to serve on (0.0.0.0: every interface; then set --user).")
@click.option("--http-port", default=8080, show_default=True, type=int, help="HTTP port of the page.")
@click.option("--user", default=None, help="HTTP basic auth user (with --http-password-file).")
@click.option("--http-password-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="File whose first line is the basic auth password.")
@click.option("--vlm-bundle", type=click.Path(path_type=Path), default=None,
              help="The line's VLM bundle: enables the question box under NG frames.")
@click.option("--vlm-precision", type=click.Choice(["fp32", "fp16", "int8", "int4"]), default="int8",
              show_default=True)
@click.option("--title", default="linecam", show_default=True, help="Page title (e.g. the plant and line).")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]), default="INFO")
def view_command(host: str, port: int, prefix: str, username: str | None, password_file: Path | None, tls: bool,
                 ca_file: Path | None, db: str | None, bind: str, http_port: int, user: str | None,
                 http_password_file: Path | None, vlm_bundle: Path | None, vlm_precision: str, title: str,
                 log_level: str) -> None:
    """Serve the live page of the line(s): verdict rate, NG frames with snapshots and descriptions, status."""
    _logging(log_level)
    from linecam.station.view.app import ViewApp, serve
    from linecam.station.view.live import LiveFeed, LiveState

    if (user is None) != (http_password_file is None):
        raise LinecamError("--user and --http-password-file go together (HTTP basic auth)")
    http_password = _password(http_password_file)
    store = None
    if db:
        from linecam.station.store import open_store

        store = open_store(db, create=False)
    asker = None
    if vlm_bundle is not None:
        from linecam.station.ask import Asker

        asker = Asker(vlm_bundle, precision=vlm_precision)
    state = LiveState()
    feed = LiveFeed(state, host, port, prefix, username=username, password=_password(password_file), tls=tls,
                    ca_file=str(ca_file) if ca_file else None).start()
    app = ViewApp(state, store=store, asker=asker, title=title).starlette(user, http_password)
    click.echo(f"linecam view on http://{bind}:{http_port}/ (broker {host}:{port})", err=True)
    try:
        serve(app, bind, http_port)
    finally:
        feed.stop()
        if store is not None:
            store.close()


@click.command("ask")
@_db_option
@click.option("--event", "event_id", required=True, help="The defect event id (or its NG verdict's event id).")
@click.option("--vlm-bundle", type=click.Path(path_type=Path), required=True, help="The line's VLM bundle.")
@click.option("--vlm-precision", type=click.Choice(["fp32", "fp16", "int8", "int4"]), default="int8",
              show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print each answer as a JSON line.")
@click.argument("questions", nargs=-1, required=True)
def ask_command(db: str, event_id: str, vlm_bundle: Path, vlm_precision: str, max_new_tokens: int, as_json: bool,
                questions: tuple[str, ...]) -> None:
    """Ask the VLM about a recorded defect; several QUESTIONS are one conversation (follow-ups)."""
    import json as _json

    from linecam.station.ask import Asker
    from linecam.station.store import open_store

    store = open_store(db, create=False)
    try:
        ev = store.get(event_id)
        if ev is not None and ev.type == "verdict":  # an NG verdict's id: find its defect
            ev = next((d for d in store.query(types=["defect"], since=ev.sent_at)
                       if d.payload.get("verdict_event_id") == event_id), None)
        if ev is None or ev.type != "defect":
            raise LinecamError(f"no defect {event_id} in {db}: take the id from `linecam history --ng --type defect`")
        jpeg = store.snapshot(ev.event_id)
        if jpeg is None and ev.payload.get("snapshot"):
            try:
                jpeg = Path(ev.payload["snapshot"]).read_bytes()
            except OSError:
                jpeg = None
    finally:
        store.close()
    asker = Asker(vlm_bundle, precision=vlm_precision, max_new_tokens=max_new_tokens)
    conversation = None
    for q in questions:
        r = asker.ask(ev.payload, jpeg, q, conversation)
        conversation = r["conversation_id"]
        click.echo(_json.dumps({"question": q, **r}) if as_json else f"Q: {q}\nA: {r['answer']}")


def register(cli: click.Group) -> None:
    """Add the station's commands to ``linecam``."""
    for cmd in (record_command, history_command, view_command, ask_command):
        cli.add_command(cmd)
