"""Detections being merged into one web defect (:class:`Group`) and web gaps (:class:`Break`)."""

from __future__ import annotations

from dataclasses import dataclass

from linecam.runtime.linescan.tiles import GapReason

@dataclass(slots=True)
class Group:
    """Detections (web pixel boxes) already merged into one web defect."""

    segment: int
    x0: int
    y0: int
    x1: int
    y1: int
    score: float
    tiles: set[int]
    verdicts: set[str]
    pieces: int = 1

    def touches(self, x0: int, y0: int, x1: int, y1: int, gap: int) -> bool:
        return x0 < self.x1 + gap and self.x0 < x1 + gap and y0 < self.y1 + gap and self.y0 < y1 + gap

    def absorb(self, o: Group) -> None:
        self.x0, self.y0 = min(self.x0, o.x0), min(self.y0, o.y0)
        self.x1, self.y1 = max(self.x1, o.x1), max(self.y1, o.y1)
        self.score = max(self.score, o.score)
        self.tiles |= o.tiles
        self.verdicts |= o.verdicts
        self.pieces += o.pieces


@dataclass(slots=True)
class Break:
    """A web gap being measured: from the end of the last segment to the next good frame."""

    reason: GapReason
    last_frame_id: int | None
    from_line: int
    missing: int | None  # frames known lost; None when unknown
