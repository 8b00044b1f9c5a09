"""Files that must not run code when loaded: training checkpoints are read with
``torch.load(weights_only=True)``; a pickle that would execute code is refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[1]


def test_no_module_loads_a_checkpoint_with_weights_only_false():
    hits = [str(p.relative_to(REPO)) for p in (REPO / "linecam").rglob("*.py")
            if "weights_only=False" in p.read_text(encoding="utf-8")]
    assert hits == []


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_distil_checkpoint_resumes_with_weights_only_and_a_code_pickle_is_refused(tmp_path):
    from linecam.export.distil import train_student

    net = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.zeros(1, 2)).sum().backward()
    opt.step()
    good = tmp_path / "good.pt"
    torch.save({"key": "k", "step": 3, "model": net.state_dict(), "opt": opt.state_dict(), "losses": [0.5, 0.25]},
               good)
    state = torch.load(good, weights_only=True)  # what train_student does: the format allows it
    assert state["step"] == 3 and state["losses"] == [0.5, 0.25]
    evil = tmp_path / "evil.pt"
    torch.save({"key": "k", "x": _Evil()}, evil)
    with pytest.raises(Exception, match="(?i)weights_only|unpickl"):
        torch.load(evil, weights_only=True)
    assert callable(train_student)
