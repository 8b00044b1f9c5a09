"""The MQTT wire format: topic layout and JSON message builders (schema version 1).

Every message is a plain JSON object with these common fields::

    schema          "linecam.<type>"            (e.g. "linecam.verdict")
    schema_version  1                            (:data:`SCHEMA_VERSION`)
    type            "<type>"
    event_id        uuid4 string                 idempotency / dedupe key
    line, camera    the ids in the topic
    sent_at         RFC 3339 UTC, milliseconds   e.g. "2025-01-31T12:00:00.123Z"
    mono_ns         time.monotonic_ns() at build time (same-host end-to-end latency only)

Topics live under a prefix, by default ``linecam/<line>/<camera>``:

    verdict   QoS 1, not retained, exactly one per frame (OK / NG / SKIPPED)
    defect    QoS 1, not retained, one per NG frame (regions + snapshot path)
    status    QoS 1, RETAINED; the Last Will is a status with ``online: false``
    metrics   QoS 0, periodic
    description  QoS 1, not retained, one per defect (the VLM's text, joined on defect_event_id)
    web_defect   QoS 1, not retained, line-scan mode: one per defect on the web (mm positions)
    web_gap      QoS 1, not retained, line-scan mode: a stretch of web not inspected (frame-id gap)

The JSON Schemas in :mod:`linecam.schemas` are the contract; the builders here are
the only place that produces these dicts. They coerce numbers to plain ``int`` /
``float`` so numpy scalars from the pipeline serialise, and do nothing else on the
hot path (validation is for tests and subscribers).
"""

from __future__ import annotations

from linecam.messages.base import (SCHEMA_VERSION, CameraState, State, Topics, Verdict, default_prefix, restamp,
                                   to_json, topics, utc_now_rfc3339)
from linecam.messages.frame import defect, description, verdict
from linecam.messages.linescan import web_defect, web_gap
from linecam.messages.service import last_will, metrics, status

__all__ = ["SCHEMA_VERSION", "CameraState", "State", "Topics", "Verdict", "default_prefix", "defect", "description",
           "last_will", "metrics", "restamp", "status", "to_json", "topics", "utc_now_rfc3339", "verdict",
           "web_defect", "web_gap"]
