"""Service messages: ``status`` (retained; the Last Will) and ``metrics``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from linecam.messages.base import CameraState, State, _f, _header, _i, _model, _num

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

