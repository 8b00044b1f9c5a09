"""The metrics thread: every ``runtime.metrics_interval_s`` one ``metrics`` message (counters,
fps, latency percentiles per stage, queue depths, process RSS / CPU / threads / fds) and a
systemd ``STATUS=`` line."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from linecam import messages
from linecam.runtime.outbox import Outbox
from linecam.runtime.sdnotify import Notifier

logger = logging.getLogger(__name__)


class MetricsReporter:
    """Publishes metrics until ``stop`` is set. ``queue_depths()`` -> ``{queue: depth}``;
    ``extra_counters()`` -> more counters (the VLM worker's), or None."""

    def __init__(self, outbox: Outbox, notifier: Notifier, interval_s: float, stop: threading.Event,
                 queue_depths: Callable[[], dict[str, int]],
                 extra_counters: Callable[[], dict[str, int]] | None = None) -> None:
        self.outbox = outbox
        self.notifier = notifier
        self.interval_s = interval_s
        self._stop = stop
        self._queue_depths = queue_depths
        self._extra = extra_counters
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="metrics", daemon=True)
        self._thread.start()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    def _run(self) -> None:
        import psutil

        out = self.outbox
        proc = psutil.Process()
        interval = self.interval_s
        last_frames, last_t = 0, time.monotonic()
        while not self._stop.wait(interval):
            c: dict[str, Any] = out.counters.snapshot()
            if self._extra is not None:
                c.update(self._extra())
            now = time.monotonic()
            fps = (c.get("frames", 0) - last_frames) / max(now - last_t, 1e-6)
            last_frames, last_t = c.get("frames", 0), now
            try:
                fds = proc.num_fds()
            except Exception:  # not on every OS
                fds = -1
            spool = out.publisher.spool_stats()
            if spool is not None:
                c.update(spool_rows=spool.rows, spool_dropped=spool.dropped, spool_resent=spool.resent,
                         spool_rejected=spool.rejected, spool_errors=spool.errors)
            msg = messages.metrics(line=out.line, camera=out.camera, interval_s=interval, counters=c,
                                   fps=round(fps, 2), latency_ms=out.stats.summary(),
                                   queue_depth=self._queue_depths(),
                                   process={"rss_mb": round(proc.memory_info().rss / 1e6, 1),
                                            "cpu_percent": proc.cpu_percent(), "threads": proc.num_threads(),
                                            "fds": fds})
            out.publisher.publish(out.topics.metrics, msg, qos=0)
            self.notifier.status(f"{fps:.1f} fps, {c.get('frames', 0)} frames, {c.get('ng', 0)} NG, "
                                 f"{c.get('skipped', 0)} skipped, camera {out.camera_state}")


class ProgressLog:
    """Every ``every_s`` one log line while running: fps since the last line, OK / NG / skipped
    (and tiles not inspected in line-scan mode), the broker's state and how long it has been down,
    the spool's backlog. INFO while all is well; WARNING with the broker down or frames skipped."""

    def __init__(self, outbox: Outbox, every_s: float, stop: threading.Event) -> None:
        self.outbox = outbox
        self.every_s = every_s
        self._stop = stop
        self._thread: threading.Thread | None = None
        self._down_since: float | None = None
        self._last = (0, 0, time.monotonic())  # frames, skipped, when

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="progress-log", daemon=True)
        self._thread.start()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    def _run(self) -> None:
        due = time.monotonic() + self.every_s
        while not self._stop.wait(min(1.0, self.every_s)):
            self._watch_broker()
            if time.monotonic() >= due:
                due += self.every_s
                self.log_line()

    def _watch_broker(self) -> None:
        up = self.outbox.publisher.connected
        if not up and self._down_since is None:
            self._down_since = time.monotonic()
        elif up:
            self._down_since = None

    def line(self) -> tuple[int, str]:
        """(level, text) of the progress line now."""
        out = self.outbox
        c = out.counters.snapshot()
        frames, skipped, now = c.get("frames", 0), c.get("skipped", 0), time.monotonic()
        f0, s0, t0 = self._last
        self._last = (frames, skipped, now)
        fps = (frames - f0) / max(now - t0, 1e-6)
        where = getattr(out.publisher, "address", "broker")
        if self._down_since is None:
            broker = f"broker {where} connected"
        else:
            broker = f"broker {where} DOWN for {now - self._down_since:.0f} s"
        spool = out.publisher.spool_stats()
        backlog = f", spool {spool.rows} unsent" if spool is not None and spool.rows else ""
        tiles = c.get("web_tiles_skipped", 0)
        web = f", {tiles} tiles not inspected" if tiles else ""
        text = (f"running: {fps:.1f} fps | {frames} frames: OK {c.get('ok', 0)}, NG {c.get('ng', 0)}, "
                f"skipped {skipped} (+{skipped - s0}){web} | {broker}{backlog} | camera {out.camera_state}")
        bad = self._down_since is not None or skipped > s0 or out.camera_state != "up"
        return (logging.WARNING if bad else logging.INFO), text

    def log_line(self) -> None:
        self._watch_broker()
        level, text = self.line()
        logger.log(level, "%s", text)
