"""linecam's numpy resampling == Pillow's (what the Hugging Face image processors call)."""

from __future__ import annotations

import numpy as np
import pytest

from linecam.runtime.vlm.resample import numpy_resize, pil_resize

Image = pytest.importorskip("PIL.Image")

_PIL = {"bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS, "bilinear": Image.BILINEAR}


@pytest.mark.parametrize("kind", ["bicubic", "lanczos", "bilinear"])
def test_numpy_resampling_is_pillows_bit_for_bit(kind):
    rng = np.random.default_rng(0)
    for _ in range(25):
        h, w, oh, ow = (int(v) for v in rng.integers(3, 200, 4))
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ref = np.asarray(Image.fromarray(img).resize((ow, oh), _PIL[kind]))
        # Pillow <= 12 always resamples rows first; Pillow 13 sometimes columns first (its own speed
        # choice): the coefficients and rounding are Pillow's either way.
        outs = [numpy_resize(img, (ow, oh), kind, vertical_first=v) for v in (False, True)]
        assert any(np.array_equal(o, ref) for o in outs), (kind, (h, w), (oh, ow))
        assert np.array_equal(pil_resize(img, (ow, oh), kind), ref)


def test_opencv_bicubic_is_not_pillows():
    """Why linecam does not resize with OpenCV: downscaling without Pillow's widened kernel differs."""
    import cv2

    img = np.random.default_rng(1).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    ref = np.asarray(Image.fromarray(img).resize((64, 48), Image.BICUBIC))
    assert np.abs(cv2.resize(img, (64, 48), interpolation=cv2.INTER_CUBIC).astype(int) - ref).max() > 10
    assert np.array_equal(numpy_resize(img, (64, 48)), ref)  # both sides reduced: rows first in every Pillow
