"""The line daemon: wiring of the three stages for one camera. ``run()`` blocks until stopped.

Threads and queues (see ARCHITECTURE.md)::

    Acquisition (main thread) --in_q (bounded, drop policy)--> N inspection workers
        workers: Inspector.inspect(frame) -> Outbox.inspected --verdict--> Publisher (MQTT)
        Outbox: NG frames, snap_q (bounded) --> snapshot thread --defect--> Publisher, VLM
    MetricsReporter thread --metrics, systemd STATUS=--> Publisher / systemd

* :mod:`~linecam.runtime.acquisition` — source reads, reconnect, watchdog, frame checks,
  drop policy, the line-scan adapter in front of the queue;
* :mod:`~linecam.runtime.inspector` — preprocess -> runner -> postprocess;
* :mod:`~linecam.runtime.outbox` — the only code that turns inspections and skips into
  messages and counts frames; feeds snapshots, the VLM and the line-scan session.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from linecam import messages
from linecam.bundle import Bundle
from linecam.camera.base import FrameSource
from linecam.config import LinecamConfig, state_dir
from linecam.runtime.acquisition import Acquisition
from linecam.runtime.backends import Runner
from linecam.runtime.framecheck import FrameCheck
from linecam.runtime.inspector import Inspector, Thresholds
from linecam.runtime.linescan.session import LineScanSession
from linecam.runtime.linescan.tiles import tile_size_for
from linecam.runtime.metrics import MetricsReporter, ProgressLog
from linecam.runtime.outbox import Describer, Outbox, Publisher
from linecam.runtime.sdnotify import Notifier
from linecam.runtime.snapshots import SnapshotWriter
from linecam.runtime.stats import Counters, LatencyStats

if TYPE_CHECKING:
    from linecam.runtime.prometheus import PrometheusExporter

logger = logging.getLogger(__name__)

_STOP = object()  # queue sentinel

__all__ = ["Daemon", "RunSummary"]


@dataclass
class RunSummary:
    counters: dict[str, int]
    latency_ms: dict[str, dict[str, float]]
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


class Daemon:
    """Owns the queues and threads for one camera (see the module docstring)."""

    def __init__(self, cfg: LinecamConfig, source: FrameSource, bundle: Bundle, runner: Runner,
                 publisher: Publisher, notifier: Notifier | None = None, describer: Describer | None = None) -> None:
        self.cfg = cfg
        self.source = source
        self.bundle = bundle
        self.notifier = notifier or Notifier.from_env()
        #: Optional VLM :class:`~linecam.runtime.vlm.worker.DescriptionWorker`, started by the caller.
        self.describer = describer
        self.thresholds = Thresholds.of(bundle, cfg.thresholds)
        self.inspector = Inspector(bundle, runner, self.thresholds)
        self.topics = messages.topics(cfg.mqtt.topic_prefix or messages.default_prefix(cfg.line, cfg.camera_id))
        out = cfg.output
        snapshots = (SnapshotWriter(cfg.snapshots_dir(), max_files=out.snapshots_max_files,
                                    max_bytes=int(out.snapshots_max_mb * 1e6), jpeg_quality=out.jpeg_quality)
                     if out.snapshots else None)
        self.outbox = Outbox(line=cfg.line, camera=cfg.camera_id, topics=self.topics, publisher=publisher,
                             thresholds=self.thresholds, model_info=self.inspector.model_info, snapshots=snapshots,
                             snapshot_queue_size=cfg.runtime.snapshot_queue_size,
                             copy_maps=self.inspector.reuses_map, describer=describer)
        publisher.on_spool_drop = self.outbox.on_spool_drop
        self._stop = threading.Event()
        self._in_q: queue.Queue = queue.Queue(maxsize=cfg.runtime.queue_size)
        #: Per worker: monotonic time it took its current frame, 0.0 while idle. One hung call
        #: (GPU, driver) never returns and silently takes that worker's share of capacity for
        #: good; the acquisition's watchdog check sees it even while the other workers go on.
        self._busy_since = [0.0] * cfg.runtime.workers
        fs = cfg.runtime.frame_size
        check = FrameCheck((int(fs[0]), int(fs[1])) if fs is not None else None, bundle.manifest.preprocess.crop)
        self.acquisition = Acquisition(source, cfg.runtime, cfg.mqtt, self.outbox, self._in_q, check, self.notifier,
                                       self._stop, self._busy_since)
        self._workers: list[threading.Thread] = []
        #: ``/metrics`` when metrics.prometheus_port is set (service.py: linecam.runtime.prometheus.attach).
        self.prometheus: PrometheusExporter | None = None

    # -- what callers and tests look at ---------------------------------------------------
    @property
    def counters(self) -> Counters:
        return self.outbox.counters

    @property
    def stats(self) -> LatencyStats:
        return self.outbox.stats

    @property
    def publisher(self) -> Publisher:
        return self.outbox.publisher

    @publisher.setter
    def publisher(self, publisher: Publisher) -> None:  # the bench tees the verdicts
        self.outbox.publisher = publisher

    @property
    def initial_camera_fault(self) -> str | None:
        return self.acquisition.initial_camera_fault

    @initial_camera_fault.setter
    def initial_camera_fault(self, why: str | None) -> None:
        """Set by the service when the camera could not be opened at start (absent, busy)."""
        self.acquisition.initial_camera_fault = why

    def queue_depths(self) -> dict[str, int]:
        """Items waiting per queue: frames for inspection, NG frames for their snapshot."""
        return {"inference": self._in_q.qsize(), "snapshots": self.outbox.snapshot_queue_depth}

    def request_stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # -- threads --------------------------------------------------------------------------
    def _worker(self, slot: int) -> None:
        inspect = self.inspector.for_thread().inspect
        outbox, busy, in_q = self.outbox, self._busy_since, self._in_q
        while True:
            frame = in_q.get()
            if frame is _STOP:
                return
            busy[slot] = time.monotonic()
            try:
                outbox.inspected(frame, inspect(frame.image, frame.bit_depth))
            except Exception:  # a bug must not kill the worker silently: count, log, go on
                outbox.counters.inc("errors")
                logger.exception("frame %d: processing failed", frame.frame_id)
                outbox.skipped(frame, "processing_error")
            finally:
                busy[slot] = 0.0

    def _start_linescan(self) -> LineScanSession | None:
        ls = self.cfg.linescan
        if not ls.enabled:
            return None
        pre = self.bundle.manifest.preprocess
        out = self.outbox
        return LineScanSession(
            ls, tile_size_for(ls.tile_size, pre.input_size, pre.crop), line=self.cfg.line, camera=self.cfg.camera_id,
            image_threshold=self.thresholds.image, counters=out.counters, model=out.model_info,
            publish=out.publish_linescan, on_gap=lambda detail: out.status("running", detail=detail),
            map_dir=(ls.web_map.dir or state_dir() / "webmaps") if ls.web_map.enabled else None,
            on_uninspected=lambda detail: out.status("degraded", detail=detail),
            on_covered=lambda detail: out.status("running", detail=detail))

    def run(self) -> RunSummary:
        t_start = time.monotonic()
        out = self.outbox
        out.start()
        out.status("starting")
        describer = self.describer
        metrics = MetricsReporter(
            out, self.notifier, self.cfg.runtime.metrics_interval_s, self._stop,
            queue_depths=self.queue_depths,
            extra_counters=(lambda: {f"vlm_{k}": v for k, v in describer.counters.items()})
            if describer is not None else None)
        every = self.cfg.runtime.log_interval_s
        progress = ProgressLog(out, every, self._stop) if every is not None else None
        try:
            linescan = self._start_linescan()
            out.linescan = self.acquisition.linescan = linescan
            for i in range(self.cfg.runtime.workers):
                self._workers.append(threading.Thread(target=self._worker, args=(i,), name=f"infer-{i}",
                                                      daemon=True))
            for t in self._workers:
                t.start()
            metrics.start()
            if progress is not None:
                progress.start()
            self.acquisition.run()
        finally:
            self._drain()
            self._stop.set()
            metrics.join(timeout=5)
            if progress is not None:
                progress.join(timeout=5)
        return RunSummary(out.counters.snapshot(), out.stats.summary(), time.monotonic() - t_start)

    def _drain(self) -> None:
        """Finish every queued frame, then every queued snapshot: nothing accepted is lost."""
        self.notifier.stopping()
        for _ in self._workers:
            self._in_q.put(_STOP)
        for t in self._workers:
            t.join()
        self.outbox.drain()
        if self.describer is not None:
            # A finite source that ended by itself: finish pending descriptions; on SIGTERM
            # they are published as skipped (bounded stop time).
            self.describer.stop(drain=self.acquisition.exhausted)
