"""The ``spool:`` section: the durable store-and-forward spool (see :mod:`linecam.runtime.spool`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class SpoolSettings(BaseModel):
    """The ``spool:`` config section."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    #: Default: ``<state dir>/spool-<line>-<camera>.db`` (see ``linecam.config.load.state_dir``).
    path: Path | None = None
    #: Caps; when either is reached the oldest messages are dropped (and counted).
    max_rows: int = Field(default=500_000, ge=10)
    max_mb: float = Field(default=256.0, ge=1.0)
    #: normal: survives a crash of linecam; full: also a power cut (an fsync per commit).
    sync: Literal["normal", "full"] = "normal"
    #: Spooled messages handed to paho at once (in flight or in paho's memory).
    window: int = Field(default=256, ge=1, le=10_000)
    #: Re-send a message from the spool if still unconfirmed this long into a connection.
    resend_after_s: float = Field(default=60.0, gt=0)
