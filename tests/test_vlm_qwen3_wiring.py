"""The new families beyond export: the daemon's DescriptionWorker, distillation's HfVlm and LoRA targets."""

from __future__ import annotations

import re
import threading
import uuid

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from linecam.export.vlm import export_vlm  # noqa: E402
from linecam.export.vlm.hfmodel import HfVlm  # noqa: E402
from linecam.export.vlm.tiny import build_model_folder  # noqa: E402
from linecam.export.vlm.train import lora_targets  # noqa: E402
from linecam.runtime.postprocess import Region  # noqa: E402
from linecam.runtime.vlm.engine import VlmEngine  # noqa: E402
from linecam.runtime.vlm.worker import DescriptionWorker  # noqa: E402
from linecam.schemas import validate  # noqa: E402


@pytest.fixture(scope="module", params=["qwen3_5", "qwen3_vl"])
def exported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    model = build_model_folder(request.param, root / "model")
    export_vlm(model, root / "bundle", quantize=())
    return request.param, model, root / "bundle"


def test_description_worker_describes_with_the_new_families(exported):
    _, _, bundle = exported
    eng = VlmEngine(bundle, intra_op_threads=1)
    sink: list[dict] = []
    lock = threading.Lock()

    def publish(msg):
        validate(msg)
        with lock:
            sink.append(msg)

    w = DescriptionWorker(eng, publish, line="l1", camera="c1", max_new_tokens=5,
                          model_info={"name": "tiny", "sha256": "0" * 64}).start()
    img = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    did = str(uuid.uuid4())
    assert w.submit(img, [Region((40, 30, 12, 10), 120, (46.0, 35.0), 2.0)], did, frame_id=1, threshold=1.0)
    assert w.wait_idle(60)
    w.stop()
    (m,) = sink
    assert m["defect_event_id"] == did and m["status"] == "ok" and 1 <= m["n_tokens"] <= 5
    g = w.builder.build(img, [Region((40, 30, 12, 10), 120, (46.0, 35.0), 2.0)])
    assert m["text"] == eng.generate(g.image, g.prompt, max_new_tokens=5).text


def test_distillation_model_decodes_like_the_bundle(exported):
    """HfVlm (teacher / student of --distil-from) feeds torch the runtime's own inputs: same greedy text."""
    fam, model_dir, bundle = exported
    hf = HfVlm(model_dir, device="cpu", dtype="fp32")
    assert hf.family == fam
    img = np.random.default_rng(1).integers(0, 256, (90, 130, 3), dtype=np.uint8)
    eng = VlmEngine(bundle)
    want = eng.generate(img, "Describe the defect .", max_new_tokens=8)
    assert hf.generate(img, "Describe the defect .", max_new_tokens=8) == want.text


def test_lora_targets_cover_the_language_model_and_projector(exported):
    fam, model_dir, _ = exported
    hf = HfVlm(model_dir, device="cpu", dtype="fp32")
    names = [n for n, m in hf.model.named_modules() if isinstance(m, torch.nn.Linear)]
    for vision in (False, True):
        rx = re.compile(lora_targets(fam, vision))
        hit = [n for n in names if rx.fullmatch(n)]
        assert any(".language_model.layers." in n and "mlp" in n for n in hit)
        assert any(".visual.merger." in n for n in hit)
        assert any(".visual.blocks." in n for n in hit) == vision
        if fam == "qwen3_5":
            assert any("linear_attn.in_proj_qkv" in n for n in hit)


def test_unsupported_family_is_one_line_naming_the_supported(tmp_path, capsys):
    from linecam.export.cli import main as export_main

    (tmp_path / "config.json").write_text('{"model_type": "llava"}')
    assert export_main(["vlm", "--model", str(tmp_path), "--out", str(tmp_path / "o")]) != 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "'llava'" in err
    for fam in ("idefics3", "qwen2_5_vl", "qwen3_5", "qwen3_vl"):
        assert fam in err
