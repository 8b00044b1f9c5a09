"""Bundle v1: verified loading, and one clear line for every way a bundle can be bad."""

from __future__ import annotations

import json

import pytest

from bundles import make_tiny_bundle, read_manifest, write_raw_manifest
from linecam.bundle import SCHEMA_VERSION, load_bundle, sha256_file
from linecam.errors import BundleError


@pytest.fixture
def bundle_dir(tmp_path):
    return make_tiny_bundle(tmp_path / "b")


def test_valid_bundle_loads_and_records_hashes(bundle_dir):
    b = load_bundle(bundle_dir)
    entry = b.manifest.files["onnx_fp32"]
    assert entry.sha256 == sha256_file(bundle_dir / "model.onnx")
    assert b.pick("onnxruntime") == "onnx_fp32"
    assert b.manifest.preprocess.input_size == (64, 64)
    assert len(b.model_sha256) == 64


def _one_line(err: BundleError) -> str:
    msg = str(err)
    assert "\n" not in msg
    return msg


def test_missing_folder(tmp_path):
    with pytest.raises(BundleError) as e:
        load_bundle(tmp_path / "nope")
    assert "does not exist" in _one_line(e.value) and "export-engine fit" in str(e.value)


def test_missing_manifest(bundle_dir):
    (bundle_dir / "manifest.json").unlink()
    with pytest.raises(BundleError, match="manifest.json is missing"):
        load_bundle(bundle_dir)


def test_corrupt_manifest_json(bundle_dir):
    (bundle_dir / "manifest.json").write_text('{"schema_version": 1, "name": ')
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(bundle_dir)


def test_newer_schema_says_upgrade(bundle_dir):
    data = read_manifest(bundle_dir)
    data["schema_version"] = SCHEMA_VERSION + 1
    write_raw_manifest(bundle_dir, data)
    with pytest.raises(BundleError) as e:
        load_bundle(bundle_dir)
    assert "upgrade linecam" in _one_line(e.value)


def test_tampered_model_fails_hash(bundle_dir):
    p = bundle_dir / "model.onnx"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    p.write_bytes(bytes(data))
    with pytest.raises(BundleError) as e:
        load_bundle(bundle_dir)
    assert "sha256" in _one_line(e.value) and "onnx_fp32" in str(e.value)


def test_truncated_model_fails(bundle_dir):
    p = bundle_dir / "model.onnx"
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(BundleError, match="half-copied"):
        load_bundle(bundle_dir)


def test_missing_model_file(bundle_dir):
    (bundle_dir / "model.onnx").unlink()
    with pytest.raises(BundleError, match="is missing"):
        load_bundle(bundle_dir)


def test_file_outside_bundle_rejected(bundle_dir):
    data = read_manifest(bundle_dir)
    data["files"]["onnx_fp32"]["path"] = "../../etc/passwd"
    write_raw_manifest(bundle_dir, data)
    with pytest.raises(BundleError, match="outside the bundle"):
        load_bundle(bundle_dir)


def test_wrong_field_type_names_the_field(bundle_dir):
    data = read_manifest(bundle_dir)
    data["thresholds"]["image"] = "high"
    write_raw_manifest(bundle_dir, data)
    with pytest.raises(BundleError) as e:
        load_bundle(bundle_dir)
    assert "thresholds.image" in _one_line(e.value)


def test_unknown_backend_precision_is_clear(bundle_dir):
    b = load_bundle(bundle_dir)
    with pytest.raises(BundleError, match="no onnxruntime/int8 model"):
        b.pick("onnxruntime", "int8")


def test_manifest_written_atomically_no_temp_left(bundle_dir):
    leftovers = [p.name for p in bundle_dir.iterdir() if p.name.startswith(".manifest")]
    assert leftovers == []
    assert json.loads((bundle_dir / "manifest.json").read_text())["schema_version"] == SCHEMA_VERSION
