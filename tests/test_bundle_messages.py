"""Bundle errors name the setting to fix and the exact command (issue 21)."""

from __future__ import annotations

import types
from pathlib import Path

import pytest

from bundles import make_tiny_bundle
from linecam.bundle import load_bundle
from linecam.errors import BundleError
from linecam.runtime.vlm.bundle import VlmBundle, load_vlm_bundle


def test_region_expert_as_vlm_bundle_names_vlm_bundle(tmp_path):
    b = make_tiny_bundle(tmp_path / "b")
    with pytest.raises(BundleError, match=r"vlm\.bundle .*export-engine vlm"):
        load_vlm_bundle(b)


def test_vlm_as_model_bundle_names_model_bundle(tmp_path):
    b = tmp_path / "v"
    b.mkdir()
    (b / "manifest.json").write_text('{"kind": "vlm", "schema_version": 1}')
    with pytest.raises(BundleError, match=r"model\.bundle"):
        load_bundle(b)


def test_missing_vlm_precision_gives_the_exact_command():
    vb = VlmBundle.__new__(VlmBundle)
    vb.root = Path("/opt/vlm")
    vb.manifest = types.SimpleNamespace(files={"decoder_fp32": None, "decoder_int8": None},
                                        provenance=types.SimpleNamespace(details={"source": "/models/smolvlm"}))
    with pytest.raises(BundleError) as e:
        vb.path("decoder_fp16")
    msg = str(e.value)
    assert "export-engine vlm --model /models/smolvlm --out /opt/vlm --fp16" in msg and "vlm.precision" in msg
