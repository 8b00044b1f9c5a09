"""Prometheus ``/metrics`` for the line daemon (``metrics.prometheus_port``), and the optional
annotated-JPEG publication on ``…/snapshot`` (``output.publish_snapshots``).

Everything is read when Prometheus scrapes, from what the daemon already keeps: its
counters, queue depths (:meth:`~linecam.runtime.daemon.Daemon.queue_depths`), the
publisher's connection and spool, the VLM worker's counters and backlog, the outbox's
camera state. The stage latency histograms are bucket counts that the daemon's
:class:`~linecam.runtime.stats.LatencyStats` keeps in its one per-frame ``add_all`` call
under the lock it takes anyway (:meth:`~linecam.runtime.stats.LatencyStats.track_histogram`):
no prometheus-client call and no extra lock per frame (``linecam bench prometheus``
measures the cost).

Names follow the Prometheus conventions: ``linecam_`` namespace, ``_total`` counters,
``_seconds`` histograms, one registry per daemon, labels ``line`` and ``camera``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from linecam.config import LinecamConfig
from linecam.errors import ConfigError
from linecam.runtime.outbox import STAGES, Publisher
from linecam.runtime.stats import Counters

if TYPE_CHECKING:
    from linecam.runtime.daemon import Daemon

logger = logging.getLogger(__name__)

#: Stage latency buckets, seconds (a frame's stages run from tens of µs to ~100 ms on a CPU).
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

__all__ = ["BUCKETS", "STAGES", "DaemonCollector", "PrometheusExporter", "SnapshotPublisher", "attach"]


class DaemonCollector:
    """Read at scrape time from the daemon (its public accessors only)."""

    def __init__(self, daemon: Daemon, labels: Mapping[str, str]) -> None:
        self.d, self.labels = daemon, dict(labels)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
        from prometheus_client.utils import floatToGoString

        d, lk, lv = self.d, list(self.labels), list(self.labels.values())
        c = d.counters.snapshot()

        def counter(name: str, doc: str, value: float) -> Any:
            m = CounterMetricFamily(f"linecam_{name}", doc, labels=lk)
            m.add_metric(lv, value)
            return m

        def gauge(name: str, doc: str, value: float) -> Any:
            m = GaugeMetricFamily(f"linecam_{name}", doc, labels=lk)
            m.add_metric(lv, value)
            return m

        yield counter("frames", "Frames that got a verdict (every frame gets exactly one).", c.get("frames", 0))
        v = CounterMetricFamily("linecam_verdicts", "Verdicts published, by kind.", labels=[*lk, "verdict"])
        for kind, key in (("OK", "ok"), ("NG", "ng"), ("SKIPPED", "skipped")):
            v.add_metric([*lv, kind], c.get(key, 0))
        yield v
        s = CounterMetricFamily("linecam_skipped_frames", "SKIPPED verdicts by reason (queue_full = a drop).",
                                labels=[*lk, "reason"])
        skipped_known = 0
        for key, n in sorted(c.items()):
            if key.startswith("skipped_"):
                s.add_metric([*lv, key.removeprefix("skipped_")], n)
                skipped_known += n
        # queue_full / invalid_model_output / processing_error are not counted separately: the rest
        s.add_metric([*lv, "other"], max(c.get("skipped", 0) - skipped_known, 0))
        yield s
        yield counter("snapshots_skipped", "NG frames whose annotated JPEG was dropped (snapshot queue full).",
                      c.get("snapshots_skipped", 0))
        yield counter("errors", "Frames whose processing raised (bugs; see the log).", c.get("errors", 0))
        yield counter("camera_faults", "Camera faults (torn down and reopened).", c.get("camera_faults", 0))
        yield gauge("camera_up", "1 while the camera delivers, 0 while it is being reopened.",
                    1.0 if d.outbox.camera_state == "up" else 0.0)
        q = GaugeMetricFamily("linecam_queue_depth", "Items waiting, per queue.", labels=[*lk, "queue"])
        for name, depth in d.queue_depths().items():
            q.add_metric([*lv, name], depth)
        yield q
        h = HistogramMetricFamily("linecam_stage_latency_seconds", "Per-frame latency of each stage (total: frame "
                                  "ready on the host -> verdict published).", labels=[*lk, "stage"])
        for stage in STAGES:
            hist = d.stats.histogram(stage)
            if hist is not None:
                buckets, sum_ms = hist
                h.add_metric([*lv, stage], [(floatToGoString(le * 1e-3), n) for le, n in buckets], sum_ms * 1e-3)
        yield h
        pub = d.publisher
        spool = pub.spool_stats()
        if spool is not None:
            yield gauge("spool_depth", "Messages in the durable spool not yet acknowledged by the broker.", spool.rows)
            yield gauge("spool_bytes", "Bytes of the spool on disk.", spool.bytes)
            yield counter("spool_dropped", "Unsent messages the full spool dropped (oldest first).", spool.dropped)
            yield counter("spool_resent", "Messages re-sent from the spool after a reconnect or restart.",
                          spool.resent)
        yield gauge("broker_connected", "1 while connected to the MQTT broker.", 1.0 if pub.connected else 0.0)
        if d.describer is not None:
            yield gauge("vlm_backlog", "NG defects waiting for their VLM description.", d.describer.backlog_depth)
            vc = CounterMetricFamily("linecam_vlm_descriptions", "Description messages by outcome.",
                                     labels=[*lk, "outcome"])
            for k, n in d.describer.counters.items():
                vc.add_metric([*lv, k], n)
            yield vc


class PrometheusExporter:
    """``/metrics`` on ``bind:port`` (prometheus-client's own HTTP server thread) for one daemon."""

    def __init__(self, daemon: Daemon, port: int, bind: str = "0.0.0.0") -> None:
        try:
            from prometheus_client import CollectorRegistry, start_http_server
        except ImportError:
            raise ConfigError("metrics.prometheus_port needs prometheus-client: pip install 'linecam[station]'") from None
        cfg = daemon.cfg
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(DaemonCollector(daemon, {"line": cfg.line, "camera": cfg.camera_id}))
        daemon.stats.track_histogram([b * 1e3 for b in BUCKETS])  # the stats are in ms
        try:
            self._server, self._thread = start_http_server(port, addr=bind, registry=self.registry)
        except OSError as e:
            raise ConfigError(f"metrics.prometheus_port {port}: cannot listen on {bind}:{port} "
                              f"({e.strerror or e}): pick a free port") from None
        self.port: int = self._server.server_port
        logger.info("Prometheus metrics on http://%s:%d/metrics", bind, self.port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


# -- …/snapshot: the annotated JPEG over MQTT (Frigate's convention) --------------------------
class SnapshotPublisher:
    """An :class:`~linecam.runtime.outbox.SnapshotSink`: publishes a defect's annotated JPEG on
    ``<prefix>/snapshot``: QoS 0, not retained, at most ``max_bytes`` (bigger ones are not sent,
    counted), the defect's ids in MQTT 5 user properties (``defect_event_id``,
    ``verdict_event_id``, ``frame_id``), content type ``image/jpeg``."""

    def __init__(self, publisher: Publisher, prefix: str, max_bytes: int, counters: Counters) -> None:
        self.publisher, self.topic, self.max_bytes, self.counters = publisher, f"{prefix}/snapshot", max_bytes, counters

    def __call__(self, path: str, defect: Mapping[str, Any]) -> None:
        try:
            jpeg = Path(path).read_bytes()  # just written: in the page cache
        except OSError:
            return
        if len(jpeg) > self.max_bytes:
            self.counters.inc("snapshots_too_big")
            return
        props = [("defect_event_id", str(defect["event_id"])),
                 ("verdict_event_id", str(defect.get("verdict_event_id"))),
                 ("frame_id", str(defect.get("frame_id")))]
        if self.publisher.publish_bytes(self.topic, jpeg, content_type="image/jpeg", user_properties=props):
            self.counters.inc("snapshots_published")
        else:  # MQTT 3.1.1 (no user properties for the ids), broker away, or too big for paho
            self.counters.inc("snapshots_not_published")


def attach(cfg: LinecamConfig, daemon: Daemon) -> Callable[[], None]:
    """The station's hooks on a daemon, as the config asks: ``/metrics`` (``daemon.prometheus``)
    and ``…/snapshot`` (the outbox's snapshot sink). Returns a function that undoes them."""
    exporter = None
    if cfg.metrics.prometheus_port is not None:
        exporter = daemon.prometheus = PrometheusExporter(daemon, cfg.metrics.prometheus_port,
                                                          cfg.metrics.prometheus_bind)
    if cfg.output.publish_snapshots:
        daemon.outbox.snapshot_sink = SnapshotPublisher(daemon.publisher, daemon.topics.prefix,
                                                        int(cfg.output.snapshot_max_kb * 1024), daemon.counters)
    return exporter.close if exporter is not None else (lambda: None)
