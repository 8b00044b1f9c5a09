"""The frame source a config's ``camera:`` section describes (built, not opened)."""

from __future__ import annotations

from linecam.camera.base import FrameSource
from linecam.config import CameraConfig, ReplayCamera, SyntheticCamera, SyntheticWebCamera


def open_source(cam: CameraConfig) -> FrameSource:
    """Build (not open) the frame source a config section describes; drivers import lazily."""
    if isinstance(cam, SyntheticWebCamera):
        from linecam.camera.synthetic_web import SyntheticWebSource

        return SyntheticWebSource.from_config(cam)
    if isinstance(cam, SyntheticCamera):
        from linecam.camera.synthetic import SyntheticLineSource

        return SyntheticLineSource(width=cam.width, height=cam.height, fps=cam.fps,
                                   defect_rate=cam.defect_rate, seed=cam.seed, frames=cam.frames)
    if isinstance(cam, ReplayCamera):
        from linecam.camera.replay import ReplaySource

        return ReplaySource(cam.path, fps=cam.fps, loop=cam.loop)
    from linecam.camera.genicam import GenICamSource, viky_cti_path
    from linecam.camera.genicam_linescan import linescan_setup

    cti = viky_cti_path() if cam.cti == "viky" else cam.cti
    return GenICamSource(cti, serial=cam.serial, device_id=cam.device_id, index=cam.index,
                         num_buffers=cam.num_buffers, buffer_handling=cam.buffer_handling,
                         pixel_format=cam.pixel_format, width=cam.width, height=cam.height,
                         features=cam.features, fetch_timeout=cam.fetch_timeout_s,
                         setup=linescan_setup(cam.linescan) if cam.linescan is not None else None)
