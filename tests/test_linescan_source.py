"""The synthetic line-scan web source: a continuous web, defects where the ground truth says,
frames paced at the line rate, dropped frames as gaps in frame ids."""

from __future__ import annotations

import time

import numpy as np
import pytest

from linecam.camera.base import SourceExhausted
from linecam.camera.synthetic_web import DEFECT_LEVEL, SyntheticWebSource
from linecam.config import WebDefectSpec, parse_config
from linecam.errors import CameraError
from linecam.runtime.sources import open_source

DEFECTS = [
    WebDefectSpec(cross_mm=5.0, down_mm=9.6, width_mm=1.2, length_mm=1.6),  # across the frame 0/1 boundary
    WebDefectSpec(cross_mm=15.0, down_mm=30.0, width_mm=0.8, length_mm=5.0, kind="streak"),
    WebDefectSpec(cross_mm=10.0, down_mm=45.0, width_mm=2.0, length_mm=2.0, kind="scratch"),
]


def _read_all(src: SyntheticWebSource) -> list:
    frames = []
    with src:
        while True:
            try:
                f = src.read(timeout=1.0)
            except SourceExhausted:
                return frames
            if f is not None:
                frames.append(f)


def test_frames_are_consecutive_stretches_of_one_web():
    a = _read_all(SyntheticWebSource(width=200, lines_per_frame=96, line_rate_hz=None, frames=8, defects=DEFECTS))
    assert [f.frame_id for f in a] == list(range(8))
    for f in a:
        assert f.image.shape == (96, 200, 1) and f.image.dtype == np.uint8 and f.bit_depth == 8
        assert f.meta["line0"] == f.frame_id * 96 and f.clock == "host_monotonic"
    # The same web cut into frames of another height is the same web: nothing depends on the frame.
    b = _read_all(SyntheticWebSource(width=200, lines_per_frame=64, line_rate_hz=None, frames=12, defects=DEFECTS))
    web_a = np.concatenate([f.image for f in a])
    web_b = np.concatenate([f.image for f in b])
    np.testing.assert_array_equal(web_a, web_b)
    # and the same seed gives the same web again
    c = _read_all(SyntheticWebSource(width=200, lines_per_frame=96, line_rate_hz=None, frames=8, defects=DEFECTS))
    np.testing.assert_array_equal(web_a, np.concatenate([f.image for f in c]))


def test_defects_are_dark_exactly_where_the_ground_truth_says():
    src = SyntheticWebSource(width=200, lines_per_frame=96, line_rate_hz=None, frames=8, defects=DEFECTS,
                             mm_per_px_cross=0.1, mm_per_line=0.1)
    frames = _read_all(src)
    web = np.concatenate([f.image[:, :, 0] for f in frames]).astype(int)
    truth = src.defects
    assert [(d.cross_mm, d.down_mm) for d in truth] == [(5.0, 9.6), (15.0, 30.0), (10.0, 45.0)]
    assert truth[0].box_px == pytest.approx((44.0, 88.0, 56.0, 104.0))  # mm / (mm per px), centred
    assert truth[0].lines == (88, 104)  # across the boundary at line 96
    inside = np.zeros(web.shape, bool)
    near = np.zeros(web.shape, bool)
    for d in truth:
        x0, y0, x1, y1 = (int(round(v)) for v in d.box_px)
        near[max(y0 - 2, 0):y1 + 2, max(x0 - 2, 0):x1 + 2] = True
        cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
        inside[cy - 1:cy + 2, cx - 1:cx + 2] = True  # the core of every kind (the scratch's diagonal too)
    assert web[inside].max() <= DEFECT_LEVEL + 15
    assert web[~near].min() >= 150  # the bright web everywhere else
    # the spot across the frame boundary is dark on both sides of it
    assert web[95, 48:52].max() < 100 and web[96, 48:52].max() < 100
    assert [f.meta["defects"] for f in frames[:2]] == [[0], [0]]
    # spot: lines 88-104, streak 275-325, scratch 440-460
    assert [f.truth for f in frames] == [True, True, True, True, True, False, False, False]


def test_dropped_frames_leave_a_gap_in_ids():
    frames = _read_all(SyntheticWebSource(width=64, lines_per_frame=16, line_rate_hz=None, frames=8,
                                          drop_frames=[2, 5, 6]))
    assert [f.frame_id for f in frames] == [0, 1, 3, 4, 7]
    assert [f.meta["dropped_before"] for f in frames] == [0, 0, 1, 0, 2]
    assert [f.meta["line0"] for f in frames] == [0, 16, 48, 64, 112]


def test_paced_at_the_line_rate():
    src = SyntheticWebSource(width=64, lines_per_frame=96, line_rate_hz=9600.0, frames=11)  # 100 frames/s
    with src:
        assert src.read(timeout=1.0) is not None
        t0 = time.monotonic()
        for _ in range(10):
            assert src.read(timeout=1.0) is not None
        dt = time.monotonic() - t0
    assert 0.09 <= dt < 0.5, dt
    with SyntheticWebSource(width=64, lines_per_frame=96, line_rate_hz=96.0) as slow:  # 1 frame/s
        assert slow.read(timeout=1.0) is not None
        t0 = time.monotonic()
        assert slow.read(timeout=0.05) is None  # not due yet: a timeout, never a long block
        assert time.monotonic() - t0 < 0.3


def test_encoder_counts_and_colour():
    frames = _read_all(SyntheticWebSource(width=64, lines_per_frame=10, line_rate_hz=None, frames=3,
                                          encoder_counts_per_line=2.5, mono=False))
    assert [f.meta["encoder_count"] for f in frames] == [0, 25, 50]
    f = frames[0]
    assert f.image.shape == (10, 64, 3) and (f.image[:, :, 0] == f.image[:, :, 2]).all()


def test_random_defects_are_listed_and_drawn():
    src = SyntheticWebSource(width=300, lines_per_frame=64, line_rate_hz=None, frames=40, defect_rate=0.5,
                             defect_size_px=(8, 16), seed=3)
    frames = _read_all(src)
    web = np.concatenate([f.image[:, :, 0] for f in frames])
    truth = src.defects
    assert 10 <= len(truth) <= 30
    for d in truth:
        assert d.kind in ("spot", "scratch", "streak")
        x0, y0, x1, y1 = d.box_px
        assert 0 <= x0 < x1 <= 300 and 8 <= y1 - y0 <= 16
        cy, cx = int((y0 + y1) / 2), int((x0 + x1) / 2)
        if cy < web.shape[0]:
            assert web[cy, cx] < 100, d
    listed = {i for f in frames for i in f.meta["defects"]}
    assert listed == {d.id for d in truth if d.box_px[1] < web.shape[0]}


def test_mistakes_are_one_line_errors():
    with pytest.raises(CameraError, match="does not fit"):
        SyntheticWebSource(width=100, defects=[WebDefectSpec(cross_mm=9.9, down_mm=1, width_mm=1, length_mm=1)])
    with pytest.raises(CameraError, match="open"):
        SyntheticWebSource(width=100).read(0.1)
    with SyntheticWebSource(width=64, lines_per_frame=4, frames=1, line_rate_hz=None) as src:
        src.read(0.1)
        with pytest.raises(SourceExhausted):
            src.read(0.1)


def test_config_section_builds_the_source(tmp_path):
    cfg = parse_config({"camera": {"kind": "synthetic_web", "width": 128, "lines_per_frame": 32, "frames": 2,
                                   "line_rate_hz": None, "drop_frames": [0],
                                   "defects": [{"cross_mm": 3, "down_mm": 2, "width_mm": 1, "length_mm": 1}]},
                        "model": {"bundle": "b"}}, tmp_path / "x.yaml")
    src = open_source(cfg.camera)
    assert isinstance(src, SyntheticWebSource) and src.width == 128 and src.drop_frames == {0}
    frames = _read_all(src)
    assert [f.frame_id for f in frames] == [1]
