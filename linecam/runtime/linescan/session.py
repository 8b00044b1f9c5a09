"""Continuous web inspection for line-scan cameras: frames -> tiles -> web defects in mm.

A line-scan camera sends frames of ``Height`` lines of one continuous web; defects do not
respect frame boundaries, so :class:`LineScanSession` (one per run, ``linescan.enabled``):

1. appends each frame to a rolling web buffer (:class:`WebBuffer`) at web line ``line0`` =
   where the previous frame ended, plus ``Height`` per missing frame id;
2. cuts tiles of ``tile_size`` with ``overlap_px`` overlap across and along the web
   (:func:`tile_columns`; at least the largest defect expected, so every defect lies whole
   inside some tile); each tile is a :class:`~linecam.camera.frame.Frame` (``frame_id`` =
   tile id, ``meta["tile"]`` = :class:`Tile`) for the region expert, one verdict per tile;
3. maps every tile's regions to web pixels and merges those that overlap or touch into one
   web defect with its full extent, published (``web_defect``) once no tile still to come
   can touch it;
4. treats a gap in frame ids (or an unconvertible frame, or a camera reconnect) as a web
   gap: the segment before it is closed, a ``web_gap`` event is published, and nothing is
   stitched across it;
5. keeps a downsampled map of the web (:class:`WebMap`), written as a PNG at the end of the
   run (and every ``web_map.every_s``).

Positions: cross-web mm = web column x ``mm_per_px_cross``; down-web mm from the first
line of the run = line x ``mm_per_line``, or, with ``encoder.mm_per_count`` and frames
that carry ``meta["encoder_count"]`` (counts at their first line), encoder counts
interpolated between frames (:class:`DownWeb`). Threads: push, interrupt and finish run on
the acquisition thread, tile_done on the workers (once per tile, SKIPPED too: ``coverage``).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from linecam import messages
from linecam.camera.frame import Frame
from linecam.config import LineScanSettings
from linecam.runtime.linescan.coverage import Coverage, tiles_per_frame
from linecam.runtime.linescan.groups import Break, Group
from linecam.runtime.linescan.tiles import DownWeb, GapReason, Tile, WebBuffer, check_geometry, tile_columns
from linecam.runtime.linescan.webmap import WebMap

logger = logging.getLogger(__name__)

Publish = Callable[[str, dict[str, Any]], None]


class LineScanSession:
    """Line-scan mode of one daemon run (see the module docstring).

    ``publish(kind, msg)`` sends a ``web_defect`` / ``web_gap`` message; ``on_gap(detail)``
    is told about each gap (the daemon puts it in its status); ``counters`` (optional) gets
    ``tiles``, ``web_lines``, ``web_gaps``, ``web_defects``, ``web_tiles_skipped``;
    ``on_uninspected`` / ``on_covered`` (detail): tiles not inspected, and inspected again
    (:class:`~linecam.runtime.linescan.coverage.Coverage`).
    """

    def __init__(self, settings: LineScanSettings, tile_size: tuple[int, int], *, line: str, camera: str,
                 image_threshold: float, publish: Publish, counters: Any = None,
                 on_gap: Callable[[str], None] | None = None, model: dict[str, Any] | None = None,
                 map_dir: Path | None = None, on_uninspected: Callable[[str], None] | None = None,
                 on_covered: Callable[[str], None] | None = None) -> None:
        tw, th = int(tile_size[0]), int(tile_size[1])
        ov = int(settings.overlap_px)
        check_geometry((tw, th), ov)
        self.settings = settings
        self.tile_w, self.tile_h, self.overlap = tw, th, ov
        self.stride = th - ov
        self.line, self.camera = line, camera
        self.image_threshold = float(image_threshold)
        self._publish = publish
        self._counters = counters
        self._on_gap = on_gap
        self._model = model
        self._map_dir = map_dir
        self.down = DownWeb(settings.mm_per_line, settings.encoder.mm_per_count if settings.encoder else None)
        self.coverage = Coverage(settings.mm_per_px_cross, self.down.mm, on_uninspected, on_covered)
        self.map: WebMap | None = None
        self.map_path: Path | None = None
        self._started = datetime.now(timezone.utc)
        # layout, from the first good frame
        self._width: int | None = None
        self._layout: tuple[int, str, int] | None = None
        self._xs: list[int] = []
        self._buffer: WebBuffer | None = None
        self._h_nominal = 0
        # acquisition state
        self._last_id: int | None = None
        self._next_line = 0  # web line where the next frame (id last + 1) starts
        self._seg = -1
        self._seg_open = False
        self._seg_start = 0
        self._next_row = 0  # web line of the next tile row in this segment
        self._row_end = 0  # one past the last line covered by a cut row
        self._rows = 0
        self._tile_id = 0
        self._last_ts: tuple[int, str, int, int] = (0, "host_monotonic", 0, 8)  # ts, clock, host_ns, bit depth
        self._break: Break | None = None
        self._warned: set[str] = set()
        # shared with the workers (under _lock)
        self._lock = threading.Lock()
        self._pending: dict[int, Tile] = {}
        self._floor: dict[int, int] = {}  # segment -> no future tile starts above this line
        self._closed_segments: set[int] = set()
        self._groups: list[Group] = []
        self._finished = False
        self._all_done = False
        self._defect_seq = 0
        self._map_lock = threading.Lock()
        self._map_written = time.monotonic()
        #: The latest web_defect / web_gap messages published (bounded: a daemon runs for weeks).
        self.published: deque[dict[str, Any]] = deque(maxlen=1024)

    # -- acquisition thread ------------------------------------------------------------------
    def push(self, frame: Frame) -> list[Frame]:
        """Take one camera frame; return the tiles it completes (to be inspected)."""
        problem = self._problem(frame)
        tiles: list[Frame] = []
        if problem is not None:
            self._count("web_frames_invalid")
            if problem not in self._warned:
                self._warned.add(problem)
                logger.warning("line-scan frame %d not usable (%s): a web gap", frame.frame_id, problem)
            tiles += self._close_segment()
            self._start_break("invalid_frame")
            if self._break is not None and self._break.missing is not None:
                gap = 0 if self._last_id is None else max(frame.frame_id - self._last_id - 1, 0)
                self._break.missing += 1 + gap
            if self._last_id is not None and frame.frame_id > self._last_id:
                self._next_line += (frame.frame_id - self._last_id) * self._h_nominal
            self._last_id = frame.frame_id if self._last_id is None else max(self._last_id, frame.frame_id)
            return tiles

        h = frame.height
        fid = frame.frame_id
        if self._last_id is None:
            line0 = 0
        else:
            d = fid - self._last_id
            if d == 1:
                line0 = self._next_line
            elif d > 1:
                line0 = self._next_line + (d - 1) * self._h_nominal
                tiles += self._close_segment()
                self._start_break("frame_gap")
                if self._break is not None and self._break.missing is not None:
                    self._break.missing += d - 1
            else:  # the camera restarted its count: where we are on the web is unknown
                line0 = self._next_line
                tiles += self._close_segment()
                self._start_break("frame_id_reset")
                if self._break is not None:
                    self._break.missing = None
        new_segment = not self._seg_open
        if new_segment:
            self._open_segment(line0, fid)
        enc = frame.meta.get("encoder_count") if frame.meta else None
        self.down.add_frame(line0, fid, None if enc is None else float(enc))
        buf = self._buffer
        assert buf is not None
        buf.append(frame.image, keep_from=min(self._next_row, buf.end_line + h - self.tile_h))
        if self.map is not None:
            self.map.add(frame.image, frame.bit_depth, line0, new_segment)
        self._last_id, self._next_line = fid, line0 + h
        self._last_ts = (frame.timestamp_ns, frame.clock, frame.host_ns, frame.bit_depth)
        self._count("web_lines", h)
        while self._next_row + self.tile_h <= buf.end_line:
            tiles += self._cut_row(self._next_row, self.tile_h)
            self._next_row += self.stride
        with self._lock:
            self._floor[self._seg] = max(self._seg_start, buf.end_line - self.tile_h)
            finals = self._collect_final()
        self._emit(finals)
        return tiles

    def interrupt(self, reason: GapReason = "camera_reconnect") -> list[Frame]:
        """The camera was reconnected (or the web otherwise broke): close the segment;
        the web gap is reported when the next frame arrives (its size is unknown)."""
        tiles = self._close_segment()
        self._start_break(reason)
        if self._break is not None:
            self._break.missing = None
        return tiles

    def finish(self) -> list[Frame]:
        """End of the run: the tiles of the segment's tail. Web defects still open are
        published, and the web map written, once the last tile is done (at once if none is
        pending)."""
        tiles = self._close_segment()
        with self._lock:
            self._finished = True
            finals = self._final_if_all_done()
            done = self._all_done
        self._emit(finals)
        if done:
            self.write_map(final=True)
        return tiles

    @property
    def tiles_per_frame(self) -> int | None:
        return tiles_per_frame(len(self._xs), self._h_nominal, self.stride) if self._xs else None

    # -- worker threads ------------------------------------------------------------------------
    def tile_done(self, frame: Frame, regions: Sequence[Any], verdict_event_id: str, inspected: bool = True) -> None:
        """One tile's result (``regions``: :class:`~linecam.runtime.postprocess.Region` in tile
        pixels). Call once per tile; repeats are ignored."""
        tile = frame.meta.get("tile") if frame.meta else None
        if not isinstance(tile, Tile):
            return
        gap = self.settings.merge_gap_px
        with self._lock:
            if self._pending.pop(tile.id, None) is None:
                return
            for r in regions:
                bx, by, bw, bh = r.bbox
                y1 = min(by + bh, tile.valid_height)
                if y1 <= by:
                    continue  # only in the padding of a short tail tile
                g = Group(tile.segment, tile.x + bx, tile.line + by, tile.x + bx + bw, tile.line + y1,
                           float(r.max_score) / self.image_threshold, {tile.id}, {verdict_event_id})
                touching = [o for o in self._groups
                            if o.segment == g.segment and o.touches(g.x0, g.y0, g.x1, g.y1, gap)]
                for o in touching:
                    g.absorb(o)
                    self._groups.remove(o)
                self._groups.append(g)
            finals = self._collect_final() + self._final_if_all_done()
            write_map = self._all_done
        self.coverage.done(tile.x, tile.x + tile.width, tile.line, tile.line + tile.valid_height, inspected)
        if not inspected:
            self._count("web_tiles_skipped")
            if self.map is not None:
                self.map.skipped(tile.x, tile.line, tile.x + tile.width, tile.line + tile.valid_height)
        self._emit(finals)
        if write_map:
            self.write_map(final=True)
            return
        every = self.settings.web_map.every_s
        if every is not None and self.map is not None and time.monotonic() - self._map_written >= every:
            # Encoding a long map takes a while: never on an inference worker's time.
            self._map_written = time.monotonic()
            threading.Thread(target=self.write_map, name="webmap", daemon=True).start()

    # -- web map ---------------------------------------------------------------------------------
    def write_map(self, final: bool = False) -> Path | None:
        """Write the web map PNG now (one writer at a time; a periodic write is skipped while
        another runs). Returns its path, or None when disabled, empty or busy."""
        if self.map is None or self._map_dir is None:
            return None
        if not self._map_lock.acquire(blocking=final):
            return None
        try:
            self._map_written = time.monotonic()
            if self.map_path is None:
                stamp = self._started.strftime("%Y%m%dT%H%M%SZ")
                self.map_path = self._map_dir / f"webmap_{self.line}_{self.camera}_{stamp}.png"
            try:
                self.map.write(self.map_path)
            except (OSError, cv2.error) as e:  # disk full etc.: inspection goes on
                logger.warning("web map %s not written: %s", self.map_path, e)
                return None
            if final:
                logger.info("web map written: %s", self.map_path)
            return self.map_path
        finally:
            self._map_lock.release()

    # -- internals ---------------------------------------------------------------------------------
    def _count(self, name: str, n: int = 1) -> None:
        if self._counters is not None:
            self._counters.inc(name, n)

    def _problem(self, frame: Frame) -> str | None:
        invalid = frame.meta.get("invalid") if frame.meta else None
        if invalid:
            return str(invalid)
        img = frame.image
        if not isinstance(img, np.ndarray) or img.ndim != 3 or img.shape[2] not in (1, 3) or 0 in img.shape \
                or img.dtype not in (np.uint8, np.uint16):
            return "image is not (H, W, 1|3) uint8/uint16"
        layout = (int(img.shape[2]), str(img.dtype), int(frame.bit_depth))
        if self._width is None:
            self._init_layout(frame)
            return None
        if img.shape[1] != self._width:
            return f"{img.shape[1]} px wide, but the web started {self._width} px wide"
        if layout != self._layout:
            return f"pixel layout {layout} differs from the web's {self._layout}"
        return None

    def _init_layout(self, frame: Frame) -> None:
        h, w, c = frame.image.shape
        check_geometry((self.tile_w, self.tile_h), self.overlap, int(w))
        self._width = int(w)
        self._layout = (int(c), str(frame.image.dtype), int(frame.bit_depth))
        self._h_nominal = int(h)
        self._xs = tile_columns(w, self.tile_w, self.overlap)
        cap = 2 * (self.tile_h + h) + self.stride
        self._buffer = WebBuffer(w, c, frame.image.dtype, cap)
        ms = self.settings.web_map
        if ms.enabled and self._map_dir is not None:
            self.map = WebMap(w, self.settings.mm_per_px_cross, self.settings.mm_per_line, ms.max_width_px,
                              ms.max_height_px)
        logger.info("line-scan: web %d px (%.1f mm) wide, %d lines/frame, %d tile(s) of %dx%d across, "
                    "overlap %d px, a tile row every %d lines", w, w * self.settings.mm_per_px_cross, h,
                    len(self._xs), self.tile_w, self.tile_h, self.overlap, self.stride)

    def _start_break(self, reason: GapReason) -> None:
        if self._break is None and self._last_id is not None and self._seg >= 0:  # a gap after some web
            self._break = Break(reason, self._last_id, self._next_line, 0)

    def _open_segment(self, line0: int, frame_id: int) -> None:
        brk, self._break = self._break, None
        self._seg += 1
        self._seg_open = True
        self._seg_start = self._next_row = self._row_end = line0
        assert self._buffer is not None
        self._buffer.reset(line0)
        with self._lock:
            self._floor[self._seg] = line0
        if brk is None:
            return
        missing_lines = None if brk.missing is None else max(line0 - brk.from_line, 0)
        from_mm, to_mm = round(self.down.mm(brk.from_line), 3), round(self.down.mm(line0), 3)
        msg = messages.web_gap(line=self.line, camera=self.camera, segment=self._seg, reason=brk.reason,
                               last_frame_id=brk.last_frame_id, next_frame_id=frame_id,
                               missing_frames=brk.missing, missing_lines=missing_lines,
                               from_mm=from_mm, to_mm=max(to_mm, from_mm), position_source=self.down.source)
        self._count("web_gaps")
        what = f"{brk.missing} frame(s)" if brk.missing is not None else "an unknown length"
        detail = (f"web gap ({brk.reason}): {what} missing after frame {brk.last_frame_id}, "
                  f"{from_mm:.1f}-{max(to_mm, from_mm):.1f} mm down-web not inspected")
        logger.warning("%s", detail)
        self.published.append(msg)
        self._publish("web_gap", msg)
        if self._on_gap is not None:
            self._on_gap(detail)

    def _close_segment(self) -> list[Frame]:
        if not self._seg_open:
            return []
        self._seg_open = False
        buf = self._buffer
        assert buf is not None
        end = buf.end_line
        tiles: list[Frame] = []
        if end > self._row_end:  # lines below the last full row: one more row, flush with the end
            if end - self._seg_start >= self.tile_h:
                tiles = self._cut_row(end - self.tile_h, self.tile_h)
            else:
                tiles = self._cut_row(self._seg_start, end - self._seg_start)
        with self._lock:
            self._closed_segments.add(self._seg)
            finals = self._collect_final()
        self._emit(finals)
        return tiles

    def _cut_row(self, line: int, valid: int) -> list[Frame]:
        buf = self._buffer
        assert buf is not None
        ts, clock, host_ns, bit_depth = self._last_ts
        f0, f1 = self.down.frame_at(line), self.down.frame_at(line + valid - 1)
        mm_x, down = self.settings.mm_per_px_cross, self.down
        y0_mm, y1_mm = round(down.mm(line), 3), round(down.mm(line + valid), 3)
        out: list[Frame] = []
        tiles: list[Tile] = []
        for col, x in enumerate(self._xs):
            img = buf.view(line, line + valid, x, x + self.tile_w)
            if valid < self.tile_h:  # a segment shorter than a tile: pad by repeating its last line
                img = np.concatenate([img, np.repeat(img[-1:], self.tile_h - valid, axis=0)])
            else:
                img = img.copy()  # the buffer's lines move on
            fields = {"id": self._tile_id, "segment": self._seg, "row": self._rows, "col": col,
                      "bbox_px": [x, line, self.tile_w, valid], "frame_ids": [f0, f1],
                      "cross_extent_mm": [round(x * mm_x, 3), round((x + self.tile_w) * mm_x, 3)],
                      "down_extent_mm": [y0_mm, y1_mm]}
            t = Tile(self._tile_id, self._seg, self._rows, col, x, line, self.tile_w, self.tile_h, valid,
                     (f0, f1), fields)
            tiles.append(t)
            out.append(Frame(frame_id=self._tile_id, image=img, timestamp_ns=ts, clock=clock,  # type: ignore[arg-type]
                             host_ns=host_ns, bit_depth=bit_depth, meta={"tile": t}))
            self._tile_id += 1
        with self._lock:
            for t in tiles:
                self._pending[t.id] = t
        self._rows += 1
        self._row_end = max(self._row_end, line + valid)
        self._count("tiles", len(out))
        return out

    def _collect_final(self) -> list[Group]:
        """Groups no pending or future tile can touch any more (call under _lock)."""
        if not self._groups:
            return []
        gap = self.settings.merge_gap_px
        marks: dict[int, float] = {}
        for t in self._pending.values():
            marks[t.segment] = min(marks.get(t.segment, math.inf), t.line)
        final, keep = [], []
        for g in self._groups:
            floor = math.inf if g.segment in self._closed_segments else self._floor.get(g.segment, -math.inf)
            mark = min(floor, marks.get(g.segment, math.inf))
            (final if g.y1 + gap <= mark else keep).append(g)
        self._groups = keep
        return final

    def _final_if_all_done(self) -> list[Group]:
        if not self._finished or self._pending or self._all_done:
            return []
        self._all_done = True
        rest, self._groups = self._groups, []
        return rest

    def _emit(self, groups: list[Group]) -> None:
        for g in sorted(groups, key=lambda g: (g.segment, g.y0, g.x0)):
            with self._lock:
                did = self._defect_seq
                self._defect_seq += 1
            mx, down = self.settings.mm_per_px_cross, self.down
            x0, x1 = round(g.x0 * mx, 3), round(g.x1 * mx, 3)
            y0, y1 = round(down.mm(g.y0), 3), round(down.mm(g.y1), 3)
            msg = messages.web_defect(
                line=self.line, camera=self.camera, defect_id=did, segment=g.segment,
                cross_mm=round((x0 + x1) / 2, 3), down_mm=round((y0 + y1) / 2, 3), cross_extent_mm=(x0, x1),
                down_extent_mm=(y0, y1),
                bbox_px=(g.x0, g.y0, g.x1 - g.x0, g.y1 - g.y0),
                frame_ids=(down.frame_at(g.y0), down.frame_at(g.y1 - 1)), tile_ids=sorted(g.tiles),
                verdict_event_ids=sorted(g.verdicts), score=g.score, pieces=g.pieces,
                position_source=down.source, model=self._model)
            self._count("web_defects")
            if self.map is not None:
                self.map.box(g.x0, g.y0, g.x1, g.y1, str(did))
            self.published.append(msg)
            self._publish("web_defect", msg)
