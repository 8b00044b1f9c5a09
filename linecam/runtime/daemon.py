"""The line daemon: frames in, one verdict per frame out over MQTT.

Threads and queues (see ARCHITECTURE.md)::

    acquisition (main thread) --in_q (bounded, drop policy)--> N inference workers
        workers --verdict--> MQTT (paho's own network thread)
        workers --NG frames, snap_q (bounded)--> snapshot thread --defect--> MQTT
    metrics thread --metrics, status, systemd STATUS=--> MQTT / systemd

Acquisition never waits for inference: when ``in_q`` is full a frame is dropped by
the configured policy and still gets a verdict (``SKIPPED``, reason ``queue_full``),
so subscribers can count on exactly one verdict per frame. Frames the model must not
judge (another size or pixel layout than the line's) get ``SKIPPED`` with reason
``wrong_frame_size`` / ``wrong_pixel_format``.

Camera faults (a GenTL error, or a free-running camera silent for
``runtime.frame_timeout_s``): the source is torn down and reopened with back-off; the
retained status says ``camera_state: down`` meanwhile and ``up`` after.

systemd watchdog: ``WATCHDOG=1`` is sent from the acquisition loop only, after a camera
call *returned*: a frame, a short wait within ``frame_timeout_s`` (or any wait for a
triggered camera, ``frame_timeout_s: null``: an idle line is not a fault), or a
reopen attempt. So a call that never returns (a wedged GenTL producer, a stuck driver)
stops the keep-alives and systemd restarts the process, while an unplugged camera
does not: a restart cannot plug it back in, and a restart loop would end in systemd's
start limit, leaving the unit failed when the camera returns. A producer that reopens
fine but never delivers (``max_silent_reopens`` times in a row) makes linecam exit with
code 4 so that systemd restarts it in a fresh process.
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
from linecam.runtime.web import LineScanSession, tile_fields

logger = logging.getLogger(__name__)

_STOP = object()  # queue sentinel


def open_source(cam: GenICamCamera | ReplayCamera | SyntheticCamera | Any) -> FrameSource:
    """Build (not open) the frame source a config section describes."""
    if cam.kind == "synthetic_web":
        from linecam.camera.linescan import SyntheticWebSource

        return SyntheticWebSource.from_config(cam)
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
                         features=cam.features, fetch_timeout=cam.fetch_timeout_s,
                         setup=cam.linescan.apply if cam.linescan is not None else None)


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

    #: Line-scan mode (``linescan.enabled``): frames -> tiles -> web defects; set by ``_acquire``.
    _web: LineScanSession | None = None
    #: Optional ``(snapshot path, defect message)`` callable: publishes the JPEG on …/snapshot
    #: (linecam.runtime.prometheus.attach sets it when output.publish_snapshots).
    snapshot_publisher: Any = None

    def __init__(self, cfg: LinecamConfig, source: FrameSource, bundle: Bundle, runner: Runner,
                 publisher: Any, notifier: Notifier | None = None, describer: Any | None = None) -> None:
        self.cfg = cfg
        self.source = source
        self.bundle = bundle
        self.runner = runner
        self.publisher = publisher
        self.notifier = notifier or Notifier.from_env()
        #: Optional VLM :class:`~linecam.runtime.vlm.worker.DescriptionWorker`, started by the caller.
        self.describer = describer
        #: Set when a finite source ended by itself: then pending descriptions are finished,
        #: while on SIGTERM they are published as skipped (bounded stop time).
        self._exhausted = False
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
        # The line's frame layout: size from the config or the first frame; layout
        # (channels, dtype, bit depth) from the first frame.
        fs = cfg.runtime.frame_size
        self._frame_size: tuple[int, int] | None = (int(fs[0]), int(fs[1])) if fs is not None else None
        self._frame_layout: tuple[int, str, int] | None = None
        self._last_ok: tuple | None = None  # (shape, dtype, bit depth) of the last frame that passed
        self._crop = man.preprocess.crop
        self._last_warn: dict[str, float] = {}
        self._warn_lock = threading.Lock()
        if hasattr(publisher, "on_spool_drop"):
            publisher.on_spool_drop = self._on_spool_drop
        self._ready_sent = False
        self._waiting_said = False
        self._t_start = time.monotonic()
        self._wd_interval = 5.0
        self._last_wd = 0.0
        #: Per worker: monotonic time it took its current frame, 0.0 while idle. One hung call
        #: (GPU, driver) never returns and silently takes that worker's share of capacity for
        #: good; the watchdog check below sees it even while the other workers keep the line going.
        self._busy_since = [0.0] * cfg.runtime.workers
        #: Set by the service when the camera could not be opened at start (absent, busy):
        #: acquisition then begins with a reconnect.
        self.initial_camera_fault: str | None = None
        self._stall_said = False

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
                               latency_ms={"total": round(total, 3)}, model=self.model_info, reason=reason,
                               tile=tile_fields(frame))
        self.publisher.publish(self.topics.verdict, msg, qos=1)
        self._tile_done(frame, [], msg["event_id"], inspected=False)

    def _warn(self, kind: str, every_s: float, fmt: str, *args: Any) -> bool:
        """Log at most once per ``every_s`` per kind (a bad camera setting hits every frame)."""
        now = time.monotonic()
        with self._warn_lock:
            if now - self._last_warn.get(kind, -1e18) < every_s:
                return False
            self._last_warn[kind] = now
        logger.warning(fmt, *args)
        return True

    def _on_spool_drop(self, n: int, total: int) -> None:
        """The full spool dropped its oldest unsent messages (called from the spool thread)."""
        self.counters.set("spool_dropped", total)
        if self._warn("spool_drop_status", 10.0, "spool full: %d oldest unsent message(s) dropped (%d in total)",
                      n, total):
            self._publish_status("degraded", detail=f"spool full: dropped the {n} oldest unsent message(s), "
                                                    f"{total} in total; raise spool.max_rows / spool.max_mb")

    def _publish_status(self, state: str, detail: str | None = None) -> None:
        c = self.counters.snapshot()
        elapsed = max(time.monotonic() - self._t_start, 1e-6)
        msg = messages.status(**self._common(), online=True, state=state, camera_state=self._camera_state,
                              detail=detail, fps=round(c.get("frames", 0) / elapsed, 2),
                              frames=c.get("frames", 0), ng=c.get("ng", 0), dropped=c.get("skipped", 0),
                              version=__version__, model=self.model_info)
        self.publisher.publish_status(msg)

    # -- threads -------------------------------------------------------------------------
    def _worker(self, slot: int = 0) -> None:
        pre = Preprocessor(self.bundle.manifest.preprocess)
        post = Postprocessor(self.pixel_threshold, self.image_threshold,
                             min_area_px=self.cfg.thresholds.min_region_area_px)
        runner, stats, counters, pub, topics = self.runner, self.stats, self.counters, self.publisher, self.topics
        busy = self._busy_since
        common = self._common()
        while True:
            frame = self._in_q.get()
            if frame is _STOP:
                return
            busy[slot] = time.monotonic()
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
                                       model=self.model_info, n_regions=len(regions), tile=tile_fields(frame))
                pub.publish(topics.verdict, msg, qos=1)
                self._tile_done(frame, regions, msg["event_id"])
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
                busy[slot] = 0.0

    def _publish_defect(self, work: _NgWork, snapshot: str | None) -> None:
        f = work.frame
        msg = messages.defect(**self._common(), frame_id=f.frame_id, verdict_event_id=work.verdict_event_id,
                              score=work.score_raw / self.image_threshold, image_size=(f.width, f.height),
                              regions=[r.to_dict(self.image_threshold) for r in work.regions],
                              snapshot=snapshot, frame_ts_ns=f.timestamp_ns, frame_clock=f.clock,
                              model=self.model_info)
        self.publisher.publish(self.topics.defect, msg, qos=1)
        if snapshot is not None and self.snapshot_publisher is not None:
            self.snapshot_publisher(snapshot, msg)
        if self.describer is not None:
            # Never blocks: the worker copies a crop and queues it (or publishes a skip).
            self.describer.submit(f.image, work.regions, msg["event_id"], frame_id=f.frame_id,
                                  verdict_event_id=work.verdict_event_id, threshold=self.image_threshold,
                                  bit_depth=f.bit_depth)

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
            if self.describer is not None:
                c.update({f"vlm_{k}": v for k, v in self.describer.counters.items()})
            now = time.monotonic()
            fps = (c.get("frames", 0) - last_frames) / max(now - last_t, 1e-6)
            last_frames, last_t = c.get("frames", 0), now
            try:
                fds = proc.num_fds()
            except Exception:  # not on every OS
                fds = -1
            spool = getattr(self.publisher, "spool_stats", lambda: None)()
            if spool is not None:
                c.update(spool_rows=spool.rows, spool_dropped=spool.dropped, spool_resent=spool.resent,
                         spool_rejected=spool.rejected, spool_errors=spool.errors)
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
    def _frame_problem(self, frame: Frame) -> tuple[str, str] | None:
        """(reason, one line) when the model must not judge this frame, else None."""
        invalid = frame.meta.get("invalid") if frame.meta else None
        if invalid:  # the source got a buffer it could not convert
            return "wrong_pixel_format", str(invalid)
        img = frame.image
        # Hot path: a frame exactly like the last accepted one needs no further checks.
        if (self._last_ok is not None and isinstance(img, np.ndarray)
                and (img.shape, img.dtype, frame.bit_depth) == self._last_ok):
            return None
        if (not isinstance(img, np.ndarray) or img.ndim != 3 or img.shape[2] not in (1, 3)
                or img.dtype not in (np.uint8, np.uint16) or not 1 <= frame.bit_depth <= img.dtype.itemsize * 8
                or (img.shape[2] == 3 and img.dtype != np.uint8) or 0 in img.shape):
            what = (f"{img.shape} {img.dtype}, bit_depth {frame.bit_depth}" if isinstance(img, np.ndarray)
                    else type(img).__name__)
            return "wrong_pixel_format", (f"image {what} is not (H, W, 1) uint8/uint16 or (H, W, 3) uint8: "
                                          "check the camera's pixel_format")
        layout = (int(img.shape[2]), str(img.dtype), int(frame.bit_depth))
        if self._frame_layout is None:
            self._frame_layout = layout
        elif layout != self._frame_layout:
            c, d, b = self._frame_layout
            return "wrong_pixel_format", (f"{img.shape[2]} channel(s) {img.dtype} {frame.bit_depth}-bit, but this "
                                          f"line started with {c} channel(s) {d} {b}-bit: was the camera's "
                                          "PixelFormat changed? restart linecam after a deliberate change")
        h, w = int(img.shape[0]), int(img.shape[1])
        if self._frame_size is None:
            self._frame_size = (w, h)
        if (w, h) != self._frame_size:
            ew, eh = self._frame_size
            return "wrong_frame_size", (f"{w}x{h}, but this line expects {ew}x{eh} (runtime.frame_size or the "
                                        "first frame): was the camera's ROI changed?")
        crop = self._crop
        if crop is not None and (crop.left + crop.width > w or crop.top + crop.height > h):
            return "wrong_frame_size", (f"{w}x{h} is too small for the bundle's crop {crop.width}x{crop.height} at "
                                        f"({crop.left}, {crop.top}): use the camera ROI the model was made for")
        self._last_ok = (img.shape, img.dtype, frame.bit_depth)
        return None

    def _enqueue(self, frame: Frame) -> None:
        problem = self._frame_problem(frame)
        if problem is not None:
            reason, why = problem
            n = self.counters.inc(f"skipped_{reason}")
            self._warn(reason, 10.0, "frame %d skipped (%s so far): %s", frame.frame_id, n, why)
            self._publish_skipped(frame, reason)
            self.counters.inc("frames")
            return
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

    def _feed_watchdog(self) -> None:
        now = time.monotonic()
        if now - self._last_wd < self._wd_interval:
            return
        timeout = self.cfg.runtime.inference_timeout_s
        # A hung call (GPU, driver) never gives its worker back, so a worker busy on one frame for
        # that long is the whole test: only a fresh process recovers. (Timing "no frame finished
        # while frames wait" instead misfires after an idle line, when the first frames of a new
        # batch sit queued for a moment.) Starve the watchdog so that systemd restarts us.
        stuck = [(i, now - t) for i, t in enumerate(self._busy_since) if t and now - t > timeout]
        if stuck:
            if not self._stall_said:
                self._stall_said = True
                why = (f"inference worker(s) {', '.join(f'infer-{i}' for i, _ in stuck)} stuck on one frame "
                       f"for {max(d for _, d in stuck):.0f} s (runtime.inference_timeout_s={timeout:g})")
                logger.error("%s: no more watchdog keep-alives, so that systemd restarts linecam", why)
                self.counters.inc("inference_stalls")
                self._publish_status("degraded", detail=why)
            return
        if self._stall_said:
            self._stall_said = False
            logger.warning("inference moving again: watchdog keep-alives resumed")
            if self._ready_sent and self._camera_state == "up":  # a camera fault keeps its own "degraded"
                self._publish_status("running")
        self.notifier.watchdog()
        self._last_wd = now

    def _close_source(self) -> None:
        try:
            self.source.close()
        except Exception as e:  # a dead link may refuse a clean close: reopen anyway
            logger.warning("closing camera %s after a fault failed: %s", self.source.name, e)

    def _reconnect_camera(self, why: str) -> bool:
        """Camera fault: say so (status camera_state down), tear the source down and reopen
        it with back-off until it works (True) or we are asked to stop (False)."""
        name = self.source.name
        self._camera_state = "down"
        self.counters.inc("camera_faults")
        logger.error("camera %s fault: %s; reconnecting", name, why)
        self._publish_status("degraded", detail=f"camera down: {why}")
        self.notifier.status(f"camera {name} down ({why}); reconnecting")
        lo, hi = self.cfg.runtime.reconnect_delay_s
        delay = lo
        while not self._stop.is_set():
            self._close_source()
            deadline = time.monotonic() + delay
            while (left := deadline - time.monotonic()) > 0:
                # Waiting is progress: keep systemd's watchdog fed (a restart cannot plug a cable in).
                self._feed_watchdog()
                if self._stop.wait(min(left, self._wd_interval)):
                    return False
            try:
                self.source.open()
            except Exception as e:  # CameraError, or whatever a driver raises on a half-dead link
                self.counters.inc("camera_reopen_failures")
                delay = min(delay * 2, hi)
                logger.warning("camera %s still down (%s); next try in %.1f s", name, e, delay)
                self._feed_watchdog()
                continue
            self._camera_state = "up"
            self.counters.inc("camera_reconnects")
            logger.info("camera %s back up", name)
            self._publish_status("running", detail="camera reconnected")
            if self._web is not None:  # where the web is now is unknown: never stitch across
                for tile in self._web.interrupt("camera_reconnect"):
                    self._enqueue(tile)
            return True
        return False

    # -- line-scan mode (linecam.runtime.web) --------------------------------------------
    def _start_linescan(self) -> LineScanSession | None:
        from linecam.config import state_dir
        from linecam.errors import ConfigError

        ls = self.cfg.linescan
        if not ls.enabled:
            return None
        if self._crop is not None:
            raise ConfigError("the model bundle crops its input, but line-scan tiles are cut to the model input: "
                              "use a bundle without preprocess.crop for linescan")
        h, w = self.bundle.manifest.preprocess.input_size
        topics = self.topics
        return LineScanSession(
            ls, ls.tile_size or (w, h), line=self.cfg.line, camera=self.cfg.camera_id,
            image_threshold=self.image_threshold, counters=self.counters, model=self.model_info,
            publish=lambda kind, msg: self.publisher.publish(getattr(topics, kind), msg, qos=1),
            on_gap=lambda detail: self._publish_status("running", detail=detail),
            map_dir=(ls.web_map.dir or state_dir() / "webmaps") if ls.web_map.enabled else None)

    def _tile_done(self, frame: Frame, regions: list[Region], verdict_event_id: str, inspected: bool = True) -> None:
        """Line-scan mode: a tile's verdict went out; its regions feed the web defects."""
        if self._web is None:
            return
        try:
            self._web.tile_done(frame, regions, verdict_event_id, inspected)
        except Exception:  # never a second verdict for the tile: count, log, go on
            self.counters.inc("errors")
            logger.exception("tile %d: web aggregation failed", frame.frame_id)

    def _accept(self, frame: Frame) -> None:
        """A camera frame: inspected as is, or (line-scan mode) cut into the tiles it completes."""
        if self._web is None:
            self._enqueue(frame)
            return
        for tile in self._web.push(frame):
            self._enqueue(tile)

    def _acquire(self) -> None:
        self._web = self._start_linescan()
        try:
            self._acquire_frames()
        finally:
            if self._web is not None:  # the web's tail; its last defects go out once those tiles are done
                for tile in self._web.finish():
                    self._enqueue(tile)

    def _acquire_frames(self) -> None:
        src = self.source
        rt = self.cfg.runtime
        frame_timeout = rt.frame_timeout_s
        self._wd_interval = self.notifier.watchdog_interval_s or 5.0
        self._last_wd = 0.0
        # A read may wait this long: never longer than one keep-alive interval.
        read_timeout = min(0.5, self._wd_interval)
        last_ready_check = 0.0
        last_frame = time.monotonic()  # of the last frame, or of the last (re)open
        silent_reopens = 0  # reopens in a row after which no frame came
        reopened = False
        if self.initial_camera_fault is not None:
            if not self._reconnect_camera(self.initial_camera_fault):
                return
            last_frame, reopened = time.monotonic(), True
        while not self._stop.is_set():
            try:
                frame = src.read(timeout=read_timeout)
            except SourceExhausted:
                logger.info("source %s exhausted", src.name)
                self._exhausted = True
                break
            except Exception as e:  # CameraError, or a driver's own exception on a dead link
                why = str(e) if isinstance(e, CameraError) else f"{type(e).__name__}: {e}"
                if not self._reconnect_camera(why):
                    break
                last_frame, reopened = time.monotonic(), True
                continue
            now = time.monotonic()
            if frame is not None:
                last_frame, silent_reopens, reopened = now, 0, False
            elif frame_timeout is not None and now - last_frame > frame_timeout:
                if reopened:
                    silent_reopens += 1
                    if silent_reopens >= rt.max_silent_reopens:
                        raise CameraError(
                            f"camera {src.name} was reopened {silent_reopens} times but delivers no frames "
                            "(GenTL producer soft-locked?): exiting so that systemd restarts linecam"
                        )
                if not self._reconnect_camera(f"no frame for {frame_timeout:g} s"):
                    break
                last_frame, reopened = time.monotonic(), True
                continue
            # The read returned (a frame, or a wait still within frame_timeout / a triggered
            # camera's idle line): the loop is not wedged.
            self._feed_watchdog()
            if now - last_ready_check >= 0.2:
                last_ready_check = now
                self._maybe_ready()
                fatal = getattr(self.publisher, "fatal_error", None)
                if fatal:
                    raise BrokerError(fatal)
            if frame is not None:
                self._accept(frame)

    def run(self) -> RunSummary:
        self._t_start = time.monotonic()
        self._publish_status("starting")
        for i in range(self.cfg.runtime.workers):
            self._threads.append(threading.Thread(target=self._worker, args=(i,), name=f"infer-{i}", daemon=True))
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
        if self.describer is not None:
            self.describer.stop(drain=self._exhausted)
