"""The paho client the publisher drives, built from :class:`~linecam.config.MqttSettings`:
protocol, logging, queue bound, back-off, credentials and TLS files (a missing or unreadable
file is a :class:`~linecam.errors.ConfigError` naming the key). Callbacks and the Last Will
are the publisher's."""

from __future__ import annotations

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from linecam.config import MqttSettings
from linecam.errors import ConfigError
from linecam.paho_log import paho_logger

#: CONNACK reason codes that retrying cannot fix (MQTT 5 numbering; paho maps 3.1.1's onto it).
FATAL_CONNACK = {
    132: "the broker does not support this MQTT version: set mqtt.protocol to '3.1.1'",
    133: "the client id was rejected: set another mqtt.client_id",
    134: "check mqtt.username and the password (mqtt.password_file / mqtt.password_env)",
    135: "check mqtt.username, the password and the broker's ACLs",
    138: "this client is banned by the broker",
    140: "check the broker's authentication method",
}


def make_client(s: MqttSettings, default_client_id: str, logger_name: str) -> mqtt.Client:
    """A configured, unconnected paho client (``s.client_id`` or ``default_client_id``)."""
    client_id = s.client_id or default_client_id
    protocol = mqtt.MQTTv5 if s.protocol == "5" else mqtt.MQTTv311
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
    c.enable_logger(paho_logger(logger_name))
    c.max_queued_messages_set(s.max_queued)
    c.reconnect_delay_set(1, 30)
    if s.username:
        c.username_pw_set(s.username, s.read_password())
    if s.tls:
        for key in ("ca_file", "cert_file", "key_file"):
            p = getattr(s, key)
            if p is not None and not p.is_file():
                raise ConfigError(f"mqtt.{key} {p} does not exist: fix the path")
        try:
            c.tls_set(
                ca_certs=str(s.ca_file) if s.ca_file else None,
                certfile=str(s.cert_file) if s.cert_file else None,
                keyfile=str(s.key_file) if s.key_file else None,
            )
        except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
            raise ConfigError(f"cannot load the MQTT TLS files: {e}") from None
    return c
