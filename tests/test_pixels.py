"""Pixel-format conversion against independently packed reference buffers.

The reference packers below are deliberately naive (bit by bit / byte by byte,
straight from the PFNC and GigE Vision layout descriptions) so they share no code
or tricks with linecam.camera.pixels.
"""

from __future__ import annotations

import numpy as np
import pytest

from linecam.camera import pixels
from linecam.camera.pixels import SUPPORTED_FORMATS, raw_size, to_frame_image
from linecam.errors import CameraError

RNG = np.random.default_rng(1234)


# --- naive reference packers ------------------------------------------------------------


def _pad_rows(rows: list[bytes], padding_x: int) -> np.ndarray:
    out = bytearray()
    for r in rows:
        out += r + bytes([0xA5] * padding_x)  # non-zero padding: it must be ignored
    return np.frombuffer(bytes(out), dtype=np.uint8)


def pack_lsb_first(img: np.ndarray, bits: int, padding_x: int = 0) -> np.ndarray:
    """PFNC 'p' packing: each row an LSB-first bit stream, rounded up to whole bytes."""
    rows = []
    for row in img:
        nbytes = (len(row) * bits + 7) // 8
        buf = [0] * nbytes
        for i, v in enumerate(int(x) for x in row):
            for k in range(bits):
                if (v >> k) & 1:
                    pos = i * bits + k
                    buf[pos // 8] |= 1 << (pos % 8)
        rows.append(bytes(buf))
    return _pad_rows(rows, padding_x)


def pack_gige(img: np.ndarray, bits: int, padding_x: int = 0) -> np.ndarray:
    """GigE Vision Mono12Packed / Mono10Packed: 2 pixels in 3 bytes, MSBs in bytes 0 and 2."""
    lsb = bits - 8
    rows = []
    for row in img:
        vals = [int(x) for x in row]
        if len(vals) % 2:
            vals.append(0)
        buf = []
        for a, b in zip(vals[0::2], vals[1::2]):
            mask = (1 << lsb) - 1
            buf.append(a >> lsb)
            buf.append((a & mask) | ((b & mask) << 4))
            buf.append(b >> lsb)
        rows.append(bytes(buf))
    return _pad_rows(rows, padding_x)


def pack_u16le(img: np.ndarray, padding_x: int = 0) -> np.ndarray:
    rows = []
    for row in img:
        b = bytearray()
        for v in row:
            b += int(v).to_bytes(2, "little")
        rows.append(bytes(b))
    return _pad_rows(rows, padding_x)


def pack_bytes(img: np.ndarray, padding_x: int = 0) -> np.ndarray:
    return _pad_rows([bytes(r.reshape(-1).tolist()) for r in img], padding_x)


def mono(h: int, w: int, bits: int) -> np.ndarray:
    img = RNG.integers(0, 2**bits, size=(h, w), dtype=np.int64)
    img[0, 0] = 2**bits - 1  # extremes exercise every bit
    img[0, 1] = 0
    return img.astype(np.uint16 if bits > 8 else np.uint8)


def _check_fresh(out: np.ndarray, data: np.ndarray) -> None:
    assert out.flags.c_contiguous
    assert not np.shares_memory(out, data)


# --- mono -------------------------------------------------------------------------------

SIZES = [(4, 8), (3, 6), (5, 7), (2, 5)]  # includes odd widths and partial packing groups
PADS = [0, 3]


@pytest.mark.parametrize("h,w", SIZES)
@pytest.mark.parametrize("pad", PADS)
def test_mono8(h, w, pad):
    img = mono(h, w, 8)
    data = pack_bytes(img, pad)
    out, depth = to_frame_image(data, w, h, "Mono8", pad)
    assert out.shape == (h, w, 1) and out.dtype == np.uint8 and depth == 8
    np.testing.assert_array_equal(out[:, :, 0], img)
    _check_fresh(out, data)


@pytest.mark.parametrize("fmt,bits", [("Mono10", 10), ("Mono12", 12), ("Mono16", 16)])
@pytest.mark.parametrize("h,w", SIZES)
@pytest.mark.parametrize("pad", PADS + [4])
def test_mono_unpacked16(fmt, bits, h, w, pad):
    img = mono(h, w, bits)
    data = pack_u16le(img, pad)
    out, depth = to_frame_image(data, w, h, fmt, pad)
    assert out.shape == (h, w, 1) and out.dtype == np.uint16 and depth == bits
    np.testing.assert_array_equal(out[:, :, 0], img)
    _check_fresh(out, data)
    # the same pixels handed over as a uint16 array (one element per pixel)
    out2, _ = to_frame_image(img.reshape(-1).copy(), w, h, fmt)
    np.testing.assert_array_equal(out2[:, :, 0], img)


PACKED = [
    ("Mono10p", 10, lambda img, pad: pack_lsb_first(img, 10, pad)),
    ("Mono12p", 12, lambda img, pad: pack_lsb_first(img, 12, pad)),
    ("Mono12Packed", 12, lambda img, pad: pack_gige(img, 12, pad)),
    ("Mono10Packed", 10, lambda img, pad: pack_gige(img, 10, pad)),
]


@pytest.mark.parametrize("fmt,bits,pack", PACKED, ids=[p[0] for p in PACKED])
@pytest.mark.parametrize("h,w", SIZES)
@pytest.mark.parametrize("pad", PADS)
def test_mono_packed(fmt, bits, pack, h, w, pad):
    img = mono(h, w, bits)
    data = pack(img, pad)
    assert data.size == raw_size(w, h, fmt, pad)
    out, depth = to_frame_image(data, w, h, fmt, pad)
    assert out.shape == (h, w, 1) and out.dtype == np.uint16 and depth == bits
    np.testing.assert_array_equal(out[:, :, 0], img)
    _check_fresh(out, data)


def test_mono12packed_differs_from_mono12p():
    img = mono(4, 8, 12)
    a, _ = to_frame_image(pack_gige(img, 12), 8, 4, "Mono12p")
    assert not np.array_equal(a[:, :, 0], img)


@pytest.mark.parametrize("fmt,bits", [("Mono12Packed", 12), ("Mono12p", 12), ("Mono10p", 10)])
def test_packed_format_already_unpacked(fmt, bits):
    h, w = 4, 8
    img = mono(h, w, bits)
    # harvesters hands over uint16 pixels; with row padding it leaves extra pixels per row
    stride = w + 2
    padded = np.full((h, stride), 7, dtype=np.uint16)
    padded[:, :w] = img
    out, depth = to_frame_image(padded.reshape(-1), w, h, fmt)
    np.testing.assert_array_equal(out[:, :, 0], img)
    assert depth == bits and out.dtype == np.uint16
    _check_fresh(out, padded)
    # or as 16-bit little-endian containers in a byte buffer (size = 2 bytes per pixel)
    out2, _ = to_frame_image(pack_u16le(img), w, h, fmt)
    np.testing.assert_array_equal(out2[:, :, 0], img)


# --- colour -----------------------------------------------------------------------------


def colour(h: int, w: int) -> np.ndarray:
    return RNG.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("fmt", ["RGB8", "BGR8", "RGBa8", "BGRa8"])
@pytest.mark.parametrize("h,w", SIZES)
@pytest.mark.parametrize("pad", PADS)
def test_rgb_family(fmt, h, w, pad):
    rgb = colour(h, w)
    px = rgb[:, :, ::-1] if fmt.startswith("BGR") else rgb
    if fmt.endswith("a8"):
        alpha = RNG.integers(0, 256, size=(h, w, 1), dtype=np.uint8)
        px = np.concatenate([px, alpha], axis=2)
    data = pack_bytes(px, pad)
    out, depth = to_frame_image(data, w, h, fmt, pad)
    assert out.shape == (h, w, 3) and out.dtype == np.uint8 and depth == 8
    np.testing.assert_array_equal(out, rgb)
    _check_fresh(out, data)


# GenICam Bayer names give the colours of the first 2x2 block, row by row.
BAYER_LAYOUT = {
    "BayerRG8": ("R", "G", "G", "B"),
    "BayerGR8": ("G", "R", "B", "G"),
    "BayerGB8": ("G", "B", "R", "G"),
    "BayerBG8": ("B", "G", "G", "R"),
}
CH = {"R": 0, "G": 1, "B": 2}


def smooth_colour_image(h: int = 64, w: int = 96) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 170 + 40 * np.sin(x / 23.0)
    g = 100 + 30 * np.cos(y / 19.0)
    b = 40 + 20 * np.sin((x + y) / 31.0)
    return np.clip(np.stack([r, g, b], axis=2), 0, 255).round().astype(np.uint8)


def mosaic(rgb: np.ndarray, fmt: str) -> np.ndarray:
    layout = BAYER_LAYOUT[fmt]
    out = np.empty(rgb.shape[:2], dtype=np.uint8)
    for k, (dy, dx) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        out[dy::2, dx::2] = rgb[dy::2, dx::2, CH[layout[k]]]
    return out


@pytest.mark.parametrize("fmt", list(BAYER_LAYOUT))
@pytest.mark.parametrize("pad", PADS)
def test_bayer_demosaic_matches_known_colours(fmt, pad):
    rgb = smooth_colour_image()
    h, w = rgb.shape[:2]
    data = pack_bytes(mosaic(rgb, fmt), pad)
    out, depth = to_frame_image(data, w, h, fmt, pad)
    assert out.shape == (h, w, 3) and out.dtype == np.uint8 and depth == 8
    _check_fresh(out, data)
    err = np.abs(out[2:-2, 2:-2].astype(int) - rgb[2:-2, 2:-2].astype(int))
    assert err.mean() < 2.0, err.mean()
    assert err.max() <= 10


@pytest.mark.parametrize("fmt", list(BAYER_LAYOUT))
def test_bayer_wrong_variant_gives_wrong_colours(fmt):
    rgb = smooth_colour_image()
    h, w = rgb.shape[:2]
    data = pack_bytes(mosaic(rgb, fmt))
    for other in BAYER_LAYOUT:
        if other == fmt:
            continue
        out, _ = to_frame_image(data, w, h, other)
        err = np.abs(out[2:-2, 2:-2].astype(int) - rgb[2:-2, 2:-2].astype(int))
        assert err.mean() > 20, (fmt, other, err.mean())


# --- errors -----------------------------------------------------------------------------


def test_unknown_format_names_it_and_lists_supported():
    with pytest.raises(CameraError) as e:
        to_frame_image(np.zeros(16, np.uint8), 4, 4, "YUV422_8")
    msg = str(e.value)
    assert "YUV422_8" in msg and "Mono8" in msg and "BayerRG8" in msg and "\n" not in msg


def test_short_buffer_is_a_camera_error():
    with pytest.raises(CameraError, match="buffer holds 10"):
        to_frame_image(np.zeros(10, np.uint8), 4, 4, "Mono8")


def test_extra_trailing_bytes_are_ignored():
    img = mono(3, 4, 8)
    data = np.concatenate([pack_bytes(img), np.full(100, 9, np.uint8)])
    out, _ = to_frame_image(data, 4, 3, "Mono8")
    np.testing.assert_array_equal(out[:, :, 0], img)


def test_every_supported_format_is_tested():
    tested = {"Mono8", "Mono10", "Mono12", "Mono16", "RGB8", "BGR8", "RGBa8", "BGRa8"}
    tested |= {p[0] for p in PACKED} | set(BAYER_LAYOUT)
    assert set(SUPPORTED_FORMATS) == tested
    assert pixels.is_mono("Mono12p") and not pixels.is_mono("BayerRG8")
