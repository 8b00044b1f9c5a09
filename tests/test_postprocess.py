"""Postprocessor: regions mapped back to source pixels, verdicts, invalid maps.

Expected boxes are worked out by hand from the rule "map pixel i covers source
[off + i*s, off + (i+1)*s)", rounded outwards to whole pixels.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from linecam.preprocess import CropSpec, Geometry, PreprocessSpec, Preprocessor
from linecam.runtime.postprocess import Postprocessor, Region


def _pp(**kw) -> Postprocessor:
    kw.setdefault("pixel_threshold", 0.5)
    kw.setdefault("image_threshold", 0.8)
    return Postprocessor(**kw)


def test_blob_without_crop_non_square_scale():
    # 640x320 source, 64x64 map: 10 source px per map column, 5 per map row.
    geom = Preprocessor(PreprocessSpec(input_size=(256, 256))).geometry(320, 640)
    amap = np.zeros((64, 64), np.float32)
    amap[10:15, 20:28] = 1.0  # rows 10..14, cols 20..27
    amap[12, 25] = 3.0
    (r,) = _pp().regions(amap, geom)
    assert r.bbox == (200, 50, 80, 25)
    assert r.area == 5 * 8 * 50
    assert r.centroid == pytest.approx(((23.5 + 0.5) * 10, (12 + 0.5) * 5))
    assert r.max_score == pytest.approx(3.0)


def test_blob_with_crop_fractional_scale():
    # Crop 96x160 at (101, 37); map 32 rows x 64 cols -> sx = 1.5, sy = 5.
    spec = PreprocessSpec(input_size=(128, 128), crop=CropSpec(top=37, left=101, height=160, width=96))
    geom = Preprocessor(spec).geometry(480, 640)
    assert geom == Geometry(101.0, 37.0, 96.0, 160.0)
    amap = np.zeros((1, 1, 32, 64), np.float32)
    amap[0, 0, 2:4, 3:5] = 0.7
    (r,) = _pp().regions(amap, geom)
    # x: [101 + 3*1.5, 101 + 5*1.5) = [105.5, 108.5) -> pixels 105..108
    # y: [37 + 2*5, 37 + 4*5) = [47, 57)
    assert r.bbox == (105, 47, 4, 10)
    assert r.area == 30  # 4 map px * 1.5 * 5
    assert r.centroid == pytest.approx((101 + 4 * 1.5, 37 + 3 * 5))
    assert r.max_score == pytest.approx(0.7)


def test_threshold_is_inclusive_and_eight_connected():
    geom = Geometry(0, 0, 100, 100)
    amap = np.zeros((10, 10), np.float32)
    amap[2, 2] = 0.5  # exactly at threshold: anomalous
    amap[3, 3] = 0.6  # diagonal neighbour: same region under 8-connectivity
    amap[7, 7] = 0.4999  # just below: ignored
    (r,) = _pp().regions(amap, geom)
    assert r.bbox == (20, 20, 20, 20)
    assert r.area == 200
    assert r.max_score == pytest.approx(0.6)


def test_min_area_max_regions_and_order():
    geom = Geometry(0, 0, 640, 320)  # 10 x 5 source px per map px on a 64x64 map
    amap = np.zeros((64, 64), np.float32)
    amap[0, 0] = 0.9  # 1 map px = 50 source px
    amap[20:22, 20:22] = 0.6  # 200 px
    amap[40:43, 40:43] = 2.0  # 450 px
    amap[50:52, 5:7] = 1.5  # 200 px
    pp = _pp(min_area_px=100)
    scores = [r.max_score for r in pp.regions(amap, geom)]
    assert scores == pytest.approx([2.0, 1.5, 0.6])
    assert [r.area for r in pp.regions(amap, geom)] == [450, 200, 200]
    assert len(_pp(min_area_px=0).regions(amap, geom)) == 4
    top2 = _pp(max_regions=2).regions(amap, geom)
    assert [r.max_score for r in top2] == pytest.approx([2.0, 1.5])
    assert _pp(max_regions=0).regions(amap, geom) == []


def test_boxes_clipped_to_image():
    # The view claims 640 px but the frame is only 630 wide: the last column's box is cut.
    geom = Geometry(0, 0, 640, 320)
    amap = np.zeros((64, 64), np.float32)
    amap[0:2, 62:64] = 1.0
    (r,) = _pp().regions(amap, geom, image_size=(320, 630))
    assert r.bbox == (620, 0, 10, 10)
    (r,) = _pp().regions(amap, geom)
    assert r.bbox == (620, 0, 20, 10)


def test_scratch_buffers_do_not_leak_between_calls():
    geom = Geometry(0, 0, 64, 64)
    pp = _pp()
    a = np.zeros((64, 64), np.float32)
    a[5:10, 5:10] = 1
    b = np.zeros((64, 64), np.float32)
    b[30:32, 40:41] = 1
    assert [r.bbox for r in pp.regions(a, geom)] == [(5, 5, 5, 5)]
    assert [r.bbox for r in pp.regions(b, geom)] == [(40, 30, 1, 2)]
    assert pp.regions(np.zeros((64, 64), np.float32), geom) == []
    assert len(pp._buffers) == 1


def test_nan_and_inf_maps_are_invalid():
    pp = _pp()
    amap = np.zeros((16, 16), np.float32)
    assert pp.is_valid(amap)
    amap[3, 4] = np.nan
    assert not pp.is_valid(amap)
    amap[3, 4] = np.inf
    assert not pp.is_valid(amap)
    assert not pp.is_valid(np.zeros((0, 0), np.float32))
    assert not pp.is_valid(float("nan"))
    # Large but finite float32 values are valid (no overflow in the check).
    assert pp.is_valid(np.full((256, 256), 3e38, np.float32))
    # A NaN map gives no regions where it is NaN.
    assert pp.regions(np.full((8, 8), np.nan, np.float32), Geometry(0, 0, 8, 8)) == []


def test_verdict():
    pp = _pp(image_threshold=0.8)
    assert pp.verdict(0.7999) == "OK"
    assert pp.verdict(0.8) == "NG"
    assert pp.verdict(np.float32(5.0)) == "NG"
    with pytest.raises(ValueError):
        pp.verdict(math.nan)


def test_to_dict_normalises_score():
    r = Region(bbox=(1, 2, 3, 4), area=12, centroid=(2.5, 4.0), max_score=1.5)
    assert r.to_dict(0.5) == {"bbox": [1, 2, 3, 4], "area": 12, "centroid": [2.5, 4.0], "max_score": 3.0}


def test_bad_inputs():
    with pytest.raises(ValueError):
        Postprocessor(pixel_threshold=0.0, image_threshold=1.0)
    with pytest.raises(ValueError):
        Postprocessor(pixel_threshold=math.nan, image_threshold=1.0)
    with pytest.raises(ValueError):
        _pp().regions(np.zeros((2, 8, 8), np.float32), Geometry(0, 0, 8, 8))


def _reference_regions(amap, thr, off, s):
    """Independent flood-fill (8-connectivity) with integer scale ``s`` and offset ``off``."""
    h, w = amap.shape
    seen = np.zeros((h, w), bool)
    out = []
    for y in range(h):
        for x in range(w):
            if seen[y, x] or not amap[y, x] >= thr:
                continue
            stack, pix = [(y, x)], []
            seen[y, x] = True
            while stack:
                cy, cx = stack.pop()
                pix.append((cy, cx))
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        ny, nx = cy + dy, cx + dx
                        if 0 <= ny < h and 0 <= nx < w and not seen[ny, nx] and amap[ny, nx] >= thr:
                            seen[ny, nx] = True
                            stack.append((ny, nx))
            ys, xs = [p[0] for p in pix], [p[1] for p in pix]
            bbox = (off + min(xs) * s, off + min(ys) * s, (max(xs) - min(xs) + 1) * s, (max(ys) - min(ys) + 1) * s)
            out.append((float(max(amap[p] for p in pix)), bbox, len(pix) * s * s))
    return sorted(out, reverse=True)


@pytest.mark.parametrize("seed", range(5))
def test_matches_flood_fill_reference_on_noisy_maps(seed):
    rng = np.random.default_rng(seed)
    amap = rng.random((24, 24)).astype(np.float32)
    amap[amap < 0.7] = 0  # sparse specks and blobs
    geom = Geometry(3, 3, 48, 48)  # offset 3, 2 source px per map px
    ref = _reference_regions(amap, 0.5, 3, 2)
    assert len(ref) > 10
    got = _pp(max_regions=1000).regions(amap, geom)
    assert [(r.max_score, r.bbox, r.area) for r in got] == [(m, b, a) for m, b, a in ref]
    # Filtering and the top-k selection agree with the reference too.
    ref_big = [t for t in ref if t[2] >= 8][:5]
    got_big = _pp(min_area_px=8, max_regions=5).regions(amap, geom)
    assert [(r.max_score, r.bbox, r.area) for r in got_big] == [(m, b, a) for m, b, a in ref_big]
