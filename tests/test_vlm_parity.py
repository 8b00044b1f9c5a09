"""Exported VLM on ONNX Runtime == transformers' generate, token for token (FP32).

Tiny random-weight Qwen2.5-VL and Idefics3 (SmolVLM) models are written as Hugging Face
folders, exported with ``export-engine vlm`` (the CLI), run with linecam's runtime, and
compared with ``model.generate(do_sample=False)`` on the same pixel values and token ids.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from linecam.errors import BundleError  # noqa: E402
from linecam.export.cli import main as export_main  # noqa: E402
from linecam.export.vlm.export import load_hf_model  # noqa: E402
from linecam.export.vlm.tiny import build_model_folder  # noqa: E402
from linecam.runtime.vlm.bundle import load_vlm_bundle  # noqa: E402
from linecam.runtime.vlm.engine import VlmEngine  # noqa: E402

FAMILIES = ["qwen2_5_vl", "idefics3"]
N_NEW = 24


@pytest.fixture(scope="module", params=FAMILIES)
def exported(request, tmp_path_factory):
    fam = request.param
    root = tmp_path_factory.mktemp(fam)
    model_dir = build_model_folder(fam, root / "model", seed=0)
    rc = export_main(["vlm", "--model", str(model_dir), "--out", str(root / "bundle"), "--quantize", "int8,int4",
                      "--agreement-prompts", "2"])
    assert rc == 0
    model, _ = load_hf_model(model_dir)
    return fam, model_dir, root / "bundle", model


def _hf_generate(fam, model, enc, n_new, eos=None):
    ids = torch.from_numpy(enc.input_ids)
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n_new,
              eos_token_id=eos, pad_token_id=0)
    if enc.vision_feeds:
        pv = torch.from_numpy(enc.vision_feeds["pixel_values"])
        if fam == "qwen2_5_vl":
            kw.update(pixel_values=pv, image_grid_thw=torch.tensor(enc.grids),
                      mm_token_type_ids=(ids == model.config.image_token_id).int())
        else:
            kw.update(pixel_values=pv[None])
    with torch.no_grad():
        out = model.generate(**kw)
    return out[0, ids.shape[1]:].tolist()


def _image(h, w, seed):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img[h // 3: h // 2, w // 4: w // 2] = 255
    return img


@pytest.mark.parametrize("shape", [(90, 130), (150, 100)])
def test_greedy_tokens_match_generate(exported, shape):
    fam, _, bundle, model = exported
    eng = VlmEngine(bundle)
    enc = eng.encode(_image(*shape, seed=shape[0]), "Describe the defect in box x = 3 , y = 4 , area 12 px .")
    assert (enc.input_ids == eng.manifest.text.image_token_id).sum() > 0
    ours = eng.generate_encoded(enc, max_new_tokens=N_NEW, stop_token_ids=[])
    ref = _hf_generate(fam, model, enc, N_NEW)
    assert len(ref) == N_NEW
    assert ours.tokens == ref
    assert ours.stop_reason == "max_tokens"
    # Random weights must still produce a non-constant sequence, or the check says little.
    assert len(set(ref)) > 3


def test_text_only_prompt_matches_generate(exported):
    fam, _, bundle, model = exported
    eng = VlmEngine(bundle)
    enc = eng.encode(None, "What is a scratch ?")
    ours = eng.generate_encoded(enc, max_new_tokens=12, stop_token_ids=[])
    assert ours.tokens == _hf_generate(fam, model, enc, 12)


def test_stop_token_ends_like_generate(exported):
    fam, _, bundle, model = exported
    eng = VlmEngine(bundle)
    enc = eng.encode(_image(100, 120, 7), "Describe the defect .")
    free = eng.generate_encoded(enc, max_new_tokens=N_NEW, stop_token_ids=[]).tokens
    stop = free[5]  # a token the model emits mid-sequence: generation must end right there
    cut = free.index(stop) + 1
    streamed: list[int] = []
    ours = eng.generate_encoded(enc, max_new_tokens=N_NEW, stop_token_ids=[stop],
                                on_token=lambda t, piece: streamed.append(t))
    assert ours.tokens == free[:cut] == streamed
    assert ours.stop_reason == "stop_token"
    assert ours.tokens == _hf_generate(fam, model, enc, N_NEW, eos=stop)
    assert eng.generate_encoded(enc, max_new_tokens=3, stop_token_ids=[]).tokens == free[:3]


def test_quantized_decoders_run_and_agreement_is_recorded(exported):
    fam, _, bundle, _ = exported
    b = load_vlm_bundle(bundle)
    q = b.manifest.quality
    for prec in ("int8", "int4"):
        assert b.manifest.files[f"decoder_{prec}"].precision == prec
        rec = q[f"decoder_{prec}"]
        assert 0.0 <= rec["teacher_forced"] <= 1.0 and rec["prompts"] == 2
    # 8-bit blockwise weights barely move a greedy choice; 4-bit may move some.
    assert q["decoder_int8"]["teacher_forced"] >= 0.9
    assert (bundle / "decoder_int4.onnx").stat().st_size < (bundle / "decoder.onnx").stat().st_size
    eng = VlmEngine(b, precision="int8")
    g = eng.generate(_image(80, 80, 1), "Describe the defect .", max_new_tokens=5, stop_token_ids=[])
    assert len(g.tokens) == 5 and g.timings_ms["ttft"] > 0


def test_manifest_and_bundle_checks(exported, tmp_path):
    fam, _, bundle, _ = exported
    man = json.loads((bundle / "manifest.json").read_text())
    assert man["kind"] == "vlm" and man["family"] == fam and man["schema_version"] == 1
    assert {"vision_fp32", "embedding_fp32", "decoder_fp32", "tokenizer"} <= set(man["files"])
    assert "{image}" in man["prompt"]["format"] and "{prompt}" in man["prompt"]["format"]
    # A corrupted file is refused with one line that says what to do.
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    with open(copy / "decoder.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    with pytest.raises(BundleError, match="sha256"):
        load_vlm_bundle(copy)
    with pytest.raises(BundleError, match="no fp16 'decoder_fp16' file.*export-engine vlm --model .* --fp16"):
        VlmEngine(bundle, precision="fp16")


def test_export_errors_are_one_line(tmp_path, capsys):
    assert export_main(["vlm", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 3
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "config.json" in err and "\n" not in err
    assert export_main(["vlm", "--model", str(tmp_path), "--out", str(tmp_path / "o"), "--quantize", "int3"]) == 2


def test_region_tokens_injected_as_extra_embeds_match_generate(exported):
    """Region-projector rows appended to inputs_embeds decode like transformers fed the same rows."""
    fam, _, bundle, model = exported
    if fam != "idefics3":
        pytest.skip("1-D RoPE family: transformers' inputs_embeds-only path uses the same positions")
    eng = VlmEngine(bundle)
    enc = eng.encode(_image(90, 90, 3), "Describe the defect .")
    rng = np.random.default_rng(0)
    extra = rng.normal(0, 1, (3, eng.manifest.text.hidden_size)).astype(np.float32)
    ours = eng.generate_encoded(enc, max_new_tokens=10, stop_token_ids=[], extra_embeds=extra)
    plain = eng.generate_encoded(enc, max_new_tokens=10, stop_token_ids=[])
    rows = np.concatenate([eng.embed(enc.input_ids, eng.image_features(enc)), extra[None]], axis=1)
    with torch.no_grad():
        ref = model.generate(inputs_embeds=torch.from_numpy(rows),
                             attention_mask=torch.ones(rows.shape[:2], dtype=torch.long),
                             do_sample=False, max_new_tokens=10, eos_token_id=None, pad_token_id=0)
    assert ours.tokens == ref[0].tolist()
    assert ours.tokens != plain.tokens  # the region rows do reach the decoder


def test_fp16_variant_through_the_shared_converter(exported, tmp_path):
    """--fp16 writes FP16 graphs with the region expert's converter: vision keeps FP32 I/O, the bundle
    verifies, and the FP16 decoder generates on ONNX Runtime CPU."""
    import shutil

    import onnx

    from linecam.export.vlm.quantize import add_variants

    fam, _, bundle, _ = exported
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    man = add_variants(copy, quantize=(), fp16=True, n_prompts=1, n_tokens=4)
    for kind in ("vision", "decoder", "embedding"):
        assert man.files[f"{kind}_fp16"].precision == "fp16"
    vis = onnx.load(str(copy / "vision_fp16.onnx"))
    assert vis.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in vis.graph.initializer)
    eng = VlmEngine(load_vlm_bundle(copy), precision="fp16")
    g = eng.generate(_image(80, 80, 2), "Describe the defect .", max_new_tokens=3, stop_token_ids=[])
    assert len(g.tokens) == 3
