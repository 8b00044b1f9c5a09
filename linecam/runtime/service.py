"""Start-up and shut-down around :class:`~linecam.runtime.daemon.Daemon` (``linecam run``).

Order matters: the bundle is verified before anything else (never run a model that
failed its checks), the camera is opened before signal handlers are installed (a
camera that is merely absent or busy at start is retried by the daemon, see
``CameraUnavailable``), and the broker may be
down at start: the publisher keeps retrying while frames are already inspected, and
QoS 1 messages wait in the durable spool (``spool:``; leftovers of a previous run are
sent first).
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Callable

import cv2

from linecam import __version__, messages
from linecam.bundle import load_bundle
from linecam.config import LinecamConfig
from linecam.errors import CameraError
from linecam.runtime.backends import make_runner
from linecam.runtime.daemon import Daemon, RunSummary
from linecam.runtime.sources import open_source
from linecam.runtime.publisher import MqttPublisher
from linecam.runtime.prometheus import attach as attach_station_hooks
from linecam.runtime.sdnotify import Notifier

logger = logging.getLogger(__name__)


def make_describer(cfg: LinecamConfig, publish: Callable[[dict], None]):
    """The VLM description worker the config asks for (None without ``vlm.bundle``).

    The bundle is verified here, before the camera opens; the engine itself is built in
    the worker's thread after it lowered its CPU priority (``vlm.nice``)."""
    v = cfg.vlm
    if v.bundle is None:
        return None
    from linecam.runtime.vlm.bundle import load_vlm_bundle
    from linecam.runtime.vlm.engine import VlmEngine
    from linecam.runtime.vlm.prompt import PromptConfig, RegionPromptBuilder
    from linecam.runtime.vlm.worker import DescriptionWorker

    vb = load_vlm_bundle(v.bundle)
    prompt = {k: val for k, val in (("template", v.template), ("region_template", v.region_template))
              if val is not None}
    builder = RegionPromptBuilder(PromptConfig(margin=v.crop_margin, **prompt))
    return DescriptionWorker(
        lambda: VlmEngine(vb, precision=v.precision, device=v.device, intra_op_threads=v.intra_op_threads),
        publish, line=cfg.line, camera=cfg.camera_id, prompt_builder=builder, backlog=v.backlog,
        policy=v.policy, max_new_tokens=v.max_new_tokens, nice=v.nice,
        model_info={"name": vb.manifest.name, "sha256": vb.model_sha256, "file": f"vlm_{v.precision}"},
        projector=_projector_factory(vb, v))


def _projector_factory(vb, v):
    """Region-token injection when the VLM bundle has a region projector (else prompt-only grounding).
    Checked here, before the camera opens; the session is built in the worker's thread."""
    from linecam.runtime.vlm.region_tokens import ProjectorInfo, RegionProjector, projector_roles

    if ProjectorInfo.of(vb.manifest.extra) is None or not projector_roles(vb):
        logger.info("VLM bundle %s has no region projector: prompt-only grounding", vb.root)
        return None
    # Built once here only to check it (a projector that does not fit fails the start, with one
    # line), and again in the worker's thread after its nice(): ONNX Runtime's pool threads
    # inherit the priority of the thread that creates the session.
    RegionProjector(vb, v.precision)
    logger.info("VLM bundle %s: region-token injection (%s)", vb.root, ", ".join(projector_roles(vb)))
    return lambda: RegionProjector(vb, v.precision)


def plaintext_password_warning(cfg: LinecamConfig) -> str | None:
    """One line when the MQTT password would cross the network unencrypted (no TLS)."""
    m = cfg.mqtt
    if m.tls or (m.password_file is None and m.password_env is None):
        return None
    return (f"mqtt: the password of user {m.username!r} goes to {m.host}:{m.port} over plain TCP (no TLS): "
            "anyone on the network can read it; set mqtt.tls: true (port 8883)")


def run_service(cfg: LinecamConfig, on_daemon: Callable[[Daemon], None] | None = None) -> RunSummary:
    # OpenCV's thread count is process-wide: set it for the daemon's life, give it back after
    # (tests and the bench run several services in one process, one after another; services
    # running at the same time in one process would restore each other's setting out of order).
    cv_threads = cv2.getNumThreads()
    if cfg.runtime.opencv_threads is not None:
        cv2.setNumThreads(cfg.runtime.opencv_threads)
    try:
        return _run_service(cfg, on_daemon)
    finally:
        cv2.setNumThreads(cv_threads)


def _run_service(cfg: LinecamConfig, on_daemon: Callable[[Daemon], None] | None) -> RunSummary:
    if (why := plaintext_password_warning(cfg)) is not None:
        logger.warning(why)
    bundle = load_bundle(cfg.model.bundle)
    runner = make_runner(bundle, cfg.model.backend, cfg.model.precision, cfg.model.intra_op_threads,
                         workers=cfg.runtime.workers, cuda_graph=cfg.model.cuda_graph)
    topics = messages.topics(cfg.mqtt.topic_prefix or messages.default_prefix(cfg.line, cfg.camera_id))
    publisher: MqttPublisher | None = None
    describer = make_describer(cfg, lambda m: publisher.publish(topics.description, m, qos=1))
    source = open_source(cfg.camera)
    camera_fault = None
    daemon: Daemon | None = None
    try:
        source.open()
    except CameraError as e:
        if not getattr(e, "transient", False):  # no .cti, a setting the camera refuses ...
            raise
        # Absent or busy right now (powered up after this PC, still booting): the daemon
        # starts with camera_state down and keeps trying, rather than exiting into a restart loop.
        camera_fault = str(e)
        logger.error("camera not available at start: %s; retrying", e)
    try:
        model = {"name": bundle.manifest.name, "sha256": bundle.model_sha256, "file": runner.role}
        publisher = MqttPublisher(cfg.mqtt, cfg.line, cfg.camera_id, __version__, model,
                                  spool=cfg.spool_settings(), status_on_connect=False)
        publisher.start()
        if describer is not None:
            describer.start(wait_ready=True)  # raises if the VLM cannot load: before any verdict
        daemon = Daemon(cfg, source, bundle, runner, publisher, Notifier.from_env(), describer=describer)
        daemon.initial_camera_fault = camera_fault
        if threading.current_thread() is threading.main_thread():
            def _on_signal(signum: int, _frame: object) -> None:
                logger.info("%s received: draining queues and stopping", signal.Signals(signum).name)
                daemon.request_stop()

            signal.signal(signal.SIGTERM, _on_signal)
            signal.signal(signal.SIGINT, _on_signal)
        detach = attach_station_hooks(cfg, daemon)  # /metrics and …/snapshot, when configured
        try:
            if on_daemon is not None:
                on_daemon(daemon)
            summary = daemon.run()
        finally:
            detach()
    finally:
        try:
            source.close()
        except Exception:
            logger.debug("source close failed", exc_info=True)
        if describer is not None:  # idempotent: the daemon's drain normally stopped it already
            describer.stop(drain=False, timeout=10)
        if publisher is not None:  # the final status carries the run's counts, not the last status's
            publisher.stop(final=daemon.outbox.status_counts() if daemon is not None else None)
        runner.close()  # device buffers / streams of GPU backends
    assert publisher is not None  # set before daemon.run(), which is the only way here
    # The spool writes (and, when full, drops) on its own thread: the messages of the last frames
    # may meet it after the daemon's counters were taken. Its figures after stop() are final.
    spool = publisher.spool_stats()
    if spool is not None and spool.dropped:
        summary.counters["spool_dropped"] = spool.dropped
    c = summary.counters
    rest = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in sorted(c.items())
                     if v and k not in ("frames", "ok", "ng", "skipped"))
    logger.info("stopped after %.1f s: %d frames (OK %d, NG %d, skipped %d)%s", summary.seconds, c.get("frames", 0),
                c.get("ok", 0), c.get("ng", 0), c.get("skipped", 0), f"; {rest}" if rest else "")
    return summary
