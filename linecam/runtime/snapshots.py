"""Annotated JPEG snapshots of inspected frames, in a size-bounded directory.

A snapshot is the frame with the anomaly map as a JET heatmap over the model's
view (strong where the map is at or above the pixel threshold, faint elsewhere),
the regions' boxes and their scores (normalised: 1.00 = at threshold). Files are
written atomically (temp file + ``os.link``) so a reader — or a crash — never
sees half a JPEG, an existing file is never replaced (a defect event re-sent from the
spool after a restart must not point at a picture of another frame; the daemon names
files after the verdict's event id, unique across restarts), every file gets mode
``0640`` whatever the umask, and the oldest files are deleted whenever the directory exceeds
``max_files`` or ``max_bytes``. The index of what is there lives in memory and is
rebuilt from disk at start, so a restarted daemon keeps respecting the bound.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from linecam.preprocess import Geometry
from linecam.runtime.postprocess import Region

logger = logging.getLogger(__name__)

_SUFFIX = ".jpg"
#: Snapshot files: the service's group may read them (an operator station), others not.
SNAPSHOT_MODE = 0o640
_TMP_PREFIX = ".tmp-"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")

BOX_BGR = (0, 0, 255)  # red boxes; the JET overlay has no pure red at low scores
STRONG_ALPHA = 0.4
FAINT_ALPHA = 0.12


def _to_bgr8(image: np.ndarray, bit_depth: int) -> np.ndarray:
    """Frame layout (RGB or mono, 8/16-bit) -> a fresh BGR uint8 image for drawing."""
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"expected an (H, W, 1|3) frame image, got shape {image.shape}")
    if image.dtype != np.uint8:
        # 10/12/16-bit samples are not shifted: scale the real range onto 0..255.
        scale = 255.0 / float(2**bit_depth - 1)
        image = cv2.convertScaleAbs(image, alpha=scale)
        if image.ndim == 2:
            image = image[:, :, None]
    if image.shape[2] == 1:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    return cv2.cvtColor(image, cv2.COLOR_RGB2BGR)


def _view_rect(geometry: Geometry, h: int, w: int) -> tuple[int, int, int, int]:
    """The model's view in whole source pixels, clipped to the frame: x0, y0, x1, y1."""
    x0 = max(0, int(round(geometry.offset_x)))
    y0 = max(0, int(round(geometry.offset_y)))
    x1 = min(w, int(round(geometry.offset_x + geometry.width)))
    y1 = min(h, int(round(geometry.offset_y + geometry.height)))
    return x0, y0, x1, y1


def annotate(
    frame_image: np.ndarray,
    bit_depth: int,
    anomaly_map: np.ndarray,
    geometry: Geometry,
    regions: Sequence[Region],
    pixel_threshold: float,
) -> np.ndarray:
    """The annotated BGR uint8 image (what :class:`SnapshotWriter` encodes)."""
    canvas = _to_bgr8(frame_image, bit_depth)
    h, w = canvas.shape[:2]
    amap = np.asarray(anomaly_map, dtype=np.float32)
    amap = amap.reshape(amap.shape[-2:])
    x0, y0, x1, y1 = _view_rect(geometry, h, w)
    if x1 > x0 and y1 > y0 and amap.size:
        # The resize covers the view's full extent even if it sticks out of the frame,
        # then the part inside the frame is blended.
        fx0, fy0 = int(round(geometry.offset_x)), int(round(geometry.offset_y))
        vw = max(1, int(round(geometry.width)))
        vh = max(1, int(round(geometry.height)))
        big = cv2.resize(np.nan_to_num(amap, nan=0.0, posinf=0.0, neginf=0.0), (vw, vh), interpolation=cv2.INTER_LINEAR)
        big = big[y0 - fy0 : y1 - fy0, x0 - fx0 : x1 - fx0]
        # Threshold maps to the middle of the colormap (green); 2x threshold and up is red.
        level = np.clip(big * (127.5 / pixel_threshold), 0, 255).astype(np.uint8)
        heat = cv2.applyColorMap(level, cv2.COLORMAP_JET)
        alpha = np.where(big >= pixel_threshold, STRONG_ALPHA, FAINT_ALPHA).astype(np.float32)[:, :, None]
        roi = canvas[y0:y1, x0:x1]
        roi[:] = (roi * (1.0 - alpha) + heat * alpha).astype(np.uint8)

    thickness = max(2, round(max(h, w) / 400))
    font_scale = max(0.4, max(h, w) / 1600)
    for r in regions:
        bx, by, bw, bh = r.bbox
        cv2.rectangle(canvas, (bx, by), (bx + bw - 1, by + bh - 1), BOX_BGR, thickness)
        label = f"{r.max_score / pixel_threshold:.2f}"
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
        # Label sits above the box, or inside it when the box touches the top edge.
        ty = by - thickness if by - th - base - thickness >= 0 else by + th + base + thickness
        lx = max(0, min(bx, w - tw - 2))  # keep the label on the image at the right edge
        cv2.rectangle(canvas, (lx, ty - th - base), (lx + tw + 2, ty), BOX_BGR, cv2.FILLED)
        cv2.putText(
            canvas, label, (lx + 1, ty - base), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (255, 255, 255), 1, cv2.LINE_AA
        )
    return canvas


class SnapshotWriter:
    """Writes annotated snapshots into ``directory``, keeping it within bounds.

    Thread-safe; meant to be driven from a background thread, since JPEG encoding
    of a large frame takes milliseconds. Only ``*.jpg`` files in ``directory`` are
    counted and pruned; anything else there is left alone.
    """

    def __init__(
        self,
        directory: Path,
        max_files: int = 500,
        max_bytes: int = 200 * 1024 * 1024,
        jpeg_quality: int = 85,
    ) -> None:
        if max_files < 1 or max_bytes < 1:
            raise ValueError("max_files and max_bytes must be >= 1")
        if not 1 <= jpeg_quality <= 100:
            raise ValueError("jpeg_quality must be within 1..100")
        self.directory = Path(directory)
        self.max_files = int(max_files)
        self.max_bytes = int(max_bytes)
        self._params = [int(cv2.IMWRITE_JPEG_QUALITY), int(jpeg_quality)]
        self._lock = threading.Lock()
        # name -> size, oldest first.
        self._index: OrderedDict[str, int] = OrderedDict()
        self._total = 0
        self.directory.mkdir(parents=True, exist_ok=True)
        self._rebuild_index()
        with self._lock:
            self._prune(keep=None)

    # -- index -------------------------------------------------------------------

    def _rebuild_index(self) -> None:
        entries = []
        with os.scandir(self.directory) as it:
            for e in it:
                if not e.is_file(follow_symlinks=False):
                    continue
                if e.name.startswith(_TMP_PREFIX):
                    # Left by a crash mid-write: never a complete snapshot.
                    self._unlink(e.name)
                    continue
                if e.name.endswith(_SUFFIX):
                    st = e.stat(follow_symlinks=False)
                    entries.append((st.st_mtime_ns, e.name, st.st_size))
        entries.sort()
        self._index.clear()
        self._total = 0
        for _, name, size in entries:
            self._index[name] = size
            self._total += size

    def _unlink(self, name: str) -> None:
        try:
            os.unlink(self.directory / name)
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning("cannot delete old snapshot %s: %s", self.directory / name, exc)

    def _prune(self, keep: str | None) -> None:
        while self._index and (len(self._index) > self.max_files or self._total > self.max_bytes):
            name = next(iter(self._index))
            if name == keep:
                if len(self._index) == 1:
                    logger.warning(
                        "snapshot %s alone is larger than max_bytes=%d; kept", name, self.max_bytes
                    )
                    return
                self._index.move_to_end(name)
                continue
            self._total -= self._index.pop(name)
            self._unlink(name)

    @property
    def file_count(self) -> int:
        with self._lock:
            return len(self._index)

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return self._total

    # -- writing -----------------------------------------------------------------

    def write(
        self,
        frame_image: np.ndarray,
        bit_depth: int,
        anomaly_map: np.ndarray,
        geometry: Geometry,
        regions: Sequence[Region],
        name: str,
        pixel_threshold: float,
    ) -> Path:
        """Annotate, encode and store one snapshot; returns its path.

        ``name`` (e.g. ``"<frame_id>-<event id>"``) becomes the file name, with
        characters outside ``[A-Za-z0-9._-]`` replaced; an existing file of the
        same name is never replaced: ``-1``, ``-2`` ... is appended instead. The file
        gets mode 0640. Raises ``OSError`` when the disk refuses the write.
        """
        image = annotate(frame_image, bit_depth, anomaly_map, geometry, regions, pixel_threshold)
        ok, buf = cv2.imencode(_SUFFIX, image, self._params)
        if not ok:
            raise ValueError(f"OpenCV could not encode snapshot {name!r} as JPEG")
        stem = _UNSAFE.sub("_", name).lstrip(".") or "snapshot"
        if stem.endswith(_SUFFIX):
            stem = stem[: -len(_SUFFIX)]
        fname = stem + _SUFFIX
        tmp = self.directory / f"{_TMP_PREFIX}{threading.get_ident()}-{fname}"
        data = buf.tobytes() if hasattr(buf, "tobytes") else bytes(buf)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, SNAPSHOT_MODE)
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), SNAPSHOT_MODE)  # whatever the umask
                f.write(data)
            for n in range(1000):
                fname = stem + (f"-{n}" if n else "") + _SUFFIX
                try:
                    os.link(tmp, self.directory / fname)  # atomic, and never over an existing file
                    break
                except FileExistsError:
                    continue
            else:
                raise FileExistsError(f"snapshot {stem}: 1000 files of that name exist")
        finally:
            self._unlink(tmp.name)
        path = self.directory / fname
        with self._lock:
            old = self._index.pop(fname, None)
            if old is not None:
                self._total -= old
            self._index[fname] = len(data)
            self._total += len(data)
            self._prune(keep=fname)
        return path
