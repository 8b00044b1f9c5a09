"""INT8 that fails the accuracy gate because of one convolution: the search keeps that one in
float and the result passes (issue #13: "INT8 that passes its own gate by default").

The model is built so exactly one convolution quantizes badly: each of its output channels
has one huge weight on an input channel that is always zero (so FP32 ignores it) and small
weights elsewhere; per-channel INT8 sets the channel's scale from the huge weight and rounds
the small ones away. Everything else quantizes well.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from torch import nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from linecam.export import gate  # noqa: E402
from linecam.export import quantize as Q  # noqa: E402
from linecam.export.int8_search import keep_sensitive_float, quantized_convs  # noqa: E402
from linecam.export.onnx_export import export_onnx  # noqa: E402

SIZE = 32
BOUNDS = {"max_auroc_drop": gate.MAX_AUROC_DROP, "min_pearson": gate.MIN_PEARSON,
          "max_score_diff": gate.MAX_SCORE_DIFF}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 1, 1)
        with torch.no_grad():
            for conv in (self.a, self.b, self.c):
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.3)
                conv.bias.zero_()
            self.a.weight[:, 2] = 0.0
            self.a.weight[:, 2, 1, 1] = 60.0  # on the always-zero channel: FP32 never sees it
            self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=g).abs() * 0.3)
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = F.relu(self.c(F.relu(self.b(F.relu(self.a(x))))))
        amap = F.relu(self.head(y))
        return amap, torch.amax(F.avg_pool2d(amap, 3, stride=1), dim=(1, 2, 3))


def _images(rng: np.random.Generator, n: int, defect: bool) -> np.ndarray:
    x = rng.normal(0, 0.5, (n, 3, SIZE, SIZE)).astype(np.float32)
    x[:, 2] = 0.0
    if defect:
        for i in range(n):
            r, c = rng.integers(4, SIZE - 10, 2)
            x[i, :2, r:r + 6, c:c + 6] += 2.5
    return x


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("int8search")
    fp32 = export_onnx(Net().eval(), tmp / "model.onnx", (SIZE, SIZE))
    rng = np.random.default_rng(0)
    calib = Q.calibration_batch(np.concatenate([_images(rng, 24, False), _images(rng, 8, True)]))
    x = np.concatenate([_images(rng, 24, False), _images(rng, 24, True)])
    labels = np.r_[np.zeros(24), np.ones(24)]
    return {"tmp": tmp, "fp32": fp32, "calib": calib, "x": x, "labels": labels}


def test_all_int8_fails_and_the_search_keeps_the_bad_conv_float(setup: dict) -> None:
    tmp, fp32, calib = setup["tmp"], setup["fp32"], setup["calib"]
    dst = tmp / "model_int8.onnx"
    Q.to_int8(fp32, dst, calib, tool="ort")
    convs = quantized_convs(dst)
    assert len(convs) == 3  # a, b, c (the head stays float by default)
    rep = gate.compare(fp32, {"int8": dst}, setup["x"], setup["labels"])
    assert not rep.evaluate(**BOUNDS), "the all-INT8 model should fail the gate (else this test proves nothing)"

    res = keep_sensitive_float(fp32, dst, calib, setup["x"], setup["labels"], None, bounds=BOUNDS,
                               quant_kwargs={"tool": "ort"}, max_float=2)
    assert res.passed, res.tried
    first = convs[0]  # conv a, the one with the huge weight, is first in graph order
    assert max(res.sensitivity, key=res.sensitivity.get) == first  # quantized alone, it errs most
    assert res.tried[-1]["float"] == [first] and len(res.tried) == 1
    assert first in res.result.kept_float
    # the file left in place is the passing one
    rep = gate.compare(fp32, {"int8": dst}, setup["x"], setup["labels"])
    assert rep.evaluate(**BOUNDS)
    assert res.to_dict()["kept_float"] == list(res.result.kept_float)


class TwoBadNet(Net):
    """Two convolutions (a and c) that quantize badly, b between them well: the error has two sources."""

    def __init__(self) -> None:
        super().__init__()
        with torch.no_grad():
            self.b.weight[0] = 0.0
            self.b.bias[0] = -1.0  # b's channel 0 is dead after the ReLU ...
            self.c.weight[:, 0] = 0.0
            self.c.weight[:, 0, 1, 1] = 60.0  # ... and c weighs it hugely, as a weighs the zero input


def test_sensitivity_is_each_conv_quantized_alone_and_the_default_ceiling_keeps_both(setup: dict) -> None:
    """Sensitivity is the error of the model with only that convolution quantized (one in, as
    layer-wise sensitivity analysis does; one out missed the real students' spread error), and
    with no ceiling given the search may keep several: both bad convolutions end up float."""
    from linecam.export.int8_search import _error, default_max_float

    tmp, calib, x, labels = setup["tmp"], setup["calib"], setup["x"], setup["labels"]
    fp32 = export_onnx(TwoBadNet().eval(), tmp / "two.onnx", (SIZE, SIZE))
    dst = tmp / "two_int8.onnx"
    Q.to_int8(fp32, dst, calib, tool="ort")
    a, b, c = quantized_convs(dst)
    res = keep_sensitive_float(fp32, dst, calib, x, labels, None, bounds=BOUNDS, quant_kwargs={"tool": "ort"})
    alone = tmp / "alone.onnx"
    Q.to_int8(fp32, alone, calib, tool="ort", nodes_to_exclude=[a, c])
    assert res.sensitivity[b] == pytest.approx(_error(gate.compare(fp32, {"q": alone}, x, labels).candidates["q"]),
                                               abs=1e-5)
    assert min(res.sensitivity[a], res.sensitivity[c]) > 5 * res.sensitivity[b], res.sensitivity
    assert res.passed, res.tried
    assert sorted(res.float_convs) == sorted([a, c]) and len(res.tried) == 2, res.tried
    assert default_max_float(3) == 3 and default_max_float(7) == 3 and default_max_float(37) == 10
    # gate.json says what the numbers mean and the ceiling the search ran under
    rec = res.to_dict()
    assert rec["max_float"] == default_max_float(3) and "quantized" in rec["sensitivity_measure"]


def test_no_search_when_max_float_is_zero(setup: dict) -> None:
    dst = setup["tmp"] / "zero.onnx"
    Q.to_int8(setup["fp32"], dst, setup["calib"], tool="ort")
    res = keep_sensitive_float(setup["fp32"], dst, setup["calib"], setup["x"], setup["labels"], None,
                               bounds=BOUNDS, quant_kwargs={"tool": "ort"}, max_float=0)
    assert not res.passed and res.result is None and res.tried == []


def test_quantize_and_gate_rescues_int8_and_says_so_loudly(setup: dict, tmp_path: Path, caplog) -> None:
    """Through the one FP16/INT8 + gate definition every exporter uses: the search runs when INT8
    fails, the bundle's INT8 passes, gate.json records the search, and a WARNING names the
    convolutions left in float (a float fallback often means calibration unlike the line)."""
    import json
    import logging

    from linecam.export.variants import GateSettings, quantize_and_gate
    from linecam.preprocess import PreprocessSpec

    settings = GateSettings(("int8",), gate.MAX_AUROC_DROP, gate.MIN_PEARSON, gate.MAX_SCORE_DIFF,
                            int8_tool="ort", int8_max_float=2)
    spec = PreprocessSpec(input_size=(SIZE, SIZE))
    with caplog.at_level(logging.WARNING, logger="linecam.export.variants"):
        v = quantize_and_gate(setup["fp32"], tmp_path, spec, setup["calib"].inputs, "test array", setup["x"],
                              setup["labels"], None, settings)
    assert v.gate["passed"] and v.gate["int8_search"]["passed"]
    Q.to_int8(setup["fp32"], tmp_path / "all.onnx", setup["calib"], tool="ort")
    convs = quantized_convs(tmp_path / "all.onnx")
    first = convs[0]  # conv a: the one the search must keep float
    loud = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "kept in float" in r.getMessage()]
    assert len(loud) == 1, caplog.text
    assert first in loud[0]
    # It counts and names the convolutions the search kept, not the head nodes every INT8 model keeps float.
    named = v.gate["int8_search"]["float_convs"]
    assert named and set(named) <= set(convs), named
    assert f"with {len(named)} convolution(s) kept in float ({', '.join(named)})" in loud[0], loud[0]
    assert json.loads((tmp_path / "gate.json").read_text())["int8_search"]["kept_float"]


def test_both_export_commands_default_to_the_quant_options_defaults():
    """cli_quant writes its defaults as literals (``--help`` imports only click): they must be
    QuantOptions' own, for distil and text-expert alike."""
    import dataclasses

    import click

    from linecam.export.cli import distil
    from linecam.export.cli_quant import parse_precisions
    from linecam.export.cli_text import text_expert
    from linecam.export.variants import QuantOptions

    want = {f.name: f.default for f in dataclasses.fields(QuantOptions)}
    for command in (distil, text_expert):
        ctx = click.Context(command)
        got = {p.name: p.get_default(ctx) for p in command.params if p.name in want}
        got["quantize"] = parse_precisions(got["quantize"])
        assert got == want, command.name
