"""Line-scan messages: ``web_defect`` (a defect on the web, in mm) and ``web_gap``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from linecam.messages.base import _header, _i, _model

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
