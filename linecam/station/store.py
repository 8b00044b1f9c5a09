"""The record database: every verdict, defect, description, web defect/gap and status, once.

One SQLAlchemy Core schema for SQLite (a file: the embedded default) and PostgreSQL
(``postgresql://user@host/db``, through psycopg 3). Rows are keyed on the message's
``event_id``: inserting a message twice (a spool re-send, a redelivery after a recorder
crash, two recorders seeing the same retained status) never makes a second row.

The schema is versioned in table ``linecam_schema`` (one row: ``version``); :func:`open_store`
creates it on an empty database, applies the migrations in :data:`MIGRATIONS` to an older
one, and refuses a newer one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from linecam.errors import LinecamError

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
#: Message types the recorder stores (metrics are periodic telemetry: Prometheus' job).
RECORDED_TYPES = ("verdict", "defect", "description", "status", "web_defect", "web_gap")

meta = sa.MetaData()

schema_table = sa.Table(
    "linecam_schema", meta,
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("applied_at", sa.DateTime(timezone=True), nullable=False),
)

events = sa.Table(
    "events", meta,
    sa.Column("event_id", sa.String(64), primary_key=True),
    sa.Column("type", sa.String(32), nullable=False),
    sa.Column("line", sa.String(128), nullable=False),
    sa.Column("camera", sa.String(128), nullable=False),
    sa.Column("sent_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("frame_id", sa.BigInteger),
    sa.Column("verdict", sa.String(16)),
    sa.Column("score", sa.Float),
    sa.Column("verdict_event_id", sa.String(64)),
    sa.Column("defect_event_id", sa.String(64)),
    sa.Column("topic", sa.String(512), nullable=False),
    sa.Column("payload", sa.Text, nullable=False),
    sa.Index("ix_events_camera_time", "camera", "sent_at"),
    sa.Index("ix_events_type_time", "type", "sent_at"),
    sa.Index("ix_events_verdict_event", "verdict_event_id"),
    sa.Index("ix_events_defect_event", "defect_event_id"),
)

snapshots = sa.Table(
    "snapshots", meta,
    sa.Column("defect_event_id", sa.String(64), primary_key=True),
    sa.Column("jpeg", sa.LargeBinary, nullable=False),
    sa.Column("source", sa.String(16), nullable=False),  # mqtt | file
    sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
)


def _create_v1(conn: Connection) -> None:
    meta.create_all(conn, tables=[events, snapshots])


#: version -> the step that brings a database at version-1 to it.
MIGRATIONS: dict[int, Callable[[Connection], None]] = {1: _create_v1}


def normalise_url(db: str) -> str:
    """``--db`` as the user writes it -> an SQLAlchemy URL: a bare path is an SQLite file,
    ``postgresql://`` uses psycopg 3."""
    if "://" not in db:
        return f"sqlite:///{Path(db).expanduser()}"
    scheme, rest = db.split("://", 1)
    if scheme in ("postgresql", "postgres"):
        return f"postgresql+psycopg://{rest}"
    return db


def _safe_url(url: str) -> str:
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def parse_time(text: str | None) -> datetime:
    if not text:
        return utcnow()
    try:
        t = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return utcnow()
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def as_utc(t: datetime) -> datetime:
    """SQLite hands back naive datetimes: they were stored as UTC."""
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)


def event_row(topic: str, payload: dict[str, Any], received_at: datetime | None = None) -> dict[str, Any]:
    """The stored row of one message (indexed columns + the whole payload as JSON)."""
    kind = str(payload.get("type") or topic.rsplit("/", 1)[-1])
    score = payload.get("score")
    frame_id = payload.get("frame_id")
    return {
        "event_id": str(payload["event_id"]),
        "type": kind,
        "line": str(payload.get("line", "")),
        "camera": str(payload.get("camera", "")),
        "sent_at": parse_time(payload.get("sent_at")),
        "received_at": received_at or utcnow(),
        "frame_id": frame_id if isinstance(frame_id, int) else None,
        "verdict": payload.get("verdict") if kind == "verdict" else None,
        "score": float(score) if isinstance(score, (int, float)) else None,
        "verdict_event_id": payload.get("verdict_event_id"),
        "defect_event_id": payload.get("defect_event_id"),
        "topic": topic,
        "payload": json.dumps(payload, separators=(",", ":"), ensure_ascii=False),
    }


@dataclass(frozen=True, slots=True)
class StoredEvent:
    event_id: str
    type: str
    line: str
    camera: str
    sent_at: datetime
    payload: dict[str, Any]


class Store:
    """A record database. Thread-safe (SQLAlchemy's pool); one per process."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name

    # -- writing ---------------------------------------------------------------------------
    def _insert(self, table: sa.Table, key: str) -> Any:
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        elif self.dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert
        else:  # pragma: no cover - guarded in open_store
            raise LinecamError(f"unsupported database {self.dialect}")
        return insert(table).on_conflict_do_nothing(index_elements=[key])

    def add_events(self, rows: Sequence[dict[str, Any]]) -> int:
        """Insert in one transaction; returns how many were new (the rest were already stored)."""
        if not rows:
            return 0
        stmt = self._insert(events, "event_id").returning(events.c.event_id)
        with self.engine.begin() as conn:
            return len(conn.execute(stmt, list(rows)).all())

    def add_snapshot(self, defect_event_id: str, jpeg: bytes, source: str) -> bool:
        stmt = self._insert(snapshots, "defect_event_id").returning(snapshots.c.defect_event_id)
        with self.engine.begin() as conn:
            return bool(conn.execute(stmt, [{"defect_event_id": defect_event_id, "jpeg": jpeg, "source": source,
                                             "received_at": utcnow()}]).all())

    # -- reading ---------------------------------------------------------------------------
    def query(self, *, since: datetime | None = None, until: datetime | None = None,
              types: Iterable[str] | None = None, camera: str | None = None, line: str | None = None,
              ng_only: bool = False, limit: int | None = None, newest_first: bool = False) -> list[StoredEvent]:
        q = sa.select(events.c.event_id, events.c.type, events.c.line, events.c.camera, events.c.sent_at,
                      events.c.payload)
        q = self._where(q, since, until, types, camera, line, ng_only)
        q = q.order_by(events.c.sent_at.desc() if newest_first else events.c.sent_at, events.c.event_id)
        if limit is not None:
            q = q.limit(limit)
        with self.engine.connect() as conn:
            return [StoredEvent(r.event_id, r.type, r.line, r.camera, as_utc(r.sent_at), json.loads(r.payload))
                    for r in conn.execute(q)]

    @staticmethod
    def _where(q: Any, since: datetime | None, until: datetime | None, types: Iterable[str] | None,
               camera: str | None, line: str | None, ng_only: bool) -> Any:
        if since is not None:
            q = q.where(events.c.sent_at >= since)
        if until is not None:
            q = q.where(events.c.sent_at < until)
        if types:
            q = q.where(events.c.type.in_(list(types)))
        if camera:
            q = q.where(events.c.camera == camera)
        if line:
            q = q.where(events.c.line == line)
        if ng_only:  # NG verdicts and everything that is not a verdict (defects, descriptions ...)
            q = q.where(sa.or_(events.c.type != "verdict", events.c.verdict == "NG"))
        return q

    def verdict_times(self, *, since: datetime | None = None, until: datetime | None = None,
                      camera: str | None = None, line: str | None = None) -> list[tuple[datetime, str, str]]:
        """(sent_at, camera, verdict) of every verdict in the window, for per-hour rates."""
        q = sa.select(events.c.sent_at, events.c.camera, events.c.verdict)
        q = self._where(q, since, until, ["verdict"], camera, line, False).order_by(events.c.sent_at)
        with self.engine.connect() as conn:
            return [(as_utc(r.sent_at), r.camera, r.verdict) for r in conn.execute(q)]

    def get(self, event_id: str) -> StoredEvent | None:
        q = sa.select(events).where(events.c.event_id == event_id)
        with self.engine.connect() as conn:
            r = conn.execute(q).first()
        if r is None:
            return None
        return StoredEvent(r.event_id, r.type, r.line, r.camera, as_utc(r.sent_at), json.loads(r.payload))

    def related(self, defect_event_id: str) -> list[StoredEvent]:
        """Descriptions of a defect."""
        q = sa.select(events).where(events.c.defect_event_id == defect_event_id).order_by(events.c.sent_at)
        with self.engine.connect() as conn:
            return [StoredEvent(r.event_id, r.type, r.line, r.camera, as_utc(r.sent_at), json.loads(r.payload))
                    for r in conn.execute(q)]

    def snapshot(self, defect_event_id: str) -> bytes | None:
        q = sa.select(snapshots.c.jpeg).where(snapshots.c.defect_event_id == defect_event_id)
        with self.engine.connect() as conn:
            return conn.execute(q).scalar()

    def count(self, type_: str | None = None) -> int:
        q = sa.select(sa.func.count()).select_from(events)
        if type_:
            q = q.where(events.c.type == type_)
        with self.engine.connect() as conn:
            return int(conn.execute(q).scalar() or 0)

    def close(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # the view reads while the recorder writes
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def _migrate(conn: Connection, url: str) -> None:
    if conn.dialect.name == "postgresql":  # two recorders starting at once: one migrates, one waits
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(7218180001)"))
    insp = sa.inspect(conn)
    current = 0
    if insp.has_table("linecam_schema"):
        current = int(conn.execute(sa.select(sa.func.max(schema_table.c.version))).scalar() or 0)
    elif insp.has_table("events"):
        raise LinecamError(f"database {url} has an 'events' table but no linecam_schema version: "
                           "it is not a linecam record database; use another --db")
    if current > SCHEMA_VERSION:
        raise LinecamError(f"database {url} has record schema v{current}, newer than this linecam's "
                           f"v{SCHEMA_VERSION}: upgrade linecam on this machine")
    if current == SCHEMA_VERSION:
        return
    schema_table.create(conn, checkfirst=True)
    for v in range(current + 1, SCHEMA_VERSION + 1):
        logger.info("record database %s: migrating to schema v%d", url, v)
        MIGRATIONS[v](conn)
    conn.execute(sa.delete(schema_table))
    conn.execute(sa.insert(schema_table).values(version=SCHEMA_VERSION, applied_at=utcnow()))


def open_store(db: str, *, create: bool = True) -> Store:
    """Connect, check the database is reachable and its schema current (migrating it when
    ``create``). Every failure is one line that says what to do."""
    url = normalise_url(db)
    shown = _safe_url(url)
    try:
        parsed = sa.engine.make_url(url)
    except Exception:
        raise LinecamError(f"bad --db URL {db!r}: use a file path, sqlite:///path/to/record.db or "
                           "postgresql://user:password@host:5432/dbname") from None
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise LinecamError(f"--db {shown}: database '{backend}' is not supported: use SQLite or PostgreSQL")
    if backend == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            path = Path(parsed.database)
            if create:
                path.parent.mkdir(parents=True, exist_ok=True)
            elif not path.exists():
                raise LinecamError(f"record database {path} does not exist: run `linecam record --db {db}` first")
        engine = sa.create_engine(url)
        sa.event.listen(engine, "connect", _sqlite_pragmas)
    else:
        try:
            engine = sa.create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": 10})
        except ImportError:
            raise LinecamError("PostgreSQL needs psycopg 3: pip install 'linecam[station]'") from None
    try:
        with engine.begin() as conn:
            if create:
                _migrate(conn, shown)
            else:
                v = conn.execute(sa.select(sa.func.max(schema_table.c.version))).scalar()
                if v is None or int(v) > SCHEMA_VERSION:
                    raise LinecamError(f"database {shown} has record schema v{v}: use a linecam that knows it")
    except sa.exc.OperationalError as e:
        engine.dispose()
        first = str(e.orig).strip().splitlines()[0] if e.orig else str(e).splitlines()[0]
        raise LinecamError(f"cannot open record database {shown} ({first}): is the server running and "
                           "the URL (host, port, user, database) right?") from None
    except sa.exc.ProgrammingError as e:
        engine.dispose()
        first = str(e.orig).strip().splitlines()[0] if e.orig else str(e).splitlines()[0]
        raise LinecamError(f"record database {shown}: {first}: check the database and its permissions") from None
    return Store(engine)
