"""The good-image folder helpers of the export side (no torch needed)."""

from __future__ import annotations

import numpy as np

from linecam.export.images import aspect_warning
from linecam.preprocess import CropSpec, PreprocessSpec, aspect_size


def test_aspect_warning_suggests_a_size_with_the_images_shape() -> None:
    frame = np.zeros((220, 300, 3), np.uint8)  # 300 wide, 220 high: 1.36
    w = aspect_warning(PreprocessSpec(input_size=(256, 256)), frame)
    assert w is not None and "300x220" in w and "256x256" in w
    # Same pixel count (~65k), the images' shape, multiples of 16: 224 x 304 (HEIGHTxWIDTH, as --size).
    assert "--size 224x304" in w
    assert abs(224 * 304 - 256 * 256) / (256 * 256) < 0.05 and abs(304 / 224 - 300 / 220) < 0.03
    # Within 10 %: silent; the suggested size itself: silent.
    assert aspect_warning(PreprocessSpec(input_size=(256, 256)), np.zeros((240, 256), np.uint8)) is None
    assert aspect_warning(PreprocessSpec(input_size=(224, 304)), frame) is None
    # Tall images, too; and the crop, not the frame, is what the model sees.
    assert "--size 304x224" in aspect_warning(PreprocessSpec(input_size=(256, 256)), frame.transpose(1, 0, 2))
    square = PreprocessSpec(input_size=(256, 256), crop=CropSpec(left=40, top=0, width=220, height=220))
    assert aspect_warning(square, frame) is None


def test_aspect_size_is_about_the_crop_and_keeps_the_pixel_count() -> None:
    spec = PreprocessSpec(input_size=(256, 256))
    assert aspect_size(spec, 1200, 1920) == (208, 320)  # 1.6:1 at ~65k pixels, multiples of 16
    assert aspect_size(spec, 256, 270) is None  # 5 % off: left alone
    # With a crop the frame's own shape does not matter: the model sees the crop.
    cropped = PreprocessSpec(input_size=(256, 256), crop=CropSpec(left=0, top=0, width=500, height=500))
    assert aspect_size(cropped, 1200, 1920) is None
