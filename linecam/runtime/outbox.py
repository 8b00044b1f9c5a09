"""The outbox: the only code that turns inspections and skips into messages.

Every frame passes through exactly one of :meth:`Outbox.inspected` or :meth:`Outbox.skipped`,
which publish its one verdict and count it (``frames`` plus ``ok`` / ``ng`` / ``skipped``).
NG frames go on to the snapshot thread (annotated JPEG, then the ``defect`` event, then the
VLM's description request); in line-scan mode every tile's regions go to the line-scan
session. Status messages are built here too. The outbox talks to a :class:`Publisher`;
:attr:`Outbox.snapshot_sink` (a :class:`SnapshotSink`) also gets each defect whose JPEG was
written (``…/snapshot``, :mod:`linecam.runtime.prometheus`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from linecam import __version__, messages
from linecam.camera.frame import Frame
from linecam.preprocess import Geometry
from linecam.runtime.inspector import Inspection, Thresholds
from linecam.runtime.linescan.tiles import tile_fields
from linecam.runtime.postprocess import Region
from linecam.runtime.snapshots import SnapshotWriter
from linecam.runtime.ratelog import RateLimitedLog
from linecam.runtime.stats import Counters, LatencyStats

if TYPE_CHECKING:
    from linecam.runtime.linescan.session import LineScanSession
    from linecam.runtime.spool import SpoolStats

logger = logging.getLogger(__name__)

_STOP = object()  # queue sentinel

#: The latency stages of an inspected frame's verdict, in the order they are recorded.
STAGES = ("queue", "preprocess", "inference", "postprocess", "total")


class Publisher(Protocol):
    """What the outbox needs of an MQTT publisher (:class:`~linecam.runtime.publisher.MqttPublisher`)."""

    on_spool_drop: Callable[[int, int], None] | None

    @property
    def connected(self) -> bool: ...

    @property
    def fatal_error(self) -> str | None: ...

    def publish(self, topic: str, msg: Mapping[str, Any], qos: int = 1, retain: bool = False) -> None: ...

    def publish_status(self, msg: Mapping[str, Any] | None = None, /, **fields: Any) -> None: ...

    def publish_bytes(self, topic: str, payload: bytes, *, content_type: str | None = None,
                      user_properties: Sequence[tuple[str, str]] = ()) -> bool: ...

    def spool_stats(self) -> SpoolStats | None: ...


class Describer(Protocol):
    """The VLM description worker (:class:`~linecam.runtime.vlm.worker.DescriptionWorker`) as the
    outbox (``submit``) and the daemon (``counters`` and ``backlog_depth`` in metrics, ``stop`` at
    the end) use it."""

    @property
    def counters(self) -> dict[str, int]: ...

    def submit(self, image: np.ndarray, regions: Any, defect_event_id: str, *, frame_id: int,
               verdict_event_id: str | None = None, threshold: float = 1.0, bit_depth: int = 8,
               anomaly_map: np.ndarray | None = None, geometry: Any = None) -> bool: ...

    @property
    def backlog_depth(self) -> int: ...

    def stop(self, drain: bool = True, timeout: float | None = None) -> None: ...


class SnapshotSink(Protocol):
    """Called after a defect event went out with its annotated JPEG's path and the defect
    message (:class:`~linecam.runtime.prometheus.SnapshotPublisher`: the JPEG on ``…/snapshot``).
    Runs on the snapshot thread; must not block."""

    def __call__(self, path: str, defect: Mapping[str, Any]) -> None: ...


def snapshot_name(camera: str, frame_id: int, verdict_event_id: str) -> str:
    """A snapshot's file name: frame ids restart at 0 in every process, so the verdict's event
    id (a UUID) makes it unique across restarts; a defect re-sent from the spool after a
    restart never points at a picture of another frame."""
    return f"{camera}_{frame_id:09d}_{verdict_event_id.replace('-', '')[:12]}"


@dataclass(slots=True)
class _NgWork:
    frame: Frame
    anomaly_map: np.ndarray
    geometry: Geometry
    regions: list[Region]
    score_raw: float
    verdict_event_id: str


class Outbox:
    """Messages out for one camera; owns the counters, the latency window and the snapshot thread."""

    def __init__(self, *, line: str, camera: str, topics: messages.Topics, publisher: Publisher,
                 thresholds: Thresholds, model_info: Mapping[str, Any], snapshots: SnapshotWriter | None,
                 snapshot_queue_size: int, copy_maps: bool = False, describer: Describer | None = None,
                 log: RateLimitedLog | None = None) -> None:
        self.line, self.camera = line, camera
        self.topics = topics
        self.publisher = publisher
        self.thresholds = thresholds
        self.model_info = dict(model_info)
        self.describer = describer
        self.counters = Counters()
        self.stats = LatencyStats(stages=STAGES)
        self.log = log or RateLimitedLog(logger)
        #: Line-scan mode: the session that merges tile regions into web defects.
        self.linescan: LineScanSession | None = None
        #: Set by acquisition: "up" or "down", carried in every status.
        self.camera_state = "up"
        #: Optional: each written snapshot with its defect message (output.publish_snapshots).
        self.snapshot_sink: SnapshotSink | None = None
        self._snapshots = snapshots
        #: The runner reuses its output buffer: NG maps must be copied before the next frame.
        self._copy_maps = copy_maps
        self._snap_q: queue.Queue = queue.Queue(maxsize=snapshot_queue_size)
        self._snap_thread: threading.Thread | None = None
        self._t_start = time.monotonic()
        self._common = {"line": line, "camera": camera}

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._t_start = time.monotonic()
        self._snap_thread = threading.Thread(target=self._snapshot_worker, name="snapshots", daemon=True)
        self._snap_thread.start()

    def drain(self) -> None:
        """Finish every queued snapshot (and its defect event); call after the workers stopped."""
        if self._snap_thread is not None:
            self._snap_q.put(_STOP)
            self._snap_thread.join()

    @property
    def snapshot_queue_depth(self) -> int:
        return self._snap_q.qsize()

    # -- verdicts --------------------------------------------------------------------------
    def inspected(self, frame: Frame, ins: Inspection) -> None:
        """The verdict of an inspected frame (a model output that failed its checks: SKIPPED)."""
        if ins.verdict is None:  # never a verdict from a model output that failed its checks
            self.counters.inc("invalid_output")
            logger.error("frame %d: model output has NaN/Inf; frame skipped", frame.frame_id)
            self.skipped(frame, "invalid_model_output")
            return
        thr = self.thresholds.image
        try:
            host_ns = frame.host_ns
            end = time.monotonic_ns()
            lat = ((ins.t0_ns - host_ns) / 1e6, (ins.t1_ns - ins.t0_ns) / 1e6, (ins.t2_ns - ins.t1_ns) / 1e6,
                   (ins.t3_ns - ins.t2_ns) / 1e6, (end - host_ns) / 1e6)
            self.stats.add_all(STAGES, lat)
            msg = messages.verdict(**self._common, frame_id=frame.frame_id, verdict=ins.verdict,
                                   score=ins.score_raw / thr, score_raw=ins.score_raw, threshold=thr,
                                   frame_ts_ns=frame.timestamp_ns, frame_clock=frame.clock,
                                   frame_mono_ns=host_ns, latency_ms=dict(zip(STAGES, (round(v, 3) for v in lat))),
                                   model=self.model_info, n_regions=len(ins.regions), tile=tile_fields(frame),
                                   source=frame.meta if frame.meta and "path" in frame.meta else None)
            self.publisher.publish(self.topics.verdict, msg, qos=1)
        except Exception:  # a bug must not kill the worker silently: count, log, go on
            self.counters.inc("errors")
            logger.exception("frame %d: processing failed", frame.frame_id)
            self.skipped(frame, "processing_error")
            return
        ng = ins.verdict == "NG"
        self.counters.inc_all(("ng" if ng else "ok", "frames"))
        self._tile_done(frame, ins.regions, msg["event_id"])
        if ng:
            amap = ins.anomaly_map.copy() if self._copy_maps else ins.anomaly_map
            work = _NgWork(frame, amap, ins.geometry, ins.regions, ins.score_raw, msg["event_id"])
            try:
                self._snap_q.put_nowait(work)
            except queue.Full:
                # The defect event is never dropped; only its picture is.
                self.counters.inc("snapshots_skipped")
                self._publish_defect(work, snapshot=None)

    def skipped(self, frame: Frame, reason: str) -> None:
        """A ``SKIPPED`` verdict (the frame was not inspected, or no verdict could be derived)."""
        self.counters.inc_all(("skipped", "frames"))
        total = (time.monotonic_ns() - frame.host_ns) / 1e6
        msg = messages.verdict(**self._common, frame_id=frame.frame_id, verdict="SKIPPED", score=None,
                               score_raw=None, threshold=self.thresholds.image, frame_ts_ns=frame.timestamp_ns,
                               frame_clock=frame.clock, frame_mono_ns=frame.host_ns,
                               latency_ms={"total": round(total, 3)}, model=self.model_info, reason=reason,
                               tile=tile_fields(frame),
                               source=frame.meta if frame.meta and "path" in frame.meta else None)
        self.publisher.publish(self.topics.verdict, msg, qos=1)
        self._tile_done(frame, [], msg["event_id"], inspected=False)

    def _tile_done(self, frame: Frame, regions: list[Region], verdict_event_id: str, inspected: bool = True) -> None:
        """Line-scan mode: a tile's verdict went out; its regions feed the web defects."""
        if self.linescan is None:
            return
        try:
            self.linescan.tile_done(frame, regions, verdict_event_id, inspected)
        except Exception:  # never a second verdict for the tile: count, log, go on
            self.counters.inc("errors")
            logger.exception("tile %d: web aggregation failed", frame.frame_id)

    def publish_linescan(self, kind: str, msg: Mapping[str, Any]) -> None:
        """A line-scan session's ``web_defect`` / ``web_gap`` event."""
        self.publisher.publish(getattr(self.topics, kind), msg, qos=1)

    # -- NG frames: snapshot, defect, description -----------------------------------------
    def _publish_defect(self, work: _NgWork, snapshot: str | None) -> None:
        f = work.frame
        thr = self.thresholds.image
        msg = messages.defect(**self._common, frame_id=f.frame_id, verdict_event_id=work.verdict_event_id,
                              score=work.score_raw / thr, image_size=(f.width, f.height),
                              regions=[r.to_dict(thr) for r in work.regions],
                              snapshot=snapshot, frame_ts_ns=f.timestamp_ns, frame_clock=f.clock,
                              model=self.model_info)
        self.publisher.publish(self.topics.defect, msg, qos=1)
        if snapshot is not None and self.snapshot_sink is not None:
            try:
                self.snapshot_sink(snapshot, msg)
            except Exception:  # a viewer's copy must never cost the description
                self.counters.inc("snapshot_errors")
                logger.exception("frame %d: publishing the snapshot failed", f.frame_id)
        if self.describer is not None:
            # Never blocks: the worker copies a crop and queues it (or publishes a skip).
            self.describer.submit(f.image, work.regions, msg["event_id"], frame_id=f.frame_id,
                                  verdict_event_id=work.verdict_event_id, threshold=thr, bit_depth=f.bit_depth,
                                  anomaly_map=work.anomaly_map, geometry=work.geometry)

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
                                                     name=snapshot_name(self.camera, work.frame.frame_id,
                                                                        work.verdict_event_id),
                                                     pixel_threshold=self.thresholds.pixel))
                except Exception as e:  # disk full etc.: the event still goes out
                    self.counters.inc("snapshot_errors")
                    logger.warning("snapshot for frame %d not written: %s", work.frame.frame_id, e)
            self._publish_defect(work, path)

    # -- status ----------------------------------------------------------------------------
    def status_counts(self) -> dict[str, Any]:
        """The counts every status carries, as of now: frames, NG, dropped (skipped) and the mean
        frame rate since start (also what the final ``stopped`` status says)."""
        c = self.counters.snapshot()
        elapsed = max(time.monotonic() - self._t_start, 1e-6)
        return dict(fps=round(c.get("frames", 0) / elapsed, 2), frames=c.get("frames", 0), ng=c.get("ng", 0),
                    dropped=c.get("skipped", 0))

    def status(self, state: str, detail: str | None = None) -> None:
        msg = messages.status(**self._common, online=True, state=state, camera_state=self.camera_state,
                              detail=detail, **self.status_counts(), version=__version__, model=self.model_info)
        self.publisher.publish_status(msg)

    def on_spool_drop(self, n: int, total: int) -> None:
        """The full spool dropped its oldest unsent messages (called from the spool thread)."""
        self.counters.set("spool_dropped", total)
        if self.log.warn("spool_drop_status", 10.0, "spool full: %d oldest unsent message(s) dropped (%d in total)",
                         n, total):
            self.status("degraded", detail=f"spool full: dropped the {n} oldest unsent message(s), "
                                           f"{total} in total; raise spool.max_rows / spool.max_mb")
