"""The single preprocessing definition, checked against hand-computed values."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from linecam.preprocess import CropSpec, PreprocessSpec, Preprocessor, read_image


def test_normalisation_matches_formula():
    spec = PreprocessSpec(input_size=(4, 6), interpolation="nearest", mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 0.125))
    img = np.zeros((4, 6, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 255, 51, 0
    out = Preprocessor(spec)(img)
    assert out.shape == (1, 3, 4, 6) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0], (1.0 - 0.1) / 0.5, rtol=1e-6)
    np.testing.assert_allclose(out[0, 1], (0.2 - 0.2) / 0.25, atol=1e-6)
    np.testing.assert_allclose(out[0, 2], (0.0 - 0.3) / 0.125, rtol=1e-6)


def test_bgr_order_and_mono_and_16bit():
    spec = PreprocessSpec(input_size=(2, 2), interpolation="nearest", color_order="BGR", mean=(0, 0, 0), std=(1, 1, 1))
    pre = Preprocessor(spec)
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[..., 0] = 255
    out = pre(rgb, copy=True)
    assert out[0, 2].min() == 1.0 and out[0, 0].max() == 0.0  # red lands in the last model channel
    mono = np.full((2, 2, 1), 4095, np.uint16)
    out12 = pre(mono, bit_depth=12)
    np.testing.assert_allclose(out12, 1.0)


def test_resize_is_cv2_area_and_buffer_reused():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (100, 80, 3), dtype=np.uint8)
    spec = PreprocessSpec(input_size=(25, 20), interpolation="area", mean=(0, 0, 0), std=(1, 1, 1))
    pre = Preprocessor(spec)
    a = pre(img)
    ref = cv2.resize(img, (20, 25), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
    np.testing.assert_allclose(a[0].transpose(1, 2, 0), ref, atol=1e-6)
    b = pre(img)
    assert a is b  # no per-frame allocation of the output


def test_crop_and_geometry():
    spec = PreprocessSpec(input_size=(10, 10), crop=CropSpec(top=5, left=20, height=50, width=100))
    pre = Preprocessor(spec)
    g = pre.geometry(200, 300)
    assert (g.offset_x, g.offset_y, g.width, g.height) == (20, 5, 100, 50)
    assert g.scale_for(10, 10) == (10.0, 5.0)
    with pytest.raises(ValueError, match="does not fit"):
        pre(np.zeros((30, 30, 3), np.uint8))


def test_read_image_layouts(tmp_path):
    rgb = np.zeros((5, 7, 3), np.uint8)
    rgb[..., 0] = 200  # red
    cv2.imwrite(str(tmp_path / "c.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(tmp_path / "m16.png"), np.full((5, 7), 4000, np.uint16))
    img, depth = read_image(tmp_path / "c.png")
    assert depth == 8 and img.shape == (5, 7, 3) and img[0, 0, 0] == 200 and img[0, 0, 2] == 0
    img16, depth16 = read_image(tmp_path / "m16.png")
    assert depth16 == 16 and img16.shape == (5, 7, 1) and img16.dtype == np.uint16
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read image"):
        read_image(tmp_path / "bad.png")
