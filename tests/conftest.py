"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from linecam.broker import MosquittoBroker, MosquittoNotFoundError, find_mosquitto


# -- MQTT -------------------------------------------------------------------------------------
@pytest.fixture
def broker() -> Iterator[MosquittoBroker]:
    """A private, running mosquitto on a free 127.0.0.1 port (``.host``, ``.port``,
    ``.stop()`` / ``.start()`` on the same port). Function scope: retained messages
    never leak between tests, and starting one takes ~20 ms."""
    try:
        find_mosquitto()
    except MosquittoNotFoundError as e:
        pytest.skip(str(e))
    b = MosquittoBroker()
    try:
        yield b.start()
    finally:
        b.close()
