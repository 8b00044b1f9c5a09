"""The line daemon: frames in, one verdict per frame out over MQTT.

Threads and queues (see ARCHITECTURE.md)::

    acquisition (main thread) --in_q (bounded, drop policy)--> N inference workers
        workers --verdict--> MQTT (paho's own network thread)
        workers --NG frames, snap_q (bounded)--> snapshot thread --defect--> MQTT
    metrics thread --metrics, status, systemd STATUS=--> MQTT / systemd

Acquisition never waits for inference: when ``in_q`` is full a frame is dropped by
the configured policy and still gets a verdict (``SKIPPED``, reason ``queue_full``),
so subscribers can count on exactly one verdict per frame.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from linecam import __version__, messages
from linecam.bundle import Bundle
from linecam.camera.base import FrameSource, SourceExhausted
from linecam.camera.frame import Frame
from linecam.config import GenICamCamera, LinecamConfig, ReplayCamera, SyntheticCamera
from linecam.errors import BrokerError, CameraError
from linecam.preprocess import Geometry, Preprocessor
from linecam.runtime.backends import Runner
from linecam.runtime.postprocess import Postprocessor, Region
from linecam.runtime.sdnotify import Notifier
from linecam.runtime.snapshots import SnapshotWriter
from linecam.runtime.stats import Counters, LatencyStats

logger = logging.getLogger(__name__)

_STOP = object()  # queue sentinel


def open_source(cam: GenICamCamera | ReplayCamera | SyntheticCamera) -> FrameSource:
    """Build (not open) the frame source a config section describes."""
    if isinstance(cam, SyntheticCamera):
        from linecam.camera.synthetic import SyntheticLineSource

        return SyntheticLineSource(width=cam.width, height=cam.height, fps=cam.fps,
                                   defect_rate=cam.defect_rate, seed=cam.seed, frames=cam.frames)
    if isinstance(cam, ReplayCamera):
        from linecam.camera.replay import ReplaySource

        return ReplaySource(cam.path, fps=cam.fps, loop=cam.loop)
    from linecam.camera.genicam import GenICamSource, viky_cti_path

    cti = viky_cti_path() if cam.cti == "viky" else cam.cti
    return GenICamSource(cti, serial=cam.serial, device_id=cam.device_id, index=cam.index,
                         num_buffers=cam.num_buffers, buffer_handling=cam.buffer_handling,
                         pixel_format=cam.pixel_format, width=cam.width, height=cam.height,
                         features=cam.features, fetch_timeout=cam.fetch_timeout_s)


@dataclass(slots=True)
class _NgWork:
    frame: Frame
    anomaly_map: np.ndarray  # a copy: the runner may reuse its buffers
    geometry: Geometry
    regions: list[Region]
    score_raw: float
    verdict_event_id: str


@dataclass
class RunSummary:
    counters: dict[str, int]
    latency_ms: dict[str, dict[str, float]]
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


class Daemon:
    """Owns the queues and threads for one camera. ``run()`` blocks until stopped."""

    def __init__(self, cfg: LinecamConfig, source: FrameSource, bundle: Bundle, runner: Runner,
                 publisher: Any, notifier: Notifier | None = None) -> None:
        self.cfg = cfg
        self.source = source
        self.bundle = bundle
        self.runner = runner
        self.publisher = publisher
        self.notifier = notifier or Notifier.from_env()
        man = bundle.manifest
        self.image_threshold = cfg.thresholds.image if cfg.thresholds.image is not None else man.thresholds.image
        self.pixel_threshold = cfg.thresholds.pixel if cfg.thresholds.pixel is not None else man.thresholds.pixel
        self.model_info = {"name": man.name, "sha256": bundle.model_sha256, "file": runner.role}
        self.topics = messages.topics(cfg.mqtt.topic_prefix or messages.default_prefix(cfg.line, cfg.camera_id))
        self.counters = Counters()
        self.stats = LatencyStats()
        self._in_q: queue.Queue = queue.Queue(maxsize=cfg.runtime.queue_size)
        self._snap_q: queue.Queue = queue.Queue(maxsize=cfg.runtime.snapshot_queue_size)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._snapshots = (SnapshotWriter(cfg.snapshots_dir(), max_files=cfg.output.snapshots_max_files,
                                          max_bytes=int(cfg.output.snapshots_max_mb * 1e6),
                                          jpeg_quality=cfg.output.jpeg_quality)
                           if cfg.output.snapshots else None)
        self._camera_state = "up"
        self._ready_sent = False
        self._waiting_said = False
        self._t_start = time.monotonic()

    # -- control -------------------------------------------------------------------------
    def request_stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # -- publishing helpers --------------------------------------------------------------
    def _common(self) -> dict[str, Any]:
        return {"line": self.cfg.line, "camera": self.cfg.camera_id}

    def _publish_skipped(self, frame: Frame, reason: str) -> None:
        self.counters.inc("skipped")
        total = (time.monotonic_ns() - frame.host_ns) / 1e6
        msg = messages.verdict(**self._common(), frame_id=frame.frame_id, verdict="SKIPPED", score=None,
                               score_raw=None, threshold=self.image_threshold, frame_ts_ns=frame.timestamp_ns,
                               frame_clock=frame.clock, frame_mono_ns=frame.host_ns,
                               latency_ms={"total": round(total, 3)}, model=self.model_info, reason=reason)
        self.publisher.publish(self.topics.verdict, msg, qos=1)

    def _publish_status(self, state: str, detail: str | None = None) -> None:
        c = self.counters.snapshot()
        elapsed = max(time.monotonic() - self._t_start, 1e-6)
        msg = messages.status(**self._common(), online=True, state=state, camera_state=self._camera_state,
                              detail=detail, fps=round(c.get("frames", 0) / elapsed, 2),
                              frames=c.get("frames", 0), ng=c.get("ng", 0), dropped=c.get("skipped", 0),
                              version=__version__, model=self.model_info)
        self.publisher.publish_status(msg)

    # -- threads -------------------------------------------------------------------------
    def _worker(self) -> None:
        pre = Preprocessor(self.bundle.manifest.preprocess)
        post = Postprocessor(self.pixel_threshold, self.image_threshold,
                             min_area_px=self.cfg.thresholds.min_region_area_px)
        runner, stats, counters, pub, topics = self.runner, self.stats, self.counters, self.publisher, self.topics
        common = self._common()
        while True:
            frame = self._in_q.get()
            if frame is _STOP:
                return
            try:
                t0 = time.monotonic_ns()
                x = pre(frame.image, frame.bit_depth)
                t1 = time.monotonic_ns()
                out = runner.run(x)
                t2 = time.monotonic_ns()
                if not (post.is_valid(out.anomaly_map) and np.isfinite(out.score)):
                    # Never a verdict from a model output that failed its checks.
                    counters.inc("invalid_output")
                    logger.error("frame %d: model output has NaN/Inf; frame skipped", frame.frame_id)
                    self._publish_skipped(frame, "invalid_model_output")
                    continue
                verdict = post.verdict(out.score)
                geometry = pre.geometry(frame.height, frame.width)
                regions = (post.regions(out.anomaly_map, geometry, (frame.height, frame.width))
                           if verdict == "NG" else [])
                t3 = time.monotonic_ns()
                lat = {
                    "queue": (t0 - frame.host_ns) / 1e6,
                    "preprocess": (t1 - t0) / 1e6,
                    "inference": (t2 - t1) / 1e6,
                    "postprocess": (t3 - t2) / 1e6,
                }
                lat["total"] = (time.monotonic_ns() - frame.host_ns) / 1e6
                for k, v in lat.items():
                    stats.add(k, v)
                msg = messages.verdict(**common, frame_id=frame.frame_id, verdict=verdict,
                                       score=out.score / self.image_threshold, score_raw=out.score,
                                       threshold=self.image_threshold, frame_ts_ns=frame.timestamp_ns,
                                       frame_clock=frame.clock, frame_mono_ns=frame.host_ns,
                                       latency_ms={k: round(v, 3) for k, v in lat.items()},
                                       model=self.model_info, n_regions=len(regions))
                pub.publish(topics.verdict, msg, qos=1)
                counters.inc("ng" if verdict == "NG" else "ok")
                if verdict == "NG":
                    work = _NgWork(frame, out.anomaly_map.copy(), geometry, regions, out.score, msg["event_id"])
                    try:
                        self._snap_q.put_nowait(work)
                    except queue.Full:
                        # The defect event is never dropped; only its picture is.
                        counters.inc("snapshots_skipped")
                        self._publish_defect(work, snapshot=None)
            except Exception:  # a bug must not kill the worker silently: count, log, go on
                counters.inc("errors")
                logger.exception("frame %d: processing failed", frame.frame_id)
                self._publish_skipped(frame, "processing_error")
            finally:
                counters.inc("frames")

    def _publish_defect(self, work: _NgWork, snapshot: str | None) -> None:
        f = work.frame
        msg = messages.defect(**self._common(), frame_id=f.frame_id, verdict_event_id=work.verdict_event_id,
                              score=work.score_raw / self.image_threshold, image_size=(f.width, f.height),
                              regions=[r.to_dict(self.image_threshold) for r in work.regions],
                              snapshot=snapshot, frame_ts_ns=f.timestamp_ns, frame_clock=f.clock,
                              model=self.model_info)
        self.publisher.publish(self.topics.defect, msg, qos=1)

    def _snapshot_worker(self) -> None:
        while True:
            work = self._snap_q.get()
            if work is _STOP:
                return
            path = None
            if self._snapshots is not None:
                try:
                    path = str(self._snapshots.write(work.frame.image, work.frame.bit_depth, work.anomaly_map,
                                                     work.geometry, work.regions,
                                                     name=f"{self.cfg.camera_id}_{work.frame.frame_id:09d}",
                                                     pixel_threshold=self.pixel_threshold))
                except Exception as e:  # disk full etc.: the event still goes out
                    self.counters.inc("snapshot_errors")
                    logger.warning("snapshot for frame %d not written: %s", work.frame.frame_id, e)
            self._publish_defect(work, path)

    def _metrics_worker(self) -> None:
        import psutil

        proc = psutil.Process()
        interval = self.cfg.runtime.metrics_interval_s
        last_frames, last_t = 0, time.monotonic()
        while not self._stop.wait(interval):
            c = self.counters.snapshot()
            now = time.monotonic()
            fps = (c.get("frames", 0) - last_frames) / max(now - last_t, 1e-6)
            last_frames, last_t = c.get("frames", 0), now
            try:
                fds = proc.num_fds()
            except Exception:  # not on every OS
                fds = -1
            msg = messages.metrics(**self._common(), interval_s=interval, counters=c, fps=round(fps, 2),
                                   latency_ms=self.stats.summary(),
                                   queue_depth={"inference": self._in_q.qsize(), "snapshots": self._snap_q.qsize()},
                                   process={"rss_mb": round(proc.memory_info().rss / 1e6, 1),
                                            "cpu_percent": proc.cpu_percent(), "threads": proc.num_threads(),
                                            "fds": fds})
            self.publisher.publish(self.topics.metrics, msg, qos=0)
            self.notifier.status(f"{fps:.1f} fps, {c.get('frames', 0)} frames, {c.get('ng', 0)} NG, "
                                 f"{c.get('skipped', 0)} skipped, camera {self._camera_state}")

    # -- acquisition ---------------------------------------------------------------------
    def _enqueue(self, frame: Frame) -> None:
        try:
            self._in_q.put_nowait(frame)
            return
        except queue.Full:
            pass
        if self.cfg.runtime.drop_policy == "drop_newest":
            self._publish_skipped(frame, "queue_full")
            self.counters.inc("frames")
            return
        try:
            oldest = self._in_q.get_nowait()
        except queue.Empty:  # a worker took one meanwhile
            oldest = None
        if oldest is not None and oldest is not _STOP:
            self._publish_skipped(oldest, "queue_full")
            self.counters.inc("frames")
        try:
            self._in_q.put_nowait(frame)
        except queue.Full:  # pathological race: never block acquisition
            self._publish_skipped(frame, "queue_full")
            self.counters.inc("frames")

    def _maybe_ready(self) -> None:
        """READY=1 once the camera delivers and the broker is connected (systemd semantics)."""
        if self._ready_sent:
            return
        if not self.publisher.connected:
            if not self._waiting_said and time.monotonic() - self._t_start > 2.0:
                self._waiting_said = True
                s = self.cfg.mqtt
                self.notifier.status(f"inspecting; waiting for broker {s.host}:{s.port} (verdicts held in memory)")
            return
        self._ready_sent = True
        self.notifier.ready(status=f"camera {self.source.name} up, broker connected")
        self._publish_status("running")
        logger.info("running: camera %s up, broker connected", self.source.name)

    def _reconnect_camera(self, err: Exception) -> bool:
        """Camera fault: report it, then reopen with backoff until it works or we stop."""
        self._camera_state = "down"
        self.counters.inc("camera_faults")
        logger.error("camera fault: %s", err)
        self._publish_status("degraded", detail=str(err))
        delay = 1.0
        while not self._stop.is_set():
            try:
                self.source.close()
            except Exception:
                logger.debug("close after fault failed", exc_info=True)
            if self._stop.wait(delay):
                return False
            try:
                self.source.open()
            except CameraError as e:
                logger.warning("camera still down (%s); retrying in %.0f s", e, min(delay * 2, 30))
                delay = min(delay * 2, 30.0)
                continue
            self._camera_state = "up"
            self.counters.inc("camera_reconnects")
            logger.info("camera %s back up", self.source.name)
            self._publish_status("running", detail="camera reconnected")
            return True
        return False

    def _acquire(self) -> None:
        src, notifier = self.source, self.notifier
        wd_interval = notifier.watchdog_interval_s or 5.0
        last_wd = 0.0
        last_ready_check = 0.0
        while not self._stop.is_set():
            try:
                frame = src.read(timeout=0.5)
            except SourceExhausted:
                logger.info("source %s exhausted", src.name)
                break
            except CameraError as e:
                if not self._reconnect_camera(e):
                    break
                continue
            now = time.monotonic()
            # The watchdog is fed from here so a wedged acquisition stops feeding it.
            if now - last_wd >= wd_interval:
                notifier.watchdog()
                last_wd = now
            if now - last_ready_check >= 0.2:
                last_ready_check = now
                self._maybe_ready()
                fatal = getattr(self.publisher, "fatal_error", None)
                if fatal:
                    raise BrokerError(fatal)
            if frame is not None:
                self._enqueue(frame)

    def run(self) -> RunSummary:
        self._t_start = time.monotonic()
        self._publish_status("starting")
        for i in range(self.cfg.runtime.workers):
            self._threads.append(threading.Thread(target=self._worker, name=f"infer-{i}", daemon=True))
        self._threads.append(threading.Thread(target=self._snapshot_worker, name="snapshots", daemon=True))
        metrics = threading.Thread(target=self._metrics_worker, name="metrics", daemon=True)
        for t in self._threads:
            t.start()
        metrics.start()
        try:
            self._acquire()
        finally:
            self._drain()
            self._stop.set()
            metrics.join(timeout=5)
        return RunSummary(self.counters.snapshot(), self.stats.summary(), time.monotonic() - self._t_start)

    def _drain(self) -> None:
        """Finish every queued frame, then every queued snapshot: nothing accepted is lost."""
        self.notifier.stopping()
        workers = [t for t in self._threads if t.name.startswith("infer-")]
        for _ in workers:
            self._in_q.put(_STOP)
        for t in workers:
            t.join()
        self._snap_q.put(_STOP)
        for t in self._threads:
            t.join()
