"""ReplaySource over real files written with OpenCV (PNG folder incl. 16-bit, MJPG video)."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest

from linecam.camera.base import SourceExhausted
from linecam.camera.replay import Pacer, ReplaySource
from linecam.errors import CameraError


def _colour(i: int, h: int = 24, w: int = 32) -> np.ndarray:
    """A distinct RGB image per index: R = 10*i everywhere, a green ramp, constant blue."""
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = 10 * i
    img[..., 1] = np.arange(w, dtype=np.uint8)[None, :] * 4
    img[..., 2] = 200
    return img


@pytest.fixture()
def folder(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    # written out of order: the source must sort by name
    for i in (2, 0, 1):
        cv2.imwrite(str(d / f"img_{i:03d}.png"), cv2.cvtColor(_colour(i), cv2.COLOR_RGB2BGR))
    mono16 = (np.arange(24 * 32, dtype=np.uint16).reshape(24, 32) * 80).astype(np.uint16)
    cv2.imwrite(str(d / "img_003.png"), mono16)
    (d / "notes.txt").write_text("not an image")
    return d, mono16


def test_folder_frames_in_order_with_layout(folder):
    d, mono16 = folder
    with ReplaySource(d) as src:
        frames = [src.read(timeout=1.0) for _ in range(4)]
        with pytest.raises(SourceExhausted):
            src.read(timeout=1.0)
    assert [f.frame_id for f in frames] == [0, 1, 2, 3]
    assert [f.meta["name"] for f in frames] == [f"img_{i:03d}.png" for i in range(4)]
    assert frames[0].meta["path"] == str(d / "img_000.png")
    for i in range(3):
        f = frames[i]
        assert f.image.shape == (24, 32, 3) and f.image.dtype == np.uint8 and f.bit_depth == 8
        np.testing.assert_array_equal(f.image, _colour(i))  # PNG is lossless; RGB order
        assert f.clock == "host_monotonic" and f.truth is None
    m = frames[3]
    assert m.image.shape == (24, 32, 1) and m.image.dtype == np.uint16 and m.bit_depth == 16
    np.testing.assert_array_equal(m.image[:, :, 0], mono16)


def test_grayscale_option(folder):
    d, _ = folder
    with ReplaySource(d, grayscale=True) as src:
        f = src.read(timeout=1.0)
    assert f.image.shape == (24, 32, 1) and f.image.dtype == np.uint8
    expected = cv2.cvtColor(_colour(0), cv2.COLOR_RGB2GRAY)
    np.testing.assert_array_equal(f.image[:, :, 0], expected)


def test_loop_restarts_and_ids_keep_counting(folder):
    d, _ = folder
    with ReplaySource(d, loop=True) as src:
        frames = [src.read(timeout=1.0) for _ in range(9)]
    assert [f.frame_id for f in frames] == list(range(9))
    assert [f.meta["index"] for f in frames] == [0, 1, 2, 3, 0, 1, 2, 3, 0]
    assert frames[8].meta["loop"] == 2
    np.testing.assert_array_equal(frames[4].image, frames[0].image)


def test_single_image_file(folder):
    d, _ = folder
    with ReplaySource(d / "img_001.png") as src:
        np.testing.assert_array_equal(src.read(timeout=1.0).image, _colour(1))
        with pytest.raises(SourceExhausted):
            src.read(timeout=1.0)


@pytest.fixture()
def video(tmp_path):
    path = tmp_path / "clip.avi"
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (64, 48))
    assert w.isOpened()
    for i in range(6):
        rgb = np.zeros((48, 64, 3), np.uint8)
        rgb[..., 0] = 40 * i  # red level encodes the frame index
        rgb[..., 2] = 120
        w.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    w.release()
    return path


def test_video_frames_exhaust(video):
    with ReplaySource(video) as src:
        assert src.native_fps == pytest.approx(25.0)
        t0 = time.monotonic()
        frames = [src.read(timeout=1.0) for _ in range(6)]
        elapsed = time.monotonic() - t0
        with pytest.raises(SourceExhausted):
            src.read(timeout=1.0)
    assert elapsed < 0.2  # the video's own 25 fps is not imposed (6 frames would take 0.2 s)
    assert [f.frame_id for f in frames] == list(range(6))
    for i, f in enumerate(frames):
        assert f.image.shape == (48, 64, 3) and f.image.dtype == np.uint8
        r, b = f.image[..., 0].mean(), f.image[..., 2].mean()
        assert abs(r - 40 * i) < 6 and abs(b - 120) < 6  # MJPG is lossy; RGB order
        assert f.meta["path"] == str(video)


def test_video_loop_and_grayscale(video):
    with ReplaySource(video, loop=True, grayscale=True) as src:
        frames = [src.read(timeout=1.0) for _ in range(14)]
    assert [f.meta["index"] for f in frames] == list(range(6)) * 2 + [0, 1]
    assert frames[13].frame_id == 13 and frames[12].meta["loop"] == 2
    assert frames[0].image.shape == (48, 64, 1)
    assert abs(int(frames[6].image.mean()) - int(frames[0].image.mean())) <= 2


def test_pacing_follows_fps(folder):
    d, _ = folder
    fps = 40.0
    with ReplaySource(d, fps=fps, loop=True) as src:
        src.read(timeout=1.0)  # first frame is due at once
        t0 = time.monotonic()
        n = 12
        for _ in range(n):
            assert src.read(timeout=1.0) is not None
        elapsed = time.monotonic() - t0
    ratio = elapsed / (n / fps)
    assert 0.7 < ratio < 2.0, ratio


def test_paced_read_times_out_with_none(folder):
    d, _ = folder
    with ReplaySource(d, fps=2.0) as src:
        assert src.read(timeout=1.0) is not None
        t0 = time.monotonic()
        assert src.read(timeout=0.05) is None  # next frame is 0.5 s away
        assert time.monotonic() - t0 < 0.3
        assert src.read(timeout=1.0) is not None


def test_slow_consumer_gets_no_burst():
    p = Pacer(50.0)
    assert p.wait(1.0)
    time.sleep(0.2)  # 10 periods late
    assert p.wait(0.0)  # the late frame at once
    assert not p.wait(0.0)  # but then the schedule restarts: the next is a period away


def test_errors(tmp_path):
    with pytest.raises(CameraError, match="does not exist"):
        ReplaySource(tmp_path / "missing").open()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(CameraError, match="has no images"):
        ReplaySource(empty).open()
    junk = tmp_path / "junk.avi"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(CameraError):
        with ReplaySource(junk) as src:
            src.read(timeout=1.0)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a png")
    with ReplaySource(broken) as src:
        with pytest.raises(CameraError, match="cannot read replay image"):
            src.read(timeout=1.0)
    with pytest.raises(CameraError, match="fps"):
        ReplaySource(broken, fps=0)
    with pytest.raises(CameraError, match="not open"):
        ReplaySource(broken).read(timeout=0.1)
