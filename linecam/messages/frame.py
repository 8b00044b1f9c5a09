"""Per-frame messages: ``verdict`` (one per frame), ``defect`` (one per NG frame), ``description``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from linecam.messages.base import Verdict, _f, _header, _model

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
    source: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One verdict per frame (in line-scan mode: per tile, ``frame_id`` = tile id).

    ``score = score_raw / threshold``: 1.0 is the NG threshold for every model.
    ``SKIPPED`` means the frame was not inspected and ``reason`` says why (e.g.
    ``"queue_full"``). ``latency_ms`` keys: queue, preprocess, inference, postprocess,
    total (frame ready on the host -> publish); a SKIPPED verdict may carry only some.
    ``tile`` (line-scan mode only; the key is absent otherwise): where the tile lies on the
    web, see :func:`linecam.runtime.linescan.LineScanSession`. ``source`` (replay only; absent
    otherwise): the file the frame came from, ``{path, index, loop}``.
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
    if source is not None and source.get("path"):
        msg["source"] = {"path": str(source["path"]), "index": int(source.get("index", 0)),
                         "loop": int(source.get("loop", 0))}
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
    out = {
        "bbox": [int(x), int(y), int(w), int(h)],
        "area": int(r["area"]),
        "centroid": [float(cx), float(cy)],
        "max_score": float(r["max_score"]),
    }
    if r.get("labels"):  # the text expert's named prompts that fired (optional: older events lack it)
        out["labels"] = [str(v) for v in r["labels"]]
    return out


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
    in original-image pixels, plus ``"labels": [names]`` when a text expert's named prompts fired. ``verdict_event_id`` links it to its verdict."""
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
    queue (defect -> VLM start), vision, prefill, ttft, decode, total (defect -> publish), and
    inject (region projector + token slots) when the VLM bundle has a region projector.
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
