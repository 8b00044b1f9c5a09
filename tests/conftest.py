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


# -- the VLM -----------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def vlm_bundle(tmp_path_factory):
    """A tiny random-weight Qwen2.5-VL exported as a linecam VLM bundle (INT8 and FP32), built
    once per session for the station's tests (view, ask). Needs torch and transformers: the
    tests that use it skip without them."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from linecam.export.vlm.export import export_vlm
    from linecam.export.vlm.tiny import build_model_folder

    work = tmp_path_factory.mktemp("vlm")
    model = build_model_folder("qwen2_5_vl", work / "hf", size="tiny")
    export_vlm(model, work / "bundle", quantize=("int8",), agreement_prompts=1, agreement_tokens=4)
    return work / "bundle"
