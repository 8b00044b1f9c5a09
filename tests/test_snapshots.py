"""SnapshotWriter: real JPEGs on disk, annotated where the regions are, bounded directory."""

from __future__ import annotations

import os
import stat

import cv2
import numpy as np
import pytest

from linecam.preprocess import Geometry
from linecam.runtime.postprocess import Postprocessor
from linecam.runtime.snapshots import SnapshotWriter

THR = 0.5


def _frame_and_map(h=320, w=640, value=128):
    image = np.full((h, w, 3), value, np.uint8)
    amap = np.zeros((64, 64), np.float32)
    amap[20:30, 20:30] = 1.0  # strong blob -> one region
    return image, amap


def _bgr(path):
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert img is not None, f"{path} is not a decodable image"
    return img.astype(int)


def test_snapshot_is_jpeg_with_box_at_region(tmp_path):
    image, amap = _frame_and_map()
    geom = Geometry(0, 0, 640, 320)
    regions = Postprocessor(THR, 0.8).regions(amap, geom)
    assert [r.bbox for r in regions] == [(200, 100, 100, 50)]
    w = SnapshotWriter(tmp_path)
    path = w.write(image, 8, amap, geom, regions, "frame-1", THR)
    assert path == tmp_path / "frame-1.jpg"
    assert path.read_bytes()[:3] == b"\xff\xd8\xff"  # JPEG SOI marker
    img = _bgr(path)
    assert img.shape == (320, 640, 3)
    # Box edges (left, right, bottom) are red: B, G low, R high (BGR order).
    for y, x in [(125, 200), (125, 201), (125, 299), (149, 250), (148, 230)]:
        b, g, r = img[y, x]
        assert r > 170 and g < 90 and b < 90, (y, x, img[y, x])
    # Well inside the box: heatmap, not red box colour, and not the plain grey frame.
    b, g, r = img[125, 250]
    assert not (r > 170 and g < 90 and b < 90)
    assert abs(b - 128) + abs(g - 128) + abs(r - 128) > 30
    # Far from the region: grey with only a faint (blue, low score) tint.
    b, g, r = img[300, 600]
    assert abs(g - 128) < 25 and abs(r - 128) < 25 and b >= 120


def test_crop_geometry_leaves_outside_untouched(tmp_path):
    image, amap = _frame_and_map()
    geom = Geometry(320, 0, 320, 320)  # model sees the right half only
    regions = Postprocessor(THR, 0.8).regions(amap, geom)
    assert [r.bbox for r in regions] == [(420, 100, 50, 50)]
    img = _bgr(SnapshotWriter(tmp_path).write(image, 8, amap, geom, regions, "c", THR))
    assert np.abs(img[:, :300] - 128).max() <= 3  # left half: the untouched frame (JPEG noise only)
    b, g, r = img[125, 420]
    assert r > 170 and g < 90 and b < 90


@pytest.mark.parametrize("bit_depth,dtype,full", [(8, np.uint8, 255), (12, np.uint16, 4095), (16, np.uint16, 65535)])
def test_mono_frames(tmp_path, bit_depth, dtype, full):
    image = np.zeros((200, 300, 1), dtype)
    image[:, :150] = full  # left half white, right half black
    amap = np.zeros((20, 30), np.float32)
    geom = Geometry(0, 0, 300, 200)
    img = _bgr(SnapshotWriter(tmp_path).write(image, bit_depth, amap, geom, [], "m", THR))
    assert img.shape == (200, 300, 3)
    # Faint tint everywhere (zero score -> dark blue at low alpha), so compare loosely.
    assert img[100, 50].min() > 200 and img[100, 50, 1] > 200
    assert img[100, 250, 1] < 20 and img[100, 250, 2] < 20


def test_directory_bounded_by_count_and_bytes(tmp_path):
    image, amap = _frame_and_map()
    geom = Geometry(0, 0, 640, 320)
    w = SnapshotWriter(tmp_path, max_files=5)
    for i in range(12):
        w.write(image, 8, amap, geom, [], f"f{i:03d}", THR)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"f{i:03d}.jpg" for i in range(7, 12)]
    assert w.file_count == 5
    assert w.total_bytes == sum(p.stat().st_size for p in tmp_path.iterdir())

    size = (tmp_path / "f011.jpg").stat().st_size  # all identical frames -> same size
    wb = SnapshotWriter(tmp_path, max_files=100, max_bytes=int(size * 3.5))
    # Bound enforced at start already: the oldest two are gone.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f009.jpg", "f010.jpg", "f011.jpg"]
    for i in range(12, 16):
        wb.write(image, 8, amap, geom, [], f"f{i:03d}", THR)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f013.jpg", "f014.jpg", "f015.jpg"]
    assert wb.total_bytes <= size * 3.5


def test_restart_respects_bound_and_removes_stale_temp_files(tmp_path):
    image, amap = _frame_and_map()
    geom = Geometry(0, 0, 640, 320)
    w1 = SnapshotWriter(tmp_path, max_files=4)
    for i in range(4):
        w1.write(image, 8, amap, geom, [], f"a{i}", THR)
    # Make the on-disk age order differ from name order: a0 is now the newest.
    now = os.stat(tmp_path / "a3.jpg").st_mtime_ns
    os.utime(tmp_path / "a0.jpg", ns=(now + 10**9, now + 10**9))
    (tmp_path / ".tmp-123-x.jpg").write_bytes(b"half a jpeg")
    (tmp_path / "notes.txt").write_text("not a snapshot")

    w2 = SnapshotWriter(tmp_path, max_files=4)
    assert not (tmp_path / ".tmp-123-x.jpg").exists()
    w2.write(image, 8, amap, geom, [], "b0", THR)
    w2.write(image, 8, amap, geom, [], "b1", THR)
    jpgs = sorted(p.name for p in tmp_path.glob("*.jpg"))
    assert jpgs == ["a0.jpg", "a3.jpg", "b0.jpg", "b1.jpg"]
    assert (tmp_path / "notes.txt").exists()


def test_same_name_never_replaces_a_file_and_name_is_sanitised(tmp_path):
    image, amap = _frame_and_map()
    geom = Geometry(0, 0, 640, 320)
    w = SnapshotWriter(tmp_path, max_files=10)
    first = w.write(image, 8, amap, geom, [], "x", THR)
    before = first.read_bytes()
    second = w.write(np.zeros_like(image), 8, amap, geom, [], "x", THR)
    assert (first.name, second.name) == ("x.jpg", "x-1.jpg")
    assert first.read_bytes() == before  # an event pointing at x.jpg still shows its own frame
    assert w.file_count == 2
    p = w.write(image, 8, amap, geom, [], "../evil/name", THR)
    assert p.parent == tmp_path and p.name == "_evil_name.jpg"
    assert w.file_count == 3 and w.total_bytes == sum(q.stat().st_size for q in tmp_path.iterdir())


def test_snapshot_files_are_0640_whatever_the_umask(tmp_path):
    image, amap = _frame_and_map()
    old = os.umask(0o000)
    try:
        p = SnapshotWriter(tmp_path, max_files=10).write(image, 8, amap, Geometry(0, 0, 640, 320), [], "m", THR)
    finally:
        os.umask(old)
    assert stat.S_IMODE(p.stat().st_mode) == 0o640


def test_snapshot_names_are_unique_across_restarts():
    from linecam.runtime.outbox import snapshot_name

    a = snapshot_name("cam", 7, "4f0c6f0e-5d3b-4a53-9d5e-1f1cbb8f43a2")
    b = snapshot_name("cam", 7, "9a1e0000-5d3b-4a53-9d5e-1f1cbb8f43a2")
    assert a != b and a.startswith("cam_000000007_")
