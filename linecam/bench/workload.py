"""What every mode runs on: one bundle, one set of frames, one set of ORT settings.

Frames come from the simulated line (parts with known defects, so the NG path with
its regions and snapshots is exercised) and are written once as uncompressed BMP:
the replay source then costs about what a camera's buffer copy costs, not a PNG
decode that no line camera pays.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort

from linecam.bundle import Bundle, load_bundle
from linecam.camera.frame import Frame
from linecam.camera.replay import ReplaySource
from linecam.errors import LinecamError
from linecam.runtime.session import make_session

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FrameSet:
    folder: Path
    count: int
    width: int
    height: int
    defect_rate: float
    seed: int


def write_frames(folder: Path, count: int = 48, width: int = 320, height: int = 320, defect_rate: float = 0.25,
                 seed: int = 7) -> FrameSet:
    """Frames of the simulated line as BMP files ``frame_00000.bmp`` ... (reused if already there)."""
    from linecam.camera.synthetic import SyntheticLineSource

    folder.mkdir(parents=True, exist_ok=True)
    stamp = folder / "frames.txt"
    key = f"{count} {width} {height} {defect_rate} {seed}\n"
    if stamp.is_file() and stamp.read_text() == key and len(list(folder.glob("*.bmp"))) == count:
        return FrameSet(folder, count, width, height, defect_rate, seed)
    for old in folder.glob("*.bmp"):
        old.unlink()
    with SyntheticLineSource(width=width, height=height, fps=None, defect_rate=defect_rate, seed=seed,
                             frames=count) as src:
        for i in range(count):
            f = src.read(timeout=1.0)
            if f is None:
                raise LinecamError("the synthetic line gave no frame: cannot build the benchmark frames")
            if not cv2.imwrite(str(folder / f"frame_{i:05d}.bmp"), cv2.cvtColor(f.image, cv2.COLOR_RGB2BGR)):
                raise LinecamError(f"cannot write benchmark frames to {folder}: check the disk / --workdir")
    stamp.write_text(key)
    return FrameSet(folder, count, width, height, defect_rate, seed)


def load_frames(frames: FrameSet) -> list[Frame]:
    """All frames in memory, exactly as the replay source delivers them."""
    out = []
    with ReplaySource(frames.folder, fps=None, loop=False) as src:
        for _ in range(frames.count):
            f = src.read(timeout=1.0)
            assert f is not None
            out.append(f)
    return out


def bundle_session(bundle: Bundle, intra_op_threads: int, role: str | None = None) -> ort.InferenceSession:
    """A bare ONNX Runtime session with the runner's own settings (same file, same options)."""
    role = role or bundle.pick("onnxruntime", None)
    return make_session(bundle.path(role), intra_op_threads=intra_op_threads)


def model_input(bundle: Bundle, frame: Frame) -> np.ndarray:
    from linecam.preprocess import Preprocessor

    return Preprocessor(bundle.manifest.preprocess)(frame.image, frame.bit_depth, copy=True)


def open_bundle(path: Path) -> Bundle:
    return load_bundle(path)
