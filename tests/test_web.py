"""The line-scan web machinery without the daemon: tiling, the rolling buffer, positions in
mm (lines or encoder), merging detections from overlapping tiles into web defects (in any
completion order, as several workers produce them), gaps, and the web map."""

from __future__ import annotations

import random

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from linecam import schemas
from linecam.camera.frame import Frame
from linecam.camera.synthetic_web import SyntheticWebSource
from linecam.config import LineScanSettings, WebDefectSpec
from linecam.errors import ConfigError
from linecam.preprocess import Geometry
from linecam.runtime.postprocess import Postprocessor
from linecam.runtime.stats import Counters
from linecam.runtime.linescan import DownWeb, LineScanSession, WebBuffer, WebMap, tile_columns

EID = "00000000-0000-4000-8000-000000000000"


# -- geometry --------------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(tile=st.integers(8, 128), data=st.data())
def test_tile_columns_cover_the_web_and_hold_every_defect_up_to_the_overlap_whole(tile, data):
    overlap = data.draw(st.integers(0, tile - 1))
    width = data.draw(st.integers(tile, 2000))
    xs = tile_columns(width, tile, overlap)
    assert xs[0] == 0 and xs[-1] == width - tile and xs == sorted(set(xs))
    assert all(b - a <= tile - overlap for a, b in zip(xs, xs[1:]))  # never further apart than the stride
    d = data.draw(st.integers(1, max(overlap, 1)))
    x = data.draw(st.integers(0, width - d))
    if d <= overlap or d == 1:
        assert any(t <= x and x + d <= t + tile for t in xs), (xs, x, d)


def test_tile_columns_examples():
    assert tile_columns(256, 64, 24) == [0, 40, 80, 120, 160, 192]
    assert tile_columns(64, 64, 0) == [0]
    assert tile_columns(128, 64, 0) == [0, 64]
    with pytest.raises(ValueError):
        tile_columns(32, 64, 0)


def test_web_buffer_holds_the_recent_lines_contiguously():
    rng = np.random.default_rng(1)
    web = rng.integers(0, 255, (5000, 7, 1), dtype=np.uint8)
    buf = WebBuffer(7, 1, np.dtype(np.uint8), capacity_lines=100)
    buf.reset(0)
    line, keep = 0, 0
    while line < 4900:
        h = int(rng.integers(1, 90))  # one frame taller than the capacity left forces a grow
        keep = max(keep, line - int(rng.integers(0, 60)))
        buf.append(web[line:line + h], keep_from=keep)
        line += h
        assert buf.end_line == line and buf.start_line <= keep
        a = int(rng.integers(keep, line))
        b = int(rng.integers(a + 1, line + 1))
        np.testing.assert_array_equal(buf.view(a, b, 2, 6), web[a:b, 2:6])
    with pytest.raises(IndexError):
        buf.view(line - 5, line + 1, 0, 7)


def test_down_web_from_lines_and_from_encoder_counts():
    d = DownWeb(mm_per_line=0.25)
    d.add_frame(0, 10, None)
    d.add_frame(100, 11, None)
    assert (d.source, d.mm(0), d.mm(150), d.frame_at(99), d.frame_at(100)) == ("lines", 0.0, 37.5, 10, 11)
    # an encoder: the web slows down between frames 1 and 2 (fewer counts per line)
    e = DownWeb(mm_per_line=9.9, mm_per_count=0.01)
    for line0, count in ((0, 5000), (100, 7000), (200, 8000)):
        e.add_frame(line0, line0 // 100, count)
    assert e.source == "encoder"
    assert e.mm(0) == 0.0 and e.mm(100) == pytest.approx(20.0) and e.mm(200) == pytest.approx(30.0)
    assert e.mm(50) == pytest.approx(10.0) and e.mm(150) == pytest.approx(25.0)
    assert e.mm(250) == pytest.approx(35.0)  # past the last frame: the last speed
    # encoder configured, frames without counts: lines, with a warning
    f = DownWeb(mm_per_line=0.5, mm_per_count=0.01)
    f.add_frame(0, 0, None)
    assert f.source == "lines" and f.mm(10) == 5.0


# -- a session fed by the synthetic web, with the real postprocessor as the "model" ------------------
def _detect(tile: Frame, post: Postprocessor):
    """The darkness model's map (1 - brightness), thresholded by the daemon's postprocessor."""
    dark = 1.0 - tile.image.astype(np.float32).mean(axis=2) / 255.0
    h, w = dark.shape
    if post.verdict(float(dark.reshape(h // 4, 4, w // 4, 4).mean(axis=(1, 3)).max())) == "OK":
        return []
    return post.regions(dark, Geometry(0.0, 0.0, float(w), float(h)), (h, w))


def _session(published, **over):
    kw = dict(enabled=True, overlap_px=24, mm_per_px_cross=0.1, mm_per_line=0.2)
    kw.update(over)
    return LineScanSession(LineScanSettings(**kw), (64, 64), line="l", camera="c", image_threshold=0.3,
                           publish=lambda kind, msg: published.append(msg), counters=Counters())


def _run(src, session, order=None, complete_as_we_go=False):
    post = Postprocessor(0.5, 0.3, min_area_px=16)
    tiles = []
    with src:
        while True:
            try:
                f = src.read(timeout=1.0)
            except Exception:
                break
            new = session.push(f)
            if complete_as_we_go:
                for t in new:
                    session.tile_done(t, _detect(t, post), EID)
            tiles += new
    tail = session.finish()
    tiles += tail
    todo = tail if complete_as_we_go else tiles
    if order is not None:
        todo = list(todo)
        random.Random(order).shuffle(todo)
    for t in todo:
        session.tile_done(t, _detect(t, post), EID)
    return tiles


SPECS = [WebDefectSpec(cross_mm=6.4, down_mm=19.2, width_mm=1.2, length_mm=3.0),
         WebDefectSpec(cross_mm=20.0, down_mm=50.0, width_mm=1.0, length_mm=12.0, kind="streak"),  # 60 lines
         WebDefectSpec(cross_mm=12.0, down_mm=300.0, width_mm=2.0, length_mm=4.0, kind="scratch"),
         WebDefectSpec(cross_mm=0.5, down_mm=400.0, width_mm=1.0, length_mm=2.0)]


def _web_source(**over):
    kw = dict(width=256, lines_per_frame=96, line_rate_hz=None, frames=30, mm_per_px_cross=0.1, mm_per_line=0.2,
              defects=SPECS, seed=2)
    kw.update(over)
    return SyntheticWebSource(**kw)


def _summary(published):
    return sorted((m["cross_extent_mm"], m["down_extent_mm"]) for m in published if m["type"] == "web_defect")


@pytest.mark.parametrize("order", [None, 1, 2, 3])
def test_one_web_defect_per_defect_in_any_completion_order(order):
    published: list = []
    session = _session(published)
    src = _web_source()
    _run(src, session, order=order)
    for m in published:
        schemas.validate(m)
    defects = [m for m in published if m["type"] == "web_defect"]
    assert len(defects) == len(SPECS)
    for truth in src.defects:
        x0, y0, x1, y1 = truth.box_px
        (d,) = [m for m in defects if abs(m["down_mm"] - truth.down_mm) < 2 and abs(m["cross_mm"] - truth.cross_mm) < 2]
        assert d["cross_extent_mm"] == pytest.approx([x0 * 0.1, x1 * 0.1], abs=0.25)
        assert d["down_extent_mm"] == pytest.approx([y0 * 0.2, y1 * 0.2], abs=0.5)
    assert sorted(m["defect_id"] for m in defects) == list(range(len(SPECS)))
    # the same web defects whatever order the workers finished the tiles in
    ref: list = []
    _run(_web_source(), _session(ref), order=None)
    assert _summary(published) == _summary(ref)


def test_web_defects_go_out_while_the_web_runs_not_only_at_the_end():
    published: list = []
    session = _session(published)
    post = Postprocessor(0.5, 0.3, min_area_px=16)
    with _web_source(frames=None) as src:
        for _ in range(12):  # 1152 lines: well past the defects at lines 96, 250 (streak), not 1500
            for t in session.push(src.read(timeout=1.0)):
                session.tile_done(t, _detect(t, post), EID)
    downs = sorted(m["down_mm"] for m in published if m["type"] == "web_defect")
    assert downs == pytest.approx([19.3, 50.0], abs=0.5)  # the scratch at 300 mm has not passed yet


def test_reconnect_invalid_frames_and_id_resets_are_gaps_never_stitched():
    published: list = []
    session = _session(published, overlap_px=8)
    web = _web_source(frames=20, defects=[])
    frames = [web.render(k)[:, :, None] for k in range(20)]

    def frame(i, fid=None, **meta):
        return Frame(frame_id=i if fid is None else fid, image=frames[i], timestamp_ns=1, clock="host_monotonic",
                     host_ns=1, meta=meta)

    tiles = []
    for i in range(3):
        tiles += session.push(frame(i))
    tiles += session.interrupt("camera_reconnect")
    tiles += session.push(frame(3))
    tiles += session.push(frame(4, invalid="PixelFormat changed"))
    tiles += session.push(frame(5))
    tiles += session.push(Frame(frame_id=6, image=frames[6][:, :100], timestamp_ns=1, clock="host_monotonic",
                                host_ns=1))  # another width
    tiles += session.push(frame(7))
    tiles += session.push(frame(2, fid=0))  # the camera restarted its count
    tiles += session.finish()
    gaps = [m for m in published if m["type"] == "web_gap"]
    for g in gaps:
        schemas.validate(g)
    got = [(g["reason"], g["last_frame_id"], g["next_frame_id"], g["missing_frames"], g["missing_lines"],
            g["segment"]) for g in gaps]
    assert got == [("camera_reconnect", 2, 3, None, None, 1), ("invalid_frame", 3, 5, 1, 96, 2),
                   ("invalid_frame", 5, 7, 1, 96, 3), ("frame_id_reset", 7, 0, None, None, 4)]
    assert gaps[0]["from_mm"] == gaps[0]["to_mm"] == pytest.approx(3 * 96 * 0.2)  # unknown length: a point
    assert (gaps[1]["from_mm"], gaps[1]["to_mm"]) == pytest.approx((4 * 96 * 0.2, 5 * 96 * 0.2))
    # every tile lies inside one segment, and the segments are [0, 288) [288, 384) [480, 576) [672, 768) [768, 864)
    segments = {0: (0, 288), 1: (288, 384), 2: (480, 576), 3: (672, 768), 4: (768, 864)}
    for t in tiles:
        tile = t.meta["tile"]
        a, b = segments[tile.segment]
        assert a <= tile.line and tile.line + tile.valid_height <= b, tile
        # its pixels are the web's at that place (after the id reset, frame 2's image lies at line 768)
        web = np.concatenate([f[:, :, 0] for f in frames[:8]] + [frames[2][:, :, 0]])
        np.testing.assert_array_equal(t.image[: tile.valid_height, :, 0],
                                      web[tile.line:tile.line + tile.valid_height, tile.x:tile.x + 64])
    # a segment shorter than a tile (one frame of 96 lines; tiles of 64): rows at 0 and flush with the end
    assert sorted({t.meta["tile"].line for t in tiles if t.meta["tile"].segment == 1}) == [288, 320]


def test_a_segment_shorter_than_a_tile_is_padded_and_its_defect_clipped():
    published: list = []
    s = LineScanSession(LineScanSettings(enabled=True, overlap_px=8, mm_per_line=1.0, mm_per_px_cross=1.0),
                        (64, 64), line="l", camera="c", image_threshold=0.3, publish=lambda k, m: published.append(m))
    img = np.full((40, 64, 1), 200, np.uint8)
    img[30:40, 10:20] = 20  # a defect touching the last line of the web
    tiles = s.push(Frame(frame_id=0, image=img, timestamp_ns=1, clock="host_monotonic", host_ns=1)) + s.finish()
    (t,) = tiles
    assert t.image.shape == (64, 64, 1) and t.meta["tile"].valid_height == 40
    assert (t.image[40:, 10:20] == 20).all()  # the last line repeated
    s.tile_done(t, _detect(t, Postprocessor(0.5, 0.3, min_area_px=16)), EID)
    (d,) = [m for m in published if m["type"] == "web_defect"]
    assert d["bbox_px"] == [10, 30, 10, 10] and d["down_extent_mm"] == [30.0, 40.0]


def test_settings_mistakes_are_config_errors():
    with pytest.raises(ConfigError, match="overlap_px 64 must be smaller"):
        LineScanSession(LineScanSettings(enabled=True, overlap_px=64), (64, 64), line="l", camera="c",
                        image_threshold=1.0, publish=lambda k, m: None)
    s = LineScanSession(LineScanSettings(enabled=True, overlap_px=8), (64, 64), line="l", camera="c",
                        image_threshold=1.0, publish=lambda k, m: None)
    with pytest.raises(ConfigError, match="narrower than the 64 px tile"):
        s.push(Frame(frame_id=0, image=np.zeros((10, 32, 1), np.uint8), timestamp_ns=1, clock="host_monotonic",
                     host_ns=1))


def test_encoder_positions_end_to_end():
    """mm_per_line set wrong on purpose: the encoder counts the frames carry must win."""
    published: list = []
    session = _session(published, mm_per_line=5.0, encoder={"mm_per_count": 0.05})
    _run(_web_source(encoder_counts_per_line=4.0), session)  # 4 counts x 0.05 mm = 0.2 mm per line
    defects = [m for m in published if m["type"] == "web_defect"]
    assert len(defects) == len(SPECS) and {m["position_source"] for m in defects} == {"encoder"}
    assert sorted(m["down_mm"] for m in defects) == pytest.approx(sorted(d.down_mm for d in SPECS), abs=0.5)


def test_skipped_tiles_are_counted_and_repeats_ignored(tmp_path):
    published: list = []
    session = LineScanSession(LineScanSettings(enabled=True, overlap_px=8, web_map={"every_s": None}), (64, 64),
                              line="l", camera="c", image_threshold=0.3, publish=lambda k, m: published.append(m),
                              counters=Counters(), map_dir=tmp_path)
    src = _web_source(frames=4, defects=[])
    tiles = []
    with src:
        for _ in range(4):
            tiles += session.push(src.read(timeout=1.0))
    tiles += session.finish()
    for t in tiles:
        session.tile_done(t, [], EID, inspected=t.frame_id % 2 == 0)
        session.tile_done(t, [], EID, inspected=False)  # a repeat: ignored
    c = session._counters.snapshot()
    assert c["web_tiles_skipped"] == len(tiles) // 2 and c["tiles"] == len(tiles) and c["web_lines"] == 4 * 96
    img = cv2.imread(str(session.map_path))[:-WebMap.LEGEND_ROWS]  # the map, without its legend band
    assert img is not None and ((img[:, :, 0] == 255) & (img[:, :, 1] == 80)).any()  # blue: not inspected


def test_web_map_downsamples_and_stays_bounded(tmp_path):
    m = WebMap(web_width=2048, mm_per_px_cross=0.05, mm_per_line=0.1, max_width=512, max_height=200)
    assert (m.sx, m.sy, m.width) == (4, 2, 512)  # 0.2 mm square map pixels
    stripe = np.full((100, 2048, 1), 200, np.uint8)
    stripe[40:60, 1000:1040] = 0
    for i in range(10):
        m.add(stripe, 8, i * 100, new_segment=i == 0)
    # 1000 lines / 2 = 500 rows > 200: the down-web scale was halved until the map fits
    assert m._rows <= 200 and m.sy >= 4 and abs(m._rows * m.sy - 1000) <= 2 * m.sy
    m.box(1000, 740, 1040, 760, "0")
    img = cv2.imread(str(m.write(tmp_path / "map.png")))
    assert img.shape == (m._rows + WebMap.LEGEND_ROWS, 512, 3)
    legend, img = img[m._rows:], img[:m._rows]
    assert (legend == 255).mean() > 0.5 and ((legend[:, :, 2] == 255) & (legend[:, :, 1] == 0)).any()  # red swatch
    red = (img[:, :, 2] == 255) & (img[:, :, 1] == 0) & (img[:, :, 0] == 0)
    ys, xs = np.nonzero(red)
    assert 240 <= xs.min() <= 250 and 258 <= xs.max() <= 275
    assert 740 / m.sy - 4 <= ys.min() <= 740 / m.sy and 760 / m.sy <= ys.max() <= 760 / m.sy + 4
    dark = img[:, :, 0] < 100  # the web's dark marks survive the downsampling, one per 100 lines
    assert dark[:, 250:260].any(axis=1).sum() >= 10
    assert img[30, 100].tolist() == [200, 200, 200]
    assert not list(tmp_path.glob(".tmp-*"))  # written atomically


def test_unusable_first_frames_are_no_gap():
    published: list = []
    s = _session(published, overlap_px=8)
    bad = Frame(frame_id=0, image=np.empty((0, 0, 1), np.uint8), timestamp_ns=1, clock="host_monotonic", host_ns=1,
                meta={"invalid": "short buffer"})
    good = _web_source(frames=3, defects=[]).render(1)[:, :, None]
    assert s.push(bad) == []
    assert s.push(Frame(frame_id=1, image=bad.image, timestamp_ns=1, clock="host_monotonic", host_ns=1,
                        meta={"invalid": "short buffer"})) == []
    tiles = s.push(Frame(frame_id=2, image=good, timestamp_ns=1, clock="host_monotonic", host_ns=1)) + s.finish()
    assert tiles and not [m for m in published if m["type"] == "web_gap"]
    assert {t.meta["tile"].segment for t in tiles} == {0}
