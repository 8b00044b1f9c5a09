"""JSON Schemas (draft 2020-12) of the MQTT messages: the published contract.

Each schema is self-contained (its shared pieces are copied into its own ``$defs``),
so nothing is ever fetched: the ``$id`` URLs are names, not locations.

    >>> from linecam.schemas import validate
    >>> validate(msg)          # raises jsonschema.ValidationError if msg is not valid
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from importlib import resources
from typing import Any

import jsonschema
from jsonschema import Draft202012Validator

#: Message types with a schema (``msg["type"]`` picks one).
SCHEMA_NAMES: tuple[str, ...] = ("verdict", "defect", "status", "metrics", "description", "web_defect",
                                 "web_gap")


def load_schema(name: str) -> dict[str, Any]:
    """The schema for message type ``name`` as a dict (a fresh copy each call)."""
    if name not in SCHEMA_NAMES:
        raise KeyError(f"no schema named {name!r}; known: {', '.join(SCHEMA_NAMES)}")
    text = resources.files(__name__).joinpath(f"{name}.json").read_text(encoding="utf-8")
    return json.loads(text)


@functools.cache
def _validator(name: str) -> Draft202012Validator:
    # Building a validator costs far more than using one: subscribers validate every message.
    return Draft202012Validator(load_schema(name), format_checker=Draft202012Validator.FORMAT_CHECKER)


def validate(msg: Mapping[str, Any]) -> None:
    """Validate ``msg`` against the schema its ``type`` names; raises jsonschema.ValidationError."""
    kind = msg.get("type") if isinstance(msg, Mapping) else None
    if kind not in SCHEMA_NAMES:
        raise jsonschema.ValidationError(f"unknown message type {kind!r}; expected one of {', '.join(SCHEMA_NAMES)}")
    _validator(kind).validate(msg)
