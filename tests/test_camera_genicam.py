"""GenICamSource against the real harvesters + viky.cti virtual camera (no mocks).

viky: serials '0', '1', '2' = red, green, blue devices; white background with a
20x20 square ("ball") of the device's colour; RGBa8 or Mono8; no timestamps.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time

import numpy as np
import pytest

from linecam.camera.genicam import GenICamSource, viky_cti_path
from linecam.errors import CameraError

FAST = {"AcquisitionFrameRate": 100.0}
HAVE_GENICAM = all(importlib.util.find_spec(m) is not None for m in ("genicam", "harvesters"))


def test_importing_the_camera_package_does_not_import_harvesters():
    code = (
        "import sys, linecam.camera as c; c.GenICamSource; c.ReplaySource; c.SyntheticLineSource; "
        "bad = {'harvesters', 'genicam', 'torch'} & set(sys.modules); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture(scope="module")
def cti():
    if not HAVE_GENICAM:
        pytest.skip("needs the genicam extra: pip install 'linecam[genicam]'")
    path = viky_cti_path()
    if not path.is_file():
        pytest.skip("viky.cti not shipped in this genicam wheel")
    return path


def _ball(img: np.ndarray) -> np.ndarray:
    """Pixels that are not the white background."""
    return img[(img < 128).any(axis=2)]


def test_reads_rgb_frames_with_increasing_ids(cti):
    with GenICamSource(cti, serial="0", features=FAST) as src:
        assert src.model == "Viky"
        frames = [src.read(timeout=2.0) for _ in range(5)]
    assert all(f is not None for f in frames)
    ids = [f.frame_id for f in frames]
    assert all(b > a for a, b in zip(ids, ids[1:])), ids
    for f in frames:
        assert f.image.shape == (400, 400, 3) and f.image.dtype == np.uint8
        assert f.image.flags.c_contiguous
        assert f.clock == "host_monotonic" and f.timestamp_ns == f.host_ns
        assert f.bit_depth == 8 and f.meta["pixel_format"] == "RGBa8"
    hosts = [f.host_ns for f in frames]
    assert hosts == sorted(hosts) and abs(hosts[0] - time.monotonic_ns()) < 10e9
    # red device: the ball is pure red in RGB order, the background white
    ball = _ball(frames[-1].image)
    assert 100 <= len(ball) <= 2000
    assert (ball[:, 0] > 200).all() and (ball[:, 1:] < 50).all()
    assert (frames[-1].image == 255).all(axis=2).mean() > 0.9


def test_channel_order_blue_device(cti):
    with GenICamSource(cti, serial="2", features=FAST) as src:
        f = src.read(timeout=2.0)
    ball = _ball(f.image)
    assert len(ball) > 100
    assert (ball[:, 2] > 200).all() and (ball[:, :2] < 50).all()


def test_frames_are_copies_not_recycled_buffers(cti):
    # viky moves its ball every frame; a frame that still pointed into the GenTL
    # buffer would show a later (or the producer's reset) picture once re-queued.
    with GenICamSource(cti, serial="0", num_buffers=3, buffer_handling="OldestFirst", features=FAST) as src:
        kept = [src.read(timeout=2.0) for _ in range(6)]
        snapshots = [f.image.copy() for f in kept]
        for _ in range(6):  # cycle every buffer through the pool again
            src.read(timeout=2.0)
    for f, snap in zip(kept, snapshots):
        np.testing.assert_array_equal(f.image, snap)
    centres = {tuple(np.argwhere((f.image < 128).any(axis=2)).mean(axis=0).round(1)) for f in kept}
    assert len(centres) >= 3, centres


def test_mono8_gives_single_channel(cti):
    with GenICamSource(cti, serial="1", pixel_format="Mono8", features=FAST) as src:
        f = src.read(timeout=2.0)
    assert f.image.shape == (400, 400, 1) and f.image.dtype == np.uint8
    assert f.meta["pixel_format"] == "Mono8"
    assert (f.image == 255).mean() > 0.9 and (f.image < 200).sum() >= 100


def test_width_and_height_are_honoured(cti):
    with GenICamSource(cti, serial="0", width=320, height=240, features=FAST) as src:
        f = src.read(timeout=2.0)
    assert f.image.shape == (240, 320, 3)


def test_dropped_frames_are_counted_from_id_gaps(cti):
    with GenICamSource(cti, serial="0", buffer_handling="NewestOnly", features={"AcquisitionFrameRate": 200.0}) as src:
        frames = []
        for _ in range(4):
            frames.append(src.read(timeout=2.0))
            time.sleep(0.06)  # ~12 frames go by while we are "busy"
        dropped = src.dropped
    ids = [f.frame_id for f in frames]
    assert dropped == ids[-1] - ids[0] - (len(ids) - 1)
    assert dropped >= 10, ids
    assert sum(f.meta["dropped_before"] for f in frames) == dropped


def test_read_times_out_with_none(cti):
    with GenICamSource(cti, serial="0", fetch_timeout=0.3, features={"AcquisitionFrameRate": 1.0}) as src:
        deadline = time.monotonic() + 3.0
        while src.read(timeout=1.0) is None:  # the first frame may be up to a second away
            assert time.monotonic() < deadline
        assert src.last_frame_ns is not None and src.last_frame_ns <= time.monotonic_ns()
        t0 = time.monotonic()
        assert src.read(timeout=0.1) is None
        assert time.monotonic() - t0 < 0.5
        t0 = time.monotonic()
        assert src.read(timeout=30.0) is None  # capped by fetch_timeout
        assert time.monotonic() - t0 < 0.8


def test_missing_harvesters_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "harvesters", None)  # makes `import harvesters` fail
    monkeypatch.setitem(sys.modules, "harvesters.core", None)
    with pytest.raises(CameraError, match=r"needs harvesters: pip install 'linecam\[genicam\]'"):
        GenICamSource(tmp_path / "x.cti").open()


needs_genicam = pytest.mark.skipif(not HAVE_GENICAM, reason="needs the genicam extra")


@needs_genicam
def test_missing_cti(tmp_path):
    src = GenICamSource(tmp_path / "nope.cti", serial="0")
    with pytest.raises(CameraError, match=r"GenTL producer .*nope\.cti not found"):
        src.open()


@needs_genicam
def test_invalid_cti_file(tmp_path):
    bad = tmp_path / "bad.cti"
    bad.write_bytes(b"not a shared library")
    with pytest.raises(CameraError, match="cannot be loaded"):
        GenICamSource(bad).open()


def test_unknown_serial_lists_devices(cti):
    with pytest.raises(CameraError) as e:
        GenICamSource(cti, serial="99").open()
    msg = str(e.value)
    assert "'99'" in msg and "serial=0" in msg and "serial=2" in msg and "\n" not in msg


def test_device_id_and_index_selection(cti):
    with GenICamSource(cti, device_id="VikyTL_DEV_blue", features=FAST) as src:
        assert src.name == "genicam:2"
        assert (_ball(src.read(timeout=2.0).image)[:, 2] > 200).all()
    with pytest.raises(CameraError, match="no camera at index 7"):
        GenICamSource(cti, index=7).open()


def test_unknown_node_names_node_and_model(cti):
    with pytest.raises(CameraError) as e:
        GenICamSource(cti, serial="0", features={"ExposureTime": 1000.0}).open()
    assert "ExposureTime" in str(e.value) and "Viky" in str(e.value)


def test_bad_values_are_camera_errors(cti):
    with pytest.raises(CameraError, match="does not accept PixelFormat='Mono12'.*RGBa8"):
        GenICamSource(cti, serial="0", pixel_format="Mono12").open()
    with pytest.raises(CameraError, match="cannot set Width=5000 on camera Viky"):
        GenICamSource(cti, serial="0", width=5000).open()
    with pytest.raises(CameraError, match="not supported by linecam"):
        GenICamSource(cti, serial="0", pixel_format="YUV422_8").open()
    with pytest.raises(CameraError, match="buffer_handling"):
        GenICamSource(cti, serial="0", buffer_handling="Newest").open()


def test_close_then_reopen(cti):
    src = GenICamSource(cti, serial="0", features=FAST)
    src.open()
    a = src.read(timeout=2.0)
    src.close()
    src.close()  # idempotent
    with pytest.raises(CameraError, match="not open"):
        src.read(timeout=0.1)
    src.open()
    try:
        b = src.read(timeout=2.0)
    finally:
        src.close()
    assert a is not None and b is not None and b.image.shape == a.image.shape
    # a failed open leaves the camera free for the next one
    with pytest.raises(CameraError):
        GenICamSource(cti, serial="0", features={"NoSuchNode": 1}).open()
    with GenICamSource(cti, serial="0", features=FAST) as again:
        assert again.read(timeout=2.0) is not None
