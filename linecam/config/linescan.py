"""Line-scan settings: the ``linescan:`` section (tiles, mm scale, web map; used by
:mod:`linecam.runtime.linescan`), a GenICam line-scan camera's ``camera.linescan`` (trigger,
line rate, encoder; applied by :mod:`linecam.camera.genicam_linescan`) and the synthetic web
camera (:mod:`linecam.camera.synthetic_web`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DefectKind = Literal["spot", "scratch", "streak"]


class EncoderScale(BaseModel):
    """Down-web position from encoder counts carried by the frames (``meta["encoder_count"]``)."""

    model_config = ConfigDict(extra="forbid")
    mm_per_count: float = Field(gt=0)


class WebMapSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    #: Default: <state dir>/webmaps (see ``linecam.config.load.state_dir``).
    dir: Path | None = None
    #: The web's width on the map at most (the web is downsampled by a whole factor).
    max_width_px: int = Field(default=1024, ge=16)
    #: When the map grows longer, its down-web scale is halved (the PNG stays bounded).
    max_height_px: int = Field(default=16384, ge=64)
    #: Also rewrite the map this often during a run (null: only at the end).
    every_s: float | None = Field(default=60.0, gt=0)


class LineScanSettings(BaseModel):
    """Config section ``linescan:`` (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = False
    #: [width, height] of an inspection tile in web pixels; default: the model's input size.
    tile_size: tuple[int, int] | None = None
    #: Overlap of neighbouring tiles, both directions: at least the largest defect expected.
    overlap_px: int = Field(default=32, ge=0)
    mm_per_px_cross: float = Field(default=0.1, gt=0)
    mm_per_line: float = Field(default=0.1, gt=0)
    encoder: EncoderScale | None = None
    #: Detections this close (pixels) or closer are one defect.
    merge_gap_px: int = Field(default=1, ge=0)
    web_map: WebMapSettings = Field(default_factory=WebMapSettings)


class WebDefectSpec(BaseModel):
    """A defect placed on the synthetic web, in millimetres from the web's first line (down)
    and its left edge (cross); ``width_mm`` across, ``length_mm`` along the web."""

    model_config = ConfigDict(extra="forbid")
    cross_mm: float = Field(ge=0)
    down_mm: float = Field(ge=0)
    width_mm: float = Field(gt=0)
    length_mm: float = Field(gt=0)
    kind: DefectKind = "spot"


class SyntheticWebCamera(BaseModel):
    """Config section ``camera: {kind: synthetic_web, ...}`` (see :class:`SyntheticWebSource`)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["synthetic_web"]
    width: int = Field(default=1024, ge=16, le=16384)
    lines_per_frame: int = Field(default=256, ge=1, le=65536)
    #: Lines per second (frames come at line_rate_hz / lines_per_frame); null: as fast as read.
    line_rate_hz: float | None = Field(default=10000.0, gt=0)
    #: Stop after this many frames (null: an endless web).
    frames: int | None = Field(default=None, gt=0)
    mm_per_px_cross: float = Field(default=0.1, gt=0)
    mm_per_line: float = Field(default=0.1, gt=0)
    #: Explicit defects (mm positions) ...
    defects: list[WebDefectSpec] = Field(default_factory=list)
    #: ... plus random ones: expected number starting in each frame.
    defect_rate: float = Field(default=0.0, ge=0, le=1)
    #: Size range of random defects, pixels (keep linescan.overlap_px at least the maximum).
    defect_size_px: tuple[int, int] = (6, 24)
    #: Frame indices the "camera" loses (a gap in frame ids: a web gap downstream).
    drop_frames: list[int] = Field(default_factory=list)
    seed: int = 0
    mono: bool = True
    #: Simulated encoder: meta["encoder_count"] = counts at each frame's first line.
    encoder_counts_per_line: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _sizes(self) -> SyntheticWebCamera:
        lo, hi = self.defect_size_px
        if not 1 <= lo <= hi:
            raise ValueError("defect_size_px must be [min, max] with 1 <= min <= max")
        return self


class EncoderSettings(BaseModel):
    """A quadrature encoder on the conveyor (SFNC ``Encoder*`` nodes). ``null`` leaves a node
    as the camera has it."""

    model_config = ConfigDict(extra="forbid")
    selector: str = "Encoder0"
    source_a: str = "Line1"
    source_b: str | None = "Line2"
    #: e.g. FourPhase, HighResolution
    mode: str | None = None
    #: Encoder counts per line trigger.
    divider: int | None = Field(default=None, ge=1)
    #: e.g. PositionUp, DirectionUp, Motion
    output_mode: str | None = None
    #: Execute EncoderReset at start (position counting from the start of the run).
    reset: bool = True


class GenICamLineScan(BaseModel):
    """Config ``camera: {kind: genicam, linescan: {...}}``: line-scan camera settings.

    ``trigger``: ``free_run`` (the camera's own line rate, ``line_rate_hz``), ``line`` (a line
    trigger on ``trigger_source``, default Line1) or ``encoder`` (each line started by the
    encoder, ``trigger_source`` default Encoder0, configured by ``encoder``). Lines per frame
    is the camera's ``height``.
    """

    model_config = ConfigDict(extra="forbid")
    trigger: Literal["free_run", "line", "encoder"] = "free_run"
    #: Lines per second (free_run): AcquisitionLineRate, or AcquisitionLineRateAbs (Basler GigE).
    line_rate_hz: float | None = Field(default=None, gt=0)
    trigger_source: str | None = None
    trigger_activation: str | None = "RisingEdge"
    encoder: EncoderSettings | None = None

    @model_validator(mode="after")
    def _consistent(self) -> GenICamLineScan:
        if self.trigger != "free_run" and self.line_rate_hz is not None:
            raise ValueError(f"line_rate_hz applies to trigger free_run only (the {self.trigger} trigger sets the "
                             "line rate): remove it")
        if self.trigger == "encoder" and self.encoder is None:
            self.encoder = EncoderSettings()
        return self
