"""Topics, the common header and the small coercions every message builder uses."""

from __future__ import annotations

import json
import numbers
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

from linecam.errors import ConfigError

SCHEMA_VERSION = 1

Verdict = Literal["OK", "NG", "SKIPPED"]
State = Literal["starting", "running", "stopping", "stopped", "degraded"]
CameraState = Literal["up", "down", "unknown"]

#: Characters that cannot appear inside one MQTT topic level we publish to.
_TOPIC_FORBIDDEN = frozenset("/+#\x00")


@dataclass(frozen=True, slots=True)
class Topics:
    """The topics one camera publishes to (all under one prefix)."""

    prefix: str
    verdict: str
    defect: str
    status: str
    metrics: str
    #: VLM descriptions of defects (see :func:`description`).
    description: str
    #: Line-scan mode: defects on the web in mm (:func:`web_defect`) and web gaps (:func:`web_gap`).
    web_defect: str = ""
    web_gap: str = ""


def default_prefix(line: str, camera: str) -> str:
    """``linecam/<line>/<camera>``; raises ConfigError if an id cannot be a topic level."""
    for what, value in (("line", line), ("camera", camera)):
        if not value or any(c in _TOPIC_FORBIDDEN for c in value):
            raise ConfigError(
                f"{what} id {value!r} cannot be used in an MQTT topic: use letters, digits, '_', '-', '.'"
            )
    return f"linecam/{line}/{camera}"


def topics(prefix: str) -> Topics:
    """The topics under ``prefix`` (a trailing ``/`` is ignored; wildcards are refused)."""
    p = prefix.rstrip("/")
    if not p or "+" in p or "#" in p or "\x00" in p:
        raise ConfigError(f"MQTT topic prefix {prefix!r} is empty or has a wildcard (+ or #): set a plain prefix")
    return Topics(
        prefix=p,
        verdict=f"{p}/verdict",
        defect=f"{p}/defect",
        status=f"{p}/status",
        metrics=f"{p}/metrics",
        description=f"{p}/description",
        web_defect=f"{p}/web_defect",
        web_gap=f"{p}/web_gap",
    )


def utc_now_rfc3339() -> str:
    """Now as RFC 3339 UTC with milliseconds and a ``Z`` suffix."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _header(kind: str, line: str, camera: str) -> dict[str, Any]:
    return {
        "schema": f"linecam.{kind}",
        "schema_version": SCHEMA_VERSION,
        "type": kind,
        "event_id": str(uuid.uuid4()),
        "line": line,
        "camera": camera,
        "sent_at": utc_now_rfc3339(),
        "mono_ns": time.monotonic_ns(),
    }


def restamp(msg: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``msg`` with a fresh event_id / sent_at / mono_ns (e.g. a status re-sent on reconnect)."""
    out = dict(msg)
    out["event_id"] = str(uuid.uuid4())
    out["sent_at"] = utc_now_rfc3339()
    out["mono_ns"] = time.monotonic_ns()
    return out


def _f(x: Any) -> float | None:
    return None if x is None else float(x)


def _i(x: Any) -> int | None:
    return None if x is None else int(x)


def _num(x: Any) -> int | float:
    # Keeps counts (e.g. a sample count next to percentiles) integers; numpy ints are Integral.
    return int(x) if isinstance(x, numbers.Integral) else float(x)


def _model(model: Mapping[str, Any] | None) -> dict[str, Any] | None:
    return None if model is None else dict(model)


def to_json(msg: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON. Raises ValueError on NaN / Infinity (not valid JSON)."""
    return json.dumps(msg, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
