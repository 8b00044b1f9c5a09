"""The acquisition stage: camera frames -> checked -> the bounded inference queue.

Runs on the main thread. Acquisition never waits for inference: when the queue is full a
frame is dropped by the configured policy and still gets a verdict (``SKIPPED``, reason
``queue_full``), so subscribers can count on exactly one verdict per frame. Frames the model
must not judge get ``SKIPPED`` too (:mod:`linecam.runtime.framecheck`). In line-scan mode the
:class:`~linecam.runtime.linescan.LineScanSession` is an adapter in front of the queue:
frames go in, the tiles they complete come out and are queued instead.

Camera faults (a GenTL error, or a free-running camera silent for ``runtime.frame_timeout_s``):
the source is torn down and reopened with back-off; the retained status says
``camera_state: down`` meanwhile and ``up`` after.

systemd watchdog: ``WATCHDOG=1`` is sent from this loop only, after a camera call
*returned*: a frame, a short wait within ``frame_timeout_s`` (or any wait for a triggered
camera, ``frame_timeout_s: null``: an idle line is not a fault), or a reopen attempt. So a
call that never returns (a wedged GenTL producer, a stuck driver) stops the keep-alives and
systemd restarts the process, while an unplugged camera does not: a restart cannot plug it
back in, and a restart loop would end in systemd's start limit, leaving the unit failed
when the camera returns. A producer that reopens fine but never delivers
(``max_silent_reopens`` times in a row) makes linecam exit with code 4 so that systemd
restarts it in a fresh process. An inference worker stuck on one frame for
``runtime.inference_timeout_s`` also stops the keep-alives.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence

from linecam.camera.base import FrameSource, SourceExhausted
from linecam.camera.frame import Frame
from linecam.config import MqttSettings, RuntimeConfig
from linecam.errors import BrokerError, CameraError
from linecam.runtime.framecheck import FrameCheck
from linecam.runtime.linescan.coverage import queue_size_for
from linecam.runtime.linescan.session import LineScanSession
from linecam.runtime.outbox import Outbox
from linecam.runtime.sdnotify import Notifier

logger = logging.getLogger(__name__)


class Acquisition:
    """Reads ``source`` until stopped or exhausted and feeds ``in_q`` (see the module docstring).

    ``busy_since``: per inference worker, the monotonic time it took its current frame (0.0
    while idle), written by the workers, read by the watchdog check.
    """

    def __init__(self, source: FrameSource, rt: RuntimeConfig, mqtt: MqttSettings, outbox: Outbox,
                 in_q: queue.Queue, check: FrameCheck, notifier: Notifier, stop: threading.Event,
                 busy_since: Sequence[float], linescan: LineScanSession | None = None) -> None:
        self.source = source
        self.rt = rt
        self.mqtt = mqtt
        self.outbox = outbox
        self.in_q = in_q
        self.check = check
        self.notifier = notifier
        self._stop = stop
        self._busy_since = busy_since
        self.linescan = linescan
        #: Set when a finite source ended by itself.
        self.exhausted = False
        #: Set when the camera could not be opened at start (absent, busy): begin with a reconnect.
        self.initial_camera_fault: str | None = None
        self._ready_sent = False
        self._waiting_said = False
        self._stall_said = False
        self._queue_sized = False
        self._t_start = time.monotonic()
        self._wd_interval = 5.0
        self._last_wd = 0.0

    # -- frames into the queue ---------------------------------------------------------------
    def enqueue(self, frame: Frame) -> None:
        """Queue one frame for inspection, or publish its SKIPPED verdict (bad frame, queue full)."""
        out = self.outbox
        problem = self.check.problem(frame)
        if problem is not None:
            reason, why = problem
            n = out.counters.inc(f"skipped_{reason}")
            out.log.warn(reason, 10.0, "frame %d skipped (%s so far): %s", frame.frame_id, n, why)
            out.skipped(frame, reason)
            return
        q = self.in_q
        try:
            q.put_nowait(frame)
            return
        except queue.Full:
            pass
        if self.rt.drop_policy == "drop_newest":
            out.skipped(frame, "queue_full")
            return
        try:
            oldest = q.get_nowait()
        except queue.Empty:  # a worker took one meanwhile
            oldest = None
        if isinstance(oldest, Frame):
            out.skipped(oldest, "queue_full")
        try:
            q.put_nowait(frame)
        except queue.Full:  # pathological race: never block acquisition
            out.skipped(frame, "queue_full")

    def _accept(self, frame: Frame) -> None:
        """A camera frame: inspected as is, or (line-scan mode) cut into the tiles it completes."""
        if self.linescan is None:
            self.enqueue(frame)
            return
        tiles = self.linescan.push(frame)
        if not self._queue_sized:
            self._size_queue_for_tiles()
        for tile in tiles:
            self.enqueue(tile)

    def _size_queue_for_tiles(self) -> None:
        """Line-scan: one frame completes a whole batch of tiles at once, so the queue holds two
        frames' worth (``runtime.queue_size`` is sized for area cameras): tiles are dropped only
        when the model is really slower than the line rate, and that is reported (``coverage``)."""
        per_frame = self.linescan.tiles_per_frame if self.linescan is not None else None
        if per_frame is None:
            return
        self._queue_sized = True
        q = self.in_q
        size = queue_size_for(self.rt.queue_size, per_frame)
        with q.mutex:
            if q.maxsize <= 0 or size <= q.maxsize:
                return
            q.maxsize = size
            q.not_full.notify_all()
        logger.info("line-scan: inference queue holds %d tiles (%d per camera frame; runtime.queue_size %d is "
                    "for frames of an area camera)", size, per_frame, self.rt.queue_size)

    # -- readiness and watchdog --------------------------------------------------------------
    def _maybe_ready(self) -> None:
        """READY=1 once the camera delivers and the broker is connected (systemd semantics)."""
        if self._ready_sent:
            return
        if not self.outbox.publisher.connected:
            if not self._waiting_said and time.monotonic() - self._t_start > 2.0:
                self._waiting_said = True
                s = self.mqtt
                self.notifier.status(f"inspecting; waiting for broker {s.host}:{s.port} (verdicts held in memory)")
            return
        self._ready_sent = True
        self.notifier.ready(status=f"camera {self.source.name} up, broker connected")
        self.outbox.status("running")
        logger.info("running: camera %s up, broker connected", self.source.name)

    def feed_watchdog(self) -> None:
        now = time.monotonic()
        if now - self._last_wd < self._wd_interval:
            return
        timeout = self.rt.inference_timeout_s
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
                self.outbox.counters.inc("inference_stalls")
                self.outbox.status("degraded", detail=why)
            return
        if self._stall_said:
            self._stall_said = False
            logger.warning("inference moving again: watchdog keep-alives resumed")
            if self._ready_sent and self.outbox.camera_state == "up":  # a camera fault keeps its own "degraded"
                self.outbox.status("running")
        self.notifier.watchdog()
        self._last_wd = now

    def _check_broker(self) -> None:
        """Exit (code 5) once the broker refused us for good (login, TLS): also while the camera is down."""
        fatal = self.outbox.publisher.fatal_error
        if fatal:
            raise BrokerError(fatal)

    # -- camera faults -----------------------------------------------------------------------
    def _close_source(self) -> None:
        try:
            self.source.close()
        except Exception as e:  # a dead link may refuse a clean close: reopen anyway
            logger.warning("closing camera %s after a fault failed: %s", self.source.name, e)

    def _reconnect_camera(self, why: str) -> bool:
        """Camera fault: say so (status camera_state down), tear the source down and reopen
        it with back-off until it works (True) or we are asked to stop (False)."""
        name = self.source.name
        out = self.outbox
        out.camera_state = "down"
        out.counters.inc("camera_faults")
        logger.error("camera %s fault: %s; reconnecting", name, why)
        out.status("degraded", detail=f"camera down: {why}")
        self.notifier.status(f"camera {name} down ({why}); reconnecting")
        lo, hi = self.rt.reconnect_delay_s
        delay = lo
        while not self._stop.is_set():
            self._close_source()
            deadline = time.monotonic() + delay
            while (left := deadline - time.monotonic()) > 0:
                # Waiting is progress: keep systemd's watchdog fed (a restart cannot plug a cable in).
                self.feed_watchdog()
                self._check_broker()  # a refused login must not wait for the camera
                if self._stop.wait(min(left, self._wd_interval)):
                    return False
            try:
                self.source.open()
            except Exception as e:  # CameraError, or whatever a driver raises on a half-dead link
                self._check_broker()
                out.counters.inc("camera_reopen_failures")
                delay = min(delay * 2, hi)
                logger.warning("camera %s still down (%s); next try in %.1f s", name, e, delay)
                self.feed_watchdog()
                continue
            out.camera_state = "up"
            out.counters.inc("camera_reconnects")
            logger.info("camera %s back up", name)
            out.status("running", detail="camera reconnected")
            if self.linescan is not None:  # where the web is now is unknown: never stitch across
                for tile in self.linescan.interrupt("camera_reconnect"):
                    self.enqueue(tile)
            return True
        return False

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> None:
        """Acquire until stopped, exhausted or fatal; in line-scan mode, flush the web's tail."""
        self._t_start = time.monotonic()
        try:
            self._acquire_frames()
        finally:
            if self.linescan is not None:  # the web's tail; its last defects go out once those tiles are done
                for tile in self.linescan.finish():
                    self.enqueue(tile)

    def _acquire_frames(self) -> None:
        src = self.source
        rt = self.rt
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
                self.exhausted = True
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
            self.feed_watchdog()
            if now - last_ready_check >= 0.2:
                last_ready_check = now
                self._maybe_ready()
                self._check_broker()
            if frame is not None:
                self._accept(frame)
