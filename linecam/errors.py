"""One exception family for everything a user can cause.

Each message is one line that says what is wrong *and what to do*; the CLI prints
it as ``error: <message>`` without a traceback and exits non-zero.
"""

from __future__ import annotations


class LinecamError(Exception):
    """Base class: a user-facing, one-line error."""

    exit_code = 1


class ConfigError(LinecamError):
    """The YAML config is malformed or has a wrong / unknown key."""

    exit_code = 2


class BundleError(LinecamError):
    """A model bundle is missing, corrupt, from a newer schema, or fails its checks."""

    exit_code = 3


class CameraError(LinecamError):
    """The frame source cannot be opened, or failed while acquiring."""

    exit_code = 4


class BrokerError(LinecamError):
    """The MQTT broker refused us (authentication, TLS), as opposed to merely being down."""

    exit_code = 5
