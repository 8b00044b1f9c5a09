"""The ``mqtt:`` section: broker address, credentials (never the secret itself), TLS files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from linecam.errors import ConfigError


class MqttSettings(BaseModel):
    """The ``mqtt:`` config section. Holds no secret itself: the password is read from
    ``password_file`` or the ``password_env`` variable when the client is built."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    client_id: str | None = None
    protocol: Literal["5", "3.1.1"] = "5"
    keepalive: int = Field(default=30, ge=5, le=65535)
    username: str | None = None
    password_file: Path | None = None
    password_env: str | None = None
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    #: Default ``linecam/<line>/<camera>``.
    topic_prefix: str | None = None
    #: QoS 1 messages paho keeps in memory while the broker is away (0 = unbounded).
    max_queued: int = Field(default=10000, ge=0)

    @field_validator("protocol", mode="before")
    @classmethod
    def _yaml_number(cls, v: Any) -> Any:
        # YAML reads `protocol: 5` as an int.
        return str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v

    @model_validator(mode="after")
    def _consistent(self) -> MqttSettings:
        if self.password_file is not None and self.password_env is not None:
            raise ValueError("set only one of password_file and password_env")
        if (self.password_file is not None or self.password_env is not None) and not self.username:
            raise ValueError("a password needs a username")
        if not self.tls and any(p is not None for p in (self.ca_file, self.cert_file, self.key_file)):
            raise ValueError("ca_file / cert_file / key_file need tls: true")
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file needs cert_file")
        return self

    def read_password(self) -> str | None:
        """The password from its file (first line) or environment variable, else None."""
        if self.password_file is not None:
            try:
                text = self.password_file.read_text(encoding="utf-8")
            except OSError as e:
                raise ConfigError(f"cannot read mqtt.password_file {self.password_file}: {e.strerror}") from None
            return text.splitlines()[0] if text else ""
        if self.password_env is not None:
            value = os.environ.get(self.password_env)
            if value is None:
                raise ConfigError(f"mqtt.password_env names ${self.password_env}, which is not set: export it")
            return value
        return None
