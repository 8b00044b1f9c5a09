"""Camera pixel formats (GenICam PFNC / GigE Vision names) -> linecam's Frame layout.

Everything a camera can hand over is turned into the one layout documented on
:class:`linecam.camera.frame.Frame`: RGB ``uint8`` ``(H, W, 3)``, or mono
``(H, W, 1)`` ``uint8`` (8-bit) / ``uint16`` (10/12/16-bit, values not shifted).

Input conventions of :func:`to_frame_image`:

* ``uint8`` data is the **raw byte stream** of the buffer: ``height`` rows of
  :func:`row_bytes` bytes, each followed by ``padding_x`` padding bytes. Extra
  bytes after the last row are ignored (GenTL buffers are often allocated larger
  than the image). For the 10/12/16-bit formats a ``uint8`` buffer of exactly
  ``height * (2 * width + padding_x)`` bytes (and not the packed size) is taken as
  already-unpacked 16-bit little-endian containers.
* ``uint16`` data is taken as **already unpacked** pixel values, one element per
  pixel (harvesters expands Mono10p/Mono12p/Mono12Packed/... this way). The row
  stride is ``data.size // height`` elements: anything beyond ``width`` (padding
  that harvesters failed to strip) is dropped.

The result is always a fresh C-contiguous array: the caller's buffer is usually a
view into a GenTL buffer that is re-queued (and overwritten) right afterwards.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np

from linecam.errors import CameraError

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Format:
    kind: str  # "mono8" | "mono16" | "packed" | "rgb" | "bayer"
    bit_depth: int
    #: bits per pixel in the raw stream (packed formats: 10 or 12)
    bits: int
    #: bytes per pixel for the byte-aligned formats (rgb: 3 or 4)
    channels: int = 1
    #: rgb: True if the stream is B, G, R order
    bgr: bool = False
    #: packed: the unpack routine's name (see _UNPACKERS)
    packing: str = ""
    #: bayer: OpenCV conversion code to RGB
    cv_code: int = 0


# OpenCV names a Bayer pattern after the 2x2 block starting at the *second* row,
# second column, so GenICam's BayerRG (row 0 = R G, row 1 = G B) is OpenCV's
# "BayerBG". Each pair below is verified in tests/test_pixels.py against a
# mosaicked known colour image.
_FORMATS: dict[str, _Format] = {
    "Mono8": _Format("mono8", 8, 8),
    "Mono10": _Format("mono16", 10, 16),
    "Mono12": _Format("mono16", 12, 16),
    "Mono16": _Format("mono16", 16, 16),
    "Mono10p": _Format("packed", 10, 10, packing="10p"),
    "Mono12p": _Format("packed", 12, 12, packing="12p"),
    "Mono10Packed": _Format("packed", 10, 12, packing="10packed"),
    "Mono12Packed": _Format("packed", 12, 12, packing="12packed"),
    "RGB8": _Format("rgb", 8, 24, channels=3),
    "BGR8": _Format("rgb", 8, 24, channels=3, bgr=True),
    "RGBa8": _Format("rgb", 8, 32, channels=4),
    "BGRa8": _Format("rgb", 8, 32, channels=4, bgr=True),
    "BayerRG8": _Format("bayer", 8, 8, cv_code=cv2.COLOR_BayerBG2RGB),
    "BayerGR8": _Format("bayer", 8, 8, cv_code=cv2.COLOR_BayerGB2RGB),
    "BayerGB8": _Format("bayer", 8, 8, cv_code=cv2.COLOR_BayerGR2RGB),
    "BayerBG8": _Format("bayer", 8, 8, cv_code=cv2.COLOR_BayerRG2RGB),
}

#: Pixel formats :func:`to_frame_image` understands (GenICam PFNC names).
SUPPORTED_FORMATS: tuple[str, ...] = tuple(_FORMATS)


def _lookup(pixel_format: str) -> _Format:
    fmt = _FORMATS.get(pixel_format)
    if fmt is None:
        raise CameraError(
            f"pixel format {pixel_format!r} is not supported: set the camera's PixelFormat to one of "
            + ", ".join(SUPPORTED_FORMATS)
        )
    return fmt


def is_mono(pixel_format: str) -> bool:
    """True if ``pixel_format`` gives a ``(H, W, 1)`` image."""
    return _lookup(pixel_format).kind in ("mono8", "mono16", "packed")


def row_bytes(width: int, pixel_format: str) -> int:
    """Bytes one image row occupies in the raw stream (without ``padding_x``).

    Packed rows are rounded up to a whole byte (PFNC: a line starts on a byte
    boundary); the GigE Vision ``*Packed`` formats store pixel pairs in 3 bytes.
    """
    fmt = _lookup(pixel_format)
    if fmt.kind == "packed" and fmt.packing in ("10packed", "12packed"):
        return (width + 1) // 2 * 3
    return (width * fmt.bits + 7) // 8


def raw_size(width: int, height: int, pixel_format: str, padding_x: int = 0) -> int:
    """Bytes of a raw ``width`` x ``height`` image in ``pixel_format`` with row padding."""
    return height * (row_bytes(width, pixel_format) + padding_x)


# --- packed-format unpackers: (H, G*n) bytes -> (H, G*m) uint16 pixels -----------------


def _groups(rows: np.ndarray, group_bytes: int) -> np.ndarray:
    """Split each row into groups of ``group_bytes`` (zero-padding a partial last group)."""
    h, n = rows.shape
    g = -(-n // group_bytes)
    if g * group_bytes != n:
        padded = np.zeros((h, g * group_bytes), dtype=np.uint8)
        padded[:, :n] = rows
        rows = padded
    return rows.reshape(h, g, group_bytes).astype(np.uint16)


def _unpack_10p(rows: np.ndarray) -> np.ndarray:
    # PFNC Mono10p: LSB-first bit stream, 4 pixels in 5 bytes.
    b = _groups(rows, 5)
    b0, b1, b2, b3, b4 = (b[..., i] for i in range(5))
    out = np.empty(b.shape[:2] + (4,), dtype=np.uint16)
    out[..., 0] = b0 | ((b1 & 0x03) << 8)
    out[..., 1] = (b1 >> 2) | ((b2 & 0x0F) << 6)
    out[..., 2] = (b2 >> 4) | ((b3 & 0x3F) << 4)
    out[..., 3] = (b3 >> 6) | (b4 << 2)
    return out.reshape(b.shape[0], -1)


def _unpack_12p(rows: np.ndarray) -> np.ndarray:
    # PFNC Mono12p: LSB-first bit stream, 2 pixels in 3 bytes.
    b = _groups(rows, 3)
    b0, b1, b2 = b[..., 0], b[..., 1], b[..., 2]
    out = np.empty(b.shape[:2] + (2,), dtype=np.uint16)
    out[..., 0] = b0 | ((b1 & 0x0F) << 8)
    out[..., 1] = (b1 >> 4) | (b2 << 4)
    return out.reshape(b.shape[0], -1)


def _unpack_12packed(rows: np.ndarray) -> np.ndarray:
    # GigE Vision Mono12Packed: byte 0 / byte 2 hold the 8 MSBs of pixel 0 / 1,
    # byte 1 their 4 LSBs (pixel 0 in the low nibble).
    b = _groups(rows, 3)
    b0, b1, b2 = b[..., 0], b[..., 1], b[..., 2]
    out = np.empty(b.shape[:2] + (2,), dtype=np.uint16)
    out[..., 0] = (b0 << 4) | (b1 & 0x0F)
    out[..., 1] = (b2 << 4) | (b1 >> 4)
    return out.reshape(b.shape[0], -1)


def _unpack_10packed(rows: np.ndarray) -> np.ndarray:
    # GigE Vision Mono10Packed: like Mono12Packed, with the 2 LSBs of pixel 0 in
    # bits 0-1 and of pixel 1 in bits 4-5 of the middle byte.
    b = _groups(rows, 3)
    b0, b1, b2 = b[..., 0], b[..., 1], b[..., 2]
    out = np.empty(b.shape[:2] + (2,), dtype=np.uint16)
    out[..., 0] = (b0 << 2) | (b1 & 0x03)
    out[..., 1] = (b2 << 2) | ((b1 >> 4) & 0x03)
    return out.reshape(b.shape[0], -1)


_UNPACKERS = {
    "10p": _unpack_10p,
    "12p": _unpack_12p,
    "12packed": _unpack_12packed,
    "10packed": _unpack_10packed,
}


def _rows(data: np.ndarray, height: int, stride: int, what: str) -> np.ndarray:
    """``data`` (1-D) as ``(height, stride)``; raises a one-line CameraError if too short."""
    need = height * stride
    if data.size < need:
        raise CameraError(
            f"{what}: buffer holds {data.size} elements, the image needs {need}: "
            "check Width/Height/PixelFormat against what the camera sends"
        )
    return data[:need].reshape(height, stride)


def to_frame_image(
    data: np.ndarray,
    width: int,
    height: int,
    pixel_format: str,
    padding_x: int = 0,
) -> tuple[np.ndarray, int]:
    """Convert one raw camera buffer into ``(image, bit_depth)`` in the Frame layout.

    ``data`` is a 1-D ``uint8`` raw buffer or a ``uint16`` array of already
    unpacked pixels (see the module docstring); ``padding_x`` is the number of
    padding **bytes** at the end of each row of the raw stream (GenTL
    ``BUFFER_INFO_PADDING_X``). Unknown formats raise :class:`CameraError`.
    """
    fmt = _lookup(pixel_format)
    what = f"{pixel_format} {width}x{height}"
    data = np.asarray(data).reshape(-1)
    if width <= 0 or height <= 0:
        raise CameraError(f"{what}: image size must be positive: check the camera's Width/Height")

    if data.dtype == np.uint16:
        if fmt.kind not in ("mono16", "packed"):
            raise CameraError(f"{what}: got 16-bit samples for an 8-bit format: report this camera/producer")
        stride = data.size // height
        if stride < width:
            raise CameraError(
                f"{what}: buffer holds {data.size} pixels, the image needs {width * height}: "
                "check Width/Height/PixelFormat against what the camera sends"
            )
        img = _rows(data, height, stride, what)[:, :width]
        return np.array(img[:, :, None], dtype=np.uint16, order="C"), fmt.bit_depth

    if data.dtype != np.uint8:
        raise CameraError(f"{what}: unsupported buffer sample type {data.dtype}: expected uint8 or uint16")

    if fmt.kind == "packed":
        packed_stride = row_bytes(width, pixel_format) + padding_x
        unpacked_size = height * (2 * width + padding_x)
        if data.size == unpacked_size and data.size != height * packed_stride:
            # Already unpacked into 16-bit little-endian containers.
            rows = _rows(data, height, 2 * width + padding_x, what)[:, : 2 * width]
            img = rows.copy().view("<u2").astype(np.uint16, copy=False)
            return np.ascontiguousarray(img[:, :, None]), fmt.bit_depth
        rows = _rows(data, height, packed_stride, what)[:, : packed_stride - padding_x]
        img = _UNPACKERS[fmt.packing](rows)[:, :width]
        return np.ascontiguousarray(img[:, :, None]), fmt.bit_depth

    stride = row_bytes(width, pixel_format)
    rows = _rows(data, height, stride + padding_x, what)[:, :stride]

    if fmt.kind == "mono8":
        return np.array(rows[:, :, None], dtype=np.uint8, order="C"), 8
    if fmt.kind == "mono16":
        # reinterpret little-endian byte pairs; astype(copy=True) makes the fresh array
        img = np.ascontiguousarray(rows).view("<u2").astype(np.uint16)
        return img[:, :, None], fmt.bit_depth
    if fmt.kind == "rgb":
        px = rows.reshape(height, width, fmt.channels)
        px = px[:, :, 2::-1] if fmt.bgr else px[:, :, :3]  # to RGB, dropping alpha
        return np.array(px, dtype=np.uint8, order="C"), 8  # always a copy
    # bayer: cvtColor allocates its output; it needs a contiguous 2-D input
    mosaic = np.ascontiguousarray(rows)
    return cv2.cvtColor(mosaic, fmt.cv_code), 8
