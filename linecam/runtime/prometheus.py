"""Prometheus ``/metrics`` for the line daemon (``metrics.prometheus_port``), and the optional
annotated-JPEG publication on ``…/snapshot`` (``output.publish_snapshots``).

Almost everything is read when Prometheus scrapes, from what the daemon already counts
(its :class:`~linecam.runtime.stats.Counters`, queues, spool and VLM worker): no work per
frame. The one per-frame cost is the stage latency histograms: the daemon's
:class:`~linecam.runtime.stats.LatencyStats` is wrapped so that each ``add`` also observes
the stage's histogram (about a microsecond; measured in ``benchmarks/prometheus_cost.py``).

Names follow the Prometheus conventions: ``linecam_`` namespace, ``_total`` counters,
``_seconds`` histograms, one registry per daemon, labels ``line`` and ``camera``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from linecam.errors import ConfigError

logger = logging.getLogger(__name__)

#: Stage latency buckets, seconds (a frame's stages run from tens of µs to ~100 ms on a CPU).
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
STAGES = ("queue", "preprocess", "inference", "postprocess", "total")


class _TeeStats:
    """The daemon's LatencyStats, plus a histogram observation per sample (ms -> s)."""

    def __init__(self, inner: Any, children: dict[str, Any]) -> None:
        self._inner, self._children = inner, children

    def add(self, stage: str, ms: float) -> None:
        self._inner.add(stage, ms)
        h = self._children.get(stage)
        if h is not None:
            h.observe(ms * 1e-3)

    def __getattr__(self, name: str) -> Any:  # summary(), percentiles(), count() ...
        return getattr(self._inner, name)


class _DaemonCollector:
    """Read at scrape time from the daemon."""

    def __init__(self, daemon: Any, labels: dict[str, str]) -> None:
        self.d, self.labels = daemon, labels

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

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
                    1.0 if getattr(d, "_camera_state", "up") == "up" else 0.0)
        q = GaugeMetricFamily("linecam_queue_depth", "Items waiting, per queue.", labels=[*lk, "queue"])
        q.add_metric([*lv, "inference"], d._in_q.qsize())
        q.add_metric([*lv, "snapshots"], d._snap_q.qsize())
        yield q
        spool = getattr(d.publisher, "spool_stats", lambda: None)()
        if spool is not None:
            yield gauge("spool_depth", "Messages in the durable spool not yet acknowledged by the broker.", spool.rows)
            yield gauge("spool_bytes", "Bytes of the spool on disk.", spool.bytes)
            yield counter("spool_dropped", "Unsent messages the full spool dropped (oldest first).", spool.dropped)
            yield counter("spool_resent", "Messages re-sent from the spool after a reconnect or restart.",
                          spool.resent)
        yield gauge("broker_connected", "1 while connected to the MQTT broker.",
                    1.0 if getattr(d.publisher, "connected", False) else 0.0)
        if d.describer is not None:
            yield gauge("vlm_backlog", "NG defects waiting for their VLM description.", d.describer.backlog_depth())
            vc = CounterMetricFamily("linecam_vlm_descriptions", "Description messages by outcome.",
                                     labels=[*lk, "outcome"])
            for k, n in d.describer.counters.items():
                vc.add_metric([*lv, k], n)
            yield vc


class PrometheusExporter:
    """``/metrics`` on ``bind:port`` (prometheus-client's own HTTP server thread) for one daemon."""

    def __init__(self, daemon: Any, port: int, bind: str = "0.0.0.0") -> None:
        try:
            from prometheus_client import CollectorRegistry, Histogram, start_http_server
        except ImportError:
            raise ConfigError("metrics.prometheus_port needs prometheus-client: pip install 'linecam[station]'") from None
        cfg = daemon.cfg
        labels = {"line": cfg.line, "camera": cfg.camera_id}
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_DaemonCollector(daemon, labels))
        hist = Histogram("linecam_stage_latency_seconds", "Per-frame latency of each stage (total: frame ready "
                         "on the host -> verdict published).", [*labels, "stage"], buckets=BUCKETS,
                         registry=self.registry)
        children = {st: hist.labels(*labels.values(), st) for st in STAGES}
        daemon.stats = _TeeStats(daemon.stats, children)
        try:
            self._server, self._thread = start_http_server(port, addr=bind, registry=self.registry)
        except OSError as e:
            raise ConfigError(f"metrics.prometheus_port {port}: cannot listen on {bind}:{port} "
                              f"({e.strerror or e}): pick a free port") from None
        self.port = self._server.server_port
        logger.info("Prometheus metrics on http://%s:%d/metrics", bind, self.port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


# -- …/snapshot: the annotated JPEG over MQTT (Frigate's convention) --------------------------
class SnapshotPublisher:
    """Publishes a defect's annotated JPEG on ``<prefix>/snapshot``: QoS 0, not retained, at most
    ``max_bytes`` (bigger ones are not sent, counted), the defect's ids in MQTT 5 user properties
    (``defect_event_id``, ``verdict_event_id``, ``frame_id``), content type ``image/jpeg``."""

    def __init__(self, publisher: Any, prefix: str, max_bytes: int, counters: Any) -> None:
        self.publisher, self.topic, self.max_bytes, self.counters = publisher, f"{prefix}/snapshot", max_bytes, counters

    def __call__(self, path: str | None, defect: dict[str, Any]) -> None:
        if not path:
            return
        try:
            jpeg = Path(path).read_bytes()  # just written: in the page cache
        except OSError:
            return
        if len(jpeg) > self.max_bytes:
            self.counters.inc("snapshots_too_big")
            return
        client = getattr(self.publisher, "_client", None)
        if client is None or getattr(getattr(self.publisher, "settings", None), "protocol", "5") != "5":
            self.counters.inc("snapshots_not_published")  # MQTT 3.1.1 has no user properties for the ids
            return
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.PUBLISH)
        props.ContentType = "image/jpeg"
        props.UserProperty = [("defect_event_id", str(defect["event_id"])),
                              ("verdict_event_id", str(defect.get("verdict_event_id"))),
                              ("frame_id", str(defect.get("frame_id")))]
        try:
            client.publish(self.topic, jpeg, qos=0, retain=False, properties=props)
            self.counters.inc("snapshots_published")
        except ValueError:
            self.counters.inc("snapshots_too_big")


def attach(cfg: Any, daemon: Any) -> Any:
    """The station's hooks on a daemon, as the config asks: ``/metrics`` and ``…/snapshot``.
    Returns a function that undoes them (closes the HTTP server)."""
    exporter = None
    if cfg.metrics.prometheus_port is not None:
        exporter = PrometheusExporter(daemon, cfg.metrics.prometheus_port, cfg.metrics.prometheus_bind)
        daemon.prometheus = exporter
    if cfg.output.publish_snapshots:
        daemon.snapshot_publisher = SnapshotPublisher(daemon.publisher, daemon.topics.prefix,
                                                      int(cfg.output.snapshot_max_kb * 1024), daemon.counters)
    return exporter.close if exporter is not None else (lambda: None)
