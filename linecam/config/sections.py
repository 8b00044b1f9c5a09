"""The smaller sections of a line config: camera kinds, model, thresholds, runtime, output, VLM."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from linecam.config.linescan import GenICamLineScan, SyntheticWebCamera


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class GenICamCamera(StrictModel):
    kind: Literal["genicam"]
    #: Path to a GenTL producer (.cti), or "viky" for the virtual camera in the genicam wheel.
    cti: str
    serial: str | None = None
    device_id: str | None = None
    index: int | None = Field(default=None, ge=0)
    num_buffers: int = Field(default=8, ge=1, le=256)
    buffer_handling: Literal["NewestOnly", "OldestFirst", "OldestFirstOverwrite"] = "NewestOnly"
    pixel_format: str | None = None
    width: int | None = Field(default=None, gt=0)
    height: int | None = Field(default=None, gt=0)
    #: Extra GenICam nodes to set at start, e.g. {ExposureTime: 500, AcquisitionFrameRate: 30}.
    features: dict[str, Any] = Field(default_factory=dict)
    fetch_timeout_s: float = Field(default=2.0, gt=0, le=60)
    #: Line-scan camera settings (line rate, LineStart trigger, encoder); lines per frame = height.
    linescan: GenICamLineScan | None = None


class ReplayCamera(StrictModel):
    kind: Literal["replay"]
    #: A folder of images or a video file.
    path: Path
    fps: float | None = Field(default=None, gt=0)
    loop: bool = False


class SyntheticCamera(StrictModel):
    kind: Literal["synthetic"]
    width: int = Field(default=320, ge=64, le=4096)
    height: int = Field(default=320, ge=64, le=4096)
    fps: float | None = Field(default=20.0, gt=0)
    defect_rate: float = Field(default=0.2, ge=0, le=1)
    seed: int = 0
    #: Stop after this many frames (None: run until stopped).
    frames: int | None = Field(default=None, gt=0)


CameraConfig = Annotated[Union[GenICamCamera, ReplayCamera, SyntheticCamera, SyntheticWebCamera],
                         Field(discriminator="kind")]


class ModelConfig(StrictModel):
    bundle: Path
    #: onnxruntime (CPU, the default: runs anywhere), onnxruntime-cuda, tensorrt (an engine in the
    #: bundle built on this device), or auto: TensorRT if such an engine exists, else ONNX Runtime
    #: CUDA if there is a GPU, else CPU; the log says which and why.
    backend: Literal["onnxruntime", "onnxruntime-cuda", "tensorrt", "auto"] = "onnxruntime"
    precision: Literal["fp32", "fp16", "int8"] | None = None
    #: ONNX Runtime intra-op threads per worker (0 = ONNX Runtime's default, one per core).
    #: 1 thread x runtime.workers workers measured best on small CPUs (benchmarks/README.md).
    intra_op_threads: int = Field(default=1, ge=0)
    #: TensorRT: replay a CUDA graph per frame (lower launch overhead; one graph per input shape).
    cuda_graph: bool = False


class ThresholdsConfig(StrictModel):
    """Overrides of the bundle's fitted thresholds (raw model units)."""

    image: float | None = None
    pixel: float | None = None
    #: Regions smaller than this many original-image pixels are not reported.
    min_region_area_px: int = Field(default=16, ge=0)


class RuntimeConfig(StrictModel):
    #: Frames waiting for inference. Acquisition never blocks: when full, a frame is dropped
    #: (policy below) and gets a SKIPPED verdict, so every frame still gets exactly one verdict.
    queue_size: int = Field(default=8, ge=1, le=1024)
    drop_policy: Literal["drop_oldest", "drop_newest"] = "drop_oldest"
    #: Inference threads (each runs one frame at a time; verdicts may leave out of frame order).
    workers: int = Field(default=2, ge=1, le=16)
    metrics_interval_s: float = Field(default=10.0, gt=0)
    #: A progress line in the log this often (fps, OK/NG/skipped, broker state); null: none.
    log_interval_s: float | None = Field(default=60.0, gt=0)
    #: NG frames waiting for their annotated snapshot; when full the defect event is sent without one.
    snapshot_queue_size: int = Field(default=16, ge=1)
    #: A free-running camera that delivers no frame for this long is treated as disconnected
    #: (torn down and reopened). null for triggered cameras, where an idle line is normal.
    frame_timeout_s: float | None = Field(default=10.0, gt=0)
    #: Back-off between camera reopen attempts: first and longest wait, seconds.
    reconnect_delay_s: tuple[float, float] = (1.0, 30.0)
    #: Reopens in a row that deliver no frame before linecam exits (code 4) so that systemd
    #: restarts it: a soft-locked GenTL producer only recovers in a fresh process.
    max_silent_reopens: int = Field(default=3, ge=1)
    #: Any inference worker busy on one frame for this long (a hung GPU or driver call never
    #: returns) stops the systemd watchdog keep-alives, so that systemd restarts linecam; status
    #: goes "degraded" and names the worker.
    inference_timeout_s: float = Field(default=20.0, gt=0)
    #: Expected frame size [width, height]; frames of another size are skipped (SKIPPED,
    #: reason wrong_frame_size). Default: the size of the first frame.
    frame_size: tuple[Annotated[int, Field(gt=0)], Annotated[int, Field(gt=0)]] | None = None
    #: Threads OpenCV may use inside one call (resize, JPEG). The workers already run frames in
    #: parallel; OpenCV's own pool on top only adds hand-offs between threads (measured on 2
    #: cores: about 0.3 ms of CPU per frame for nothing). null: OpenCV's default (one per core).
    opencv_threads: int | None = Field(default=1, ge=1, le=256)

    @model_validator(mode="after")
    def _delays(self) -> RuntimeConfig:
        lo, hi = self.reconnect_delay_s
        if not 0 < lo <= hi:
            raise ValueError("reconnect_delay_s must be [first, longest] with 0 < first <= longest")
        return self


class OutputConfig(StrictModel):
    #: Annotated JPEGs of NG frames. Default: <state dir>/snapshots (see ``state_dir``).
    snapshots_dir: Path | None = None
    snapshots_max_files: int = Field(default=500, ge=1)
    snapshots_max_mb: float = Field(default=200.0, gt=0)
    jpeg_quality: int = Field(default=85, ge=10, le=100)
    snapshots: bool = True
    #: Also publish each NG frame's annotated JPEG on <prefix>/snapshot (QoS 0, MQTT 5 user
    #: properties carry the defect's ids) for remote viewers and the recorder. Off by default.
    publish_snapshots: bool = False
    #: Bigger JPEGs are not published (counted as snapshots_too_big).
    snapshot_max_kb: float = Field(default=256.0, gt=0, le=65536)


class MetricsConfig(StrictModel):
    """Prometheus ``/metrics`` for the daemon (off unless ``prometheus_port`` is set)."""

    #: Serve Prometheus /metrics on this port (None: off). linecam.runtime.prometheus.
    prometheus_port: int | None = Field(default=None, ge=0, le=65535)
    prometheus_bind: str = "0.0.0.0"


class VlmConfig(StrictModel):
    """The compact VLM that describes NG frames (off unless ``bundle`` is set).

    It runs in its own thread at a lower CPU priority and never delays verdicts; when
    the line outruns it, the backlog policy decides which defects wait (see README)."""

    bundle: Path | None = None
    precision: Literal["fp32", "fp16", "int8", "int4"] = "int8"
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    intra_op_threads: int = Field(default=1, ge=0)
    backlog: int = Field(default=4, ge=1, le=1024)
    policy: Literal["newest_first", "skip"] = "newest_first"
    max_new_tokens: int = Field(default=48, ge=1, le=1024)
    #: ``str.format`` templates (see linecam/runtime/vlm/prompt.py for the fields); None = default.
    template: str | None = None
    region_template: str | None = None
    crop_margin: float = Field(default=0.5, ge=0)
    nice: int = Field(default=10, ge=0, le=19)
