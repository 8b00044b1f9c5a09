"""`export-engine vlm` is quiet (issue 21): ORT's MatMulNBits quantizer neither floods the
terminal with a line per weight nor leaves a root log handler at INFO behind; a quantized
decoder that rarely reproduces the fp32 descriptions is called out."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

pytest.importorskip("onnx")

SCRIPT = r"""
import logging, sys
import numpy as np, onnx
from onnx import TensorProto, helper, numpy_helper
from linecam.export.vlm.quantize import quantize_weights
nodes, inits, x = [], [], "x"
for i in range(6):
    w = numpy_helper.from_array(np.random.rand(64, 64).astype(np.float32), f"w{i}")
    inits.append(w)
    nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"y{i}"]))
    x = f"y{i}"
g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                      [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 64])], inits)
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
onnx.save(m, sys.argv[1])
quantize_weights(sys.argv[1], sys.argv[2], 4, block_size=32)
print("root handlers", len(logging.getLogger().handlers), "level", logging.getLogger().level)
"""


def test_int4_quantizer_is_quiet(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "[INFO]" not in proc.stderr and "matmul_nbits" not in proc.stderr, proc.stderr[:2000]
    assert "root handlers 0 level 30" in proc.stdout
    assert (tmp_path / "b.onnx").is_file()


def test_poor_int4_agreement_warns(tmp_path, monkeypatch, caplog):
    from linecam.export.vlm import quantize as q

    monkeypatch.setattr(q, "load_vlm_bundle", lambda out: _FakeBundle())
    monkeypatch.setattr(q, "quantize_weights", lambda *a, **k: None)
    monkeypatch.setattr(q, "file_entry", lambda *a, **k: {"path": "x"})
    monkeypatch.setattr(q, "write_manifest", lambda *a, **k: None)
    monkeypatch.setattr(q, "token_agreement", lambda *a, **k: {"teacher_forced": 0.62, "exact_sequences": 0.0})
    caplog.set_level(logging.WARNING)
    q.add_variants(tmp_path, quantize=("int4",))
    assert any("decoder_int4 reproduces only 0 %" in r.getMessage() for r in caplog.records)


class _FakeManifest:
    files: dict = {}
    quality: dict = {}

    def model_copy(self, update):
        m = _FakeManifest()
        m.files, m.quality = update.get("files", self.files), update.get("quality", self.quality)
        return m


class _FakeBundle:
    manifest = _FakeManifest()

    def path(self, role):
        return role

    def has(self, role):  # a flat-KV bundle: no contrib-op decoder beside the plain one
        return role in self.manifest.files
