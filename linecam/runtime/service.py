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

from linecam import __version__
from linecam.bundle import load_bundle
from linecam.config import LinecamConfig
from linecam.errors import CameraError
from linecam.runtime.backends import make_runner
from linecam.runtime.daemon import Daemon, RunSummary, open_source
from linecam.runtime.publisher import MqttPublisher
from linecam.runtime.sdnotify import Notifier

logger = logging.getLogger(__name__)


def run_service(cfg: LinecamConfig, on_daemon: Callable[[Daemon], None] | None = None) -> RunSummary:
    bundle = load_bundle(cfg.model.bundle)
    runner = make_runner(bundle, cfg.model.backend, cfg.model.precision, cfg.model.intra_op_threads)
    source = open_source(cfg.camera)
    camera_fault = None
    try:
        source.open()
    except CameraError as e:
        if not getattr(e, "transient", False):  # no .cti, a setting the camera refuses ...
            raise
        # Absent or busy right now (powered up after this PC, still booting): the daemon
        # starts with camera_state down and keeps trying, rather than exiting into a restart loop.
        camera_fault = str(e)
        logger.error("camera not available at start: %s; retrying", e)
    publisher = None
    try:
        model = {"name": bundle.manifest.name, "sha256": bundle.model_sha256, "file": runner.role}
        publisher = MqttPublisher(cfg.mqtt, cfg.line, cfg.camera_id, __version__, model,
                                  spool=cfg.spool_settings())
        publisher.start()
        daemon = Daemon(cfg, source, bundle, runner, publisher, Notifier.from_env())
        daemon.initial_camera_fault = camera_fault
        if threading.current_thread() is threading.main_thread():
            def _on_signal(signum: int, _frame: object) -> None:
                logger.info("%s received: draining queues and stopping", signal.Signals(signum).name)
                daemon.request_stop()

            signal.signal(signal.SIGTERM, _on_signal)
            signal.signal(signal.SIGINT, _on_signal)
        if on_daemon is not None:
            on_daemon(daemon)
        summary = daemon.run()
        logger.info("stopped after %.1f s: %s", summary.seconds, summary.counters)
        return summary
    finally:
        try:
            source.close()
        except Exception:
            logger.debug("source close failed", exc_info=True)
        if publisher is not None:
            publisher.stop()
