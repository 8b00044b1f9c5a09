"""ONNX export parity is judged relative to the outputs' scale: a correct graph always passes,
whatever its units; a graph computing something else fails and is kept for the bug report."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from linecam.errors import BundleError  # noqa: E402
from linecam.export.onnx_export import export_onnx  # noqa: E402
from linecam.export.student import Student  # noqa: E402


def _student(scale: float) -> Student:
    torch.manual_seed(0)
    s = Student("s").eval()
    with torch.no_grad():
        s.head.weight.mul_(scale)
        s.head.bias.fill_(0.5 * scale)  # maps clearly above zero, so the relu does not hide the scale
    return s


@pytest.mark.parametrize("scale", [1.0, 1000.0])
def test_correct_graph_passes_at_any_output_scale(tmp_path, scale):
    real = np.random.default_rng(1).normal(0, 1, (2, 3, 32, 32)).astype(np.float32)
    path = export_onnx(_student(scale), tmp_path / "m.onnx", (32, 32), inputs=real)
    assert path.is_file()


class _WrongOnExport(torch.nn.Module):
    """Exports a different op than torch runs (sigmoid for relu): the graph is wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.s = _student(1000.0)

    def forward(self, x):
        amap = self.s.raw(x)
        amap = torch.sigmoid(amap) if torch.onnx.is_in_onnx_export() else torch.relu(amap)
        return amap, amap.amax(dim=(1, 2, 3))


def test_graph_with_a_wrong_op_fails_and_is_kept(tmp_path):
    with pytest.raises(BundleError, match="computes something else") as e:
        export_onnx(_WrongOnExport(), tmp_path / "m.onnx", (32, 32))
    assert not (tmp_path / "m.onnx").exists()
    assert (tmp_path / "m.rejected.onnx").is_file() and "m.rejected.onnx" in str(e.value)
