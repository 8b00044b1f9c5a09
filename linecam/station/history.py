"""``linecam history``: what the record database says about a time window.

Events (``--ng`` keeps NG verdicts and their defects/descriptions) as a table, CSV or JSON
lines, and the NG rate per hour and camera (``--rate``).
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from linecam.errors import LinecamError
from linecam.station.store import StoredEvent, Store, parse_time

_SPAN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}

CSV_COLUMNS = ("sent_at", "type", "line", "camera", "frame_id", "verdict", "score", "n_regions", "event_id",
               "verdict_event_id", "snapshot", "text")


def parse_since(text: str | None, now: datetime | None = None) -> datetime | None:
    """``8h``, ``30m``, ``2d``, ``1w`` (before now) or an ISO time (``2026-11-22T06:00``, UTC if no zone)."""
    if not text:
        return None
    now = now or datetime.now(timezone.utc)
    m = _SPAN.match(text)
    if m:
        return now - timedelta(**{_UNITS[m.group(2)]: float(m.group(1))})
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise LinecamError(f"--since {text!r}: use a span like 8h, 30m, 2d or a time like 2026-11-22T06:00") from None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def flat(ev: StoredEvent) -> dict[str, Any]:
    """One CSV / table row of an event."""
    p = ev.payload
    return {
        "sent_at": ev.sent_at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "type": ev.type, "line": ev.line, "camera": ev.camera,
        "frame_id": p.get("frame_id"), "verdict": p.get("verdict") if ev.type == "verdict" else
        ("online" if p.get("online") else "offline") if ev.type == "status" else p.get("status"),
        "score": p.get("score"), "n_regions": p.get("n_regions", len(p.get("regions") or []) or None),
        "event_id": ev.event_id, "verdict_event_id": p.get("verdict_event_id"),
        "snapshot": p.get("snapshot"),
        "text": p.get("text") if ev.type == "description" else p.get("detail") or p.get("state"),
    }


@dataclass(frozen=True, slots=True)
class HourRate:
    hour: str  # ISO, UTC, start of the hour
    camera: str
    verdicts: int
    ng: int
    skipped: int

    @property
    def ng_rate(self) -> float:
        judged = self.verdicts - self.skipped
        return self.ng / judged if judged else 0.0


def ng_rate_per_hour(store: Store, since: datetime | None, camera: str | None = None,
                     line: str | None = None) -> list[HourRate]:
    """Verdicts, NG and SKIPPED per UTC hour and camera; the NG rate is NG / (OK + NG)."""
    buckets: dict[tuple[str, str], list[int]] = {}
    for t, cam, verdict in store.verdict_times(since=since, camera=camera, line=line):
        key = (t.replace(minute=0, second=0, microsecond=0).isoformat().replace("+00:00", "Z"), cam)
        b = buckets.setdefault(key, [0, 0, 0])
        b[0] += 1
        b[1] += verdict == "NG"
        b[2] += verdict == "SKIPPED"
    return [HourRate(h, c, *v) for (h, c), v in sorted(buckets.items())]


def render(rows: list[dict[str, Any]], fmt: str, columns: tuple[str, ...]) -> str:
    if fmt == "json":
        return "".join(json.dumps(r, separators=(",", ":"), ensure_ascii=False) + "\n" for r in rows)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        return buf.getvalue()
    from rich.console import Console
    from rich.table import Table

    t = Table(expand=False)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*("" if r.get(c) is None else f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r[c])
                    for c in columns))
    console = Console(file=io.StringIO(), width=200, force_terminal=False)
    console.print(t)
    return console.file.getvalue()  # type: ignore[attr-defined]


def history_text(store: Store, *, since: str | None, until: str | None = None, ng_only: bool = False,
                 camera: str | None = None, line: str | None = None, types: tuple[str, ...] = (),
                 fmt: str = "table", rate: bool = False, limit: int | None = None) -> str:
    t0 = parse_since(since)
    t1 = parse_time(until) if until else None
    if rate:
        rates = [{**asdict(r), "ng_rate": round(r.ng_rate, 4)} for r in ng_rate_per_hour(store, t0, camera, line)]
        return render(rates, fmt, ("hour", "camera", "verdicts", "ng", "skipped", "ng_rate"))
    evs = store.query(since=t0, until=t1, types=types or None, camera=camera, line=line, ng_only=ng_only,
                      limit=limit)
    if fmt == "json":  # the whole message, as published
        return "".join(json.dumps(e.payload, separators=(",", ":"), ensure_ascii=False) + "\n" for e in evs)
    rows = [flat(e) for e in evs]
    cols = CSV_COLUMNS if fmt == "csv" else ("sent_at", "type", "camera", "frame_id", "verdict", "score",
                                            "n_regions", "text")
    return render(rows, fmt, cols)
