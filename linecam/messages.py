"""The MQTT wire format: topic layout and JSON message builders (schema version 1).

Every message is a plain JSON object with these common fields::

    schema          "linecam.<type>"            (e.g. "linecam.verdict")
    schema_version  1                            (:data:`SCHEMA_VERSION`)
    type            "<type>"
    event_id        uuid4 string                 idempotency / dedupe key
    line, camera    the ids in the topic
    sent_at         RFC 3339 UTC, milliseconds   e.g. "2025-01-31T12:00:00.123Z"
    mono_ns         time.monotonic_ns() at build time (same-host end-to-end latency only)

Topics live under a prefix, by default ``linecam/<line>/<camera>``:

    verdict   QoS 1, not retained, exactly one per frame (OK / NG / SKIPPED)
    defect    QoS 1, not retained, one per NG frame (regions + snapshot path)
    status    QoS 1, RETAINED; the Last Will is a status with ``online: false``
    metrics   QoS 0, periodic
    description  QoS 1, not retained, one per defect (the VLM's text, joined on defect_event_id)
    web_defect   QoS 1, not retained, line-scan mode: one per defect on the web (mm positions)
    web_gap      QoS 1, not retained, line-scan mode: a stretch of web not inspected (frame-id gap)

The JSON Schemas in :mod:`linecam.schemas` are the contract; the builders here are
the only place that produces these dicts. They coerce numbers to plain ``int`` /
``float`` so numpy scalars from the pipeline serialise, and do nothing else on the
hot path (validation is for tests and subscribers).
"""

from __future__ import annotations

import json
import numbers
import time
import uuid
from collections.abc import Mapping, Sequence
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


def verdict(
    *,
    line: str,
    camera: str,
    frame_id: int,
    verdict: Verdict,
    score: float | None,
    score_raw: float | None,
    threshold: float | None,
    frame_ts_ns: int,
    frame_clock: str,
    frame_mono_ns: int,
    latency_ms: Mapping[str, float],
    model: Mapping[str, Any] | None,
    n_regions: int = 0,
    reason: str | None = None,
    tile: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One verdict per frame (in line-scan mode: per tile, ``frame_id`` = tile id).

    ``score = score_raw / threshold``: 1.0 is the NG threshold for every model.
    ``SKIPPED`` means the frame was not inspected and ``reason`` says why (e.g.
    ``"queue_full"``). ``latency_ms`` keys: queue, preprocess, inference, postprocess,
    total (frame ready on the host -> publish); a SKIPPED verdict may carry only some.
    ``tile`` (line-scan mode only; the key is absent otherwise): where the tile lies on the
    web, see :func:`linecam.runtime.linescan.LineScanSession`.
    """
    msg = _header("verdict", line, camera)
    msg.update(
        frame_id=int(frame_id),
        verdict=verdict,
        score=_f(score),
        score_raw=_f(score_raw),
        threshold=_f(threshold),
        frame_ts_ns=int(frame_ts_ns),
        frame_clock=frame_clock,
        frame_mono_ns=int(frame_mono_ns),
        latency_ms={k: float(v) for k, v in latency_ms.items()},
        model=_model(model),
        n_regions=int(n_regions),
        reason=reason,
    )
    if tile is not None:
        msg["tile"] = _tile(tile)
    return msg


def _tile(t: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "id": int(t["id"]),
        "segment": int(t["segment"]),
        "row": int(t["row"]),
        "col": int(t["col"]),
        "bbox_px": [int(v) for v in t["bbox_px"]],
        "frame_ids": [int(v) for v in t["frame_ids"]],
        "cross_extent_mm": [float(v) for v in t["cross_extent_mm"]],
        "down_extent_mm": [float(v) for v in t["down_extent_mm"]],
    }


def _region(r: Mapping[str, Any]) -> dict[str, Any]:
    x, y, w, h = r["bbox"]
    cx, cy = r["centroid"]
    return {
        "bbox": [int(x), int(y), int(w), int(h)],
        "area": int(r["area"]),
        "centroid": [float(cx), float(cy)],
        "max_score": float(r["max_score"]),
    }


def defect(
    *,
    line: str,
    camera: str,
    frame_id: int,
    verdict_event_id: str,
    score: float,
    image_size: tuple[int, int],
    regions: Sequence[Mapping[str, Any]],
    snapshot: str | None,
    frame_ts_ns: int,
    frame_clock: str,
    model: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """One per NG frame. ``image_size`` is ``(w, h)``; each region is
    ``{"bbox": [x, y, w, h], "area": px, "centroid": [x, y], "max_score": normalised}``
    in original-image pixels. ``verdict_event_id`` links it to its verdict."""
    w, h = image_size
    msg = _header("defect", line, camera)
    msg.update(
        frame_id=int(frame_id),
        verdict_event_id=verdict_event_id,
        score=float(score),
        image_size=[int(w), int(h)],
        regions=[_region(r) for r in regions],
        snapshot=snapshot,
        frame_ts_ns=int(frame_ts_ns),
        frame_clock=frame_clock,
        model=_model(model),
    )
    return msg


DescriptionStatus = Literal["ok", "skipped", "error"]


def description(
    *,
    line: str,
    camera: str,
    frame_id: int,
    defect_event_id: str,
    verdict_event_id: str | None,
    status: DescriptionStatus,
    text: str | None,
    reason: str | None = None,
    n_tokens: int = 0,
    stop_reason: str | None = None,
    n_regions: int = 0,
    prompt: str | None = None,
    latency_ms: Mapping[str, float] | None = None,
    model: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The VLM's description of one defect: exactly one per defect message.

    ``defect_event_id`` is the ``event_id`` of the defect it describes (subscribers join
    on it). ``status`` is ``"ok"`` with ``text``, or ``"skipped"`` / ``"error"`` with
    ``text`` None and ``reason`` saying why (e.g. ``"backlog_full"``). ``latency_ms`` keys:
    queue (defect -> VLM start), vision, prefill, ttft, decode, total (defect -> publish).
    """
    msg = _header("description", line, camera)
    msg.update(
        frame_id=int(frame_id),
        defect_event_id=defect_event_id,
        verdict_event_id=verdict_event_id,
        status=status,
        text=text,
        reason=reason,
        n_tokens=int(n_tokens),
        stop_reason=stop_reason,
        n_regions=int(n_regions),
        prompt=prompt,
        latency_ms={k: float(v) for k, v in (latency_ms or {}).items()},
        model=_model(model),
    )
    return msg


def status(
    *,
    line: str,
    camera: str,
    online: bool,
    state: State,
    camera_state: CameraState,
    detail: str | None = None,
    fps: float | None = None,
    frames: int | None = None,
    ng: int | None = None,
    dropped: int | None = None,
    version: str | None,
    model: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The retained service status (also the shape of the Last Will)."""
    msg = _header("status", line, camera)
    msg.update(
        online=bool(online),
        state=state,
        camera_state=camera_state,
        detail=detail,
        fps=_f(fps),
        frames=_i(frames),
        ng=_i(ng),
        dropped=_i(dropped),
        version=version,
        model=_model(model),
    )
    return msg


def last_will(
    line: str, camera: str, *, version: str | None = None, model: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The status the broker publishes if our connection dies without a clean disconnect.

    Its sent_at / mono_ns are those of the connect (the broker sends it verbatim).
    """
    return status(
        line=line,
        camera=camera,
        online=False,
        state="stopped",
        camera_state="unknown",
        detail="connection lost",
        version=version,
        model=model,
    )


def metrics(
    *,
    line: str,
    camera: str,
    interval_s: float,
    counters: Mapping[str, int],
    fps: float,
    latency_ms: Mapping[str, Mapping[str, float]],
    queue_depth: Mapping[str, int],
    process: Mapping[str, Any],
) -> dict[str, Any]:
    """Periodic metrics: ``latency_ms`` is stage -> {p50, p90, p99, max} (ms; extra numeric keys
    such as a sample count ``n`` are kept);
    ``process`` is {rss_mb, cpu_percent, threads, fds} (fds None or -1 where unknown)."""
    msg = _header("metrics", line, camera)
    msg.update(
        interval_s=float(interval_s),
        counters={k: int(v) for k, v in counters.items()},
        fps=float(fps),
        latency_ms={stage: {k: _num(v) for k, v in q.items()} for stage, q in latency_ms.items()},
        queue_depth={k: int(v) for k, v in queue_depth.items()},
        process={
            "rss_mb": float(process["rss_mb"]),
            "cpu_percent": float(process["cpu_percent"]),
            "threads": int(process["threads"]),
            "fds": _i(process.get("fds")),
        },
    )
    return msg


PositionSource = Literal["lines", "encoder"]


def web_defect(
    *,
    line: str,
    camera: str,
    defect_id: int,
    segment: int,
    cross_mm: float,
    down_mm: float,
    cross_extent_mm: tuple[float, float],
    down_extent_mm: tuple[float, float],
    bbox_px: tuple[int, int, int, int],
    frame_ids: tuple[int, int],
    tile_ids: Sequence[int],
    verdict_event_ids: Sequence[str],
    score: float,
    pieces: int,
    position_source: PositionSource,
    model: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """Line-scan mode: one defect on the web, reported once with its full extent, however
    many overlapping tiles or frames it spans.

    ``cross_mm`` / ``down_mm``: its centre, mm from the web's left edge / from the run's first
    line; ``*_extent_mm``: ``[start, end]``; ``bbox_px``: ``[x, line, w, h]`` in web pixels and
    lines; ``frame_ids``: first and last camera frame it lies in; ``tile_ids`` /
    ``verdict_event_ids``: the tiles whose detections were merged into it; ``score``: the
    highest region score (1.0 = threshold); ``pieces``: detections merged;
    ``position_source``: down-web from line counts or encoder counts.
    """
    x, y, w, h = bbox_px
    msg = _header("web_defect", line, camera)
    msg.update(
        defect_id=int(defect_id),
        segment=int(segment),
        cross_mm=float(cross_mm),
        down_mm=float(down_mm),
        width_mm=round(float(cross_extent_mm[1]) - float(cross_extent_mm[0]), 6),
        length_mm=round(float(down_extent_mm[1]) - float(down_extent_mm[0]), 6),
        cross_extent_mm=[float(cross_extent_mm[0]), float(cross_extent_mm[1])],
        down_extent_mm=[float(down_extent_mm[0]), float(down_extent_mm[1])],
        bbox_px=[int(x), int(y), int(w), int(h)],
        frame_ids=[int(frame_ids[0]), int(frame_ids[1])],
        tile_ids=[int(t) for t in tile_ids],
        verdict_event_ids=list(verdict_event_ids),
        score=float(score),
        pieces=int(pieces),
        position_source=position_source,
        model=_model(model),
    )
    return msg


GapReason = Literal["frame_gap", "invalid_frame", "camera_reconnect", "frame_id_reset"]


def web_gap(
    *,
    line: str,
    camera: str,
    segment: int,
    reason: GapReason,
    last_frame_id: int | None,
    next_frame_id: int,
    missing_frames: int | None,
    missing_lines: int | None,
    from_mm: float,
    to_mm: float,
    position_source: PositionSource,
) -> dict[str, Any]:
    """Line-scan mode: web between ``from_mm`` and ``to_mm`` (down-web) was not inspected,
    and nothing is stitched across it. ``reason``: ``frame_gap`` (frame ids jumped),
    ``invalid_frame`` (frames that could not be used), ``camera_reconnect`` /
    ``frame_id_reset`` (length unknown: ``missing_*`` are null). ``segment`` is the index of
    the stretch of web that starts after the gap (0 = the first)."""
    msg = _header("web_gap", line, camera)
    msg.update(
        segment=int(segment),
        reason=reason,
        last_frame_id=_i(last_frame_id),
        next_frame_id=int(next_frame_id),
        missing_frames=_i(missing_frames),
        missing_lines=_i(missing_lines),
        from_mm=float(from_mm),
        to_mm=float(to_mm),
        position_source=position_source,
    )
    return msg


def to_json(msg: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON. Raises ValueError on NaN / Infinity (not valid JSON)."""
    return json.dumps(msg, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()

