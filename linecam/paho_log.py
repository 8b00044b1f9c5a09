"""paho-mqtt's logger with its known-benign noise filtered out (publisher and subscriber)."""

from __future__ import annotations

import logging


def _not_paho_noise(record: logging.LogRecord) -> bool:
    # paho 2.2 logs this at ERROR when its network loop runs once more after a (clean or
    # lost) disconnect; its own reconnect logic handles that case, so it is noise.
    return not record.getMessage().startswith("Client is not connected")


def paho_logger(name: str) -> logging.Logger:
    """The logger to hand to paho's ``enable_logger`` (its known-benign noise filtered out)."""
    log = logging.getLogger(name)
    log.addFilter(_not_paho_noise)  # idempotent: the same function is added once
    return log
