"""Qwen3.5's hybrid decoder on ONNX Runtime == transformers' generate, token for token and state for state.

A tiny random-weight ``Qwen3_5ForConditionalGeneration`` (3 Gated-DeltaNet layers + 1 full
attention layer, a Qwen3 vision tower) is exported with ``export-engine vlm`` and run with
linecam's runtime; greedy tokens must equal ``generate(do_sample=False)`` and the decoder's
conv / recurrent states and KV cache must equal transformers' cache after the prefill and
after every decode step.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from linecam.export.cli import main as export_main  # noqa: E402
from linecam.export.vlm.export import load_hf_model  # noqa: E402
from linecam.export.vlm.tiny import build_model_folder  # noqa: E402
from linecam.runtime.vlm.engine import VlmEngine  # noqa: E402
from vlm_cache import cache_tensors  # noqa: E402

N_NEW = 10


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3_5")
    model_dir = build_model_folder("qwen3_5", root / "model", seed=0)
    rc = export_main(["vlm", "--model", str(model_dir), "--out", str(root / "bundle"), "--quantize", "int8,int4",
                      "--agreement-prompts", "1"])
    assert rc == 0
    model, _ = load_hf_model(model_dir)
    return model_dir, root / "bundle", model


def _image(h, w, seed):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img[h // 3: h // 2, w // 4: w // 2] = 255
    return img


def _hf_kwargs(model, enc):
    ids = torch.from_numpy(enc.input_ids)
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, eos_token_id=None, pad_token_id=0,
              return_dict_in_generate=True)
    if enc.vision_feeds:
        kw.update(pixel_values=torch.from_numpy(enc.vision_feeds["pixel_values"]),
                  image_grid_thw=torch.tensor(enc.grids), mm_token_type_ids=(ids == model.config.image_token_id).int())
    return kw


@pytest.mark.parametrize("graph", ["plain", "contrib"])
@pytest.mark.parametrize("shape", [(90, 130), (150, 100)])
def test_greedy_tokens_and_states_match_generate(exported, shape, graph):
    _, bundle, model = exported
    eng = VlmEngine(bundle, graph=graph)
    assert eng.roles["decoder"] == ("decoder_contrib_fp32" if graph == "contrib" else "decoder_fp32")
    enc = eng.encode(_image(*shape, seed=shape[0]), "Describe the defect in box x = 3 , y = 4 , area 12 px .")
    assert (enc.input_ids == eng.manifest.text.image_token_id).sum() > 0
    states: list[list[np.ndarray]] = []
    ours = eng.generate_encoded(enc, max_new_tokens=N_NEW, stop_token_ids=[], on_state=states.append)
    kw = _hf_kwargs(model, enc)
    with torch.no_grad():
        ref = model.generate(**kw, max_new_tokens=N_NEW).sequences[0, enc.n_tokens:].tolist()
    assert ours.tokens == ref and len(set(ref)) > 3
    assert len(states) == N_NEW
    # After the prefill (k = 1) and after each decode step: generate(max_new_tokens=k) leaves the cache
    # of the prompt + k - 1 fed tokens, which is what our k-th decoder run returned.
    for k in range(1, N_NEW + 1):
        with torch.no_grad():
            theirs = cache_tensors(model.generate(**kw, max_new_tokens=k).past_key_values)
        assert len(theirs) == len(states[k - 1])
        for a, b in zip(states[k - 1], theirs):
            assert a.dtype == np.float32 and a.shape == b.shape
            np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)


def test_text_only_prompt_matches_generate(exported):
    _, bundle, model = exported
    eng = VlmEngine(bundle)
    enc = eng.encode(None, "What is a scratch ?")
    ours = eng.generate_encoded(enc, max_new_tokens=8, stop_token_ids=[])
    with torch.no_grad():
        ref = model.generate(**_hf_kwargs(model, enc), max_new_tokens=8).sequences[0, enc.n_tokens:].tolist()
    assert ours.tokens == ref


def test_decoder_io_follows_onnxruntime_genai(exported):
    _, bundle, _ = exported
    man = json.loads((bundle / "manifest.json").read_text())
    assert man["family"] == "qwen3_5" and man["vision"]["kind"] == "qwen3_vl"
    types = man["text"]["layer_types"]
    assert types == ["linear_attention"] * 3 + ["full_attention"]
    assert set(man["extra"]["linear_attention_ops"]) == {"decoder_<precision>", "decoder_contrib_<precision>"}
    eng = VlmEngine(bundle, graph="plain")
    names = [i.name for i in eng.decoder.get_inputs()]
    assert names[3:] == ["past_key_values.0.conv_state", "past_key_values.0.recurrent_state",
                         "past_key_values.1.conv_state", "past_key_values.1.recurrent_state",
                         "past_key_values.2.conv_state", "past_key_values.2.recurrent_state",
                         "past_key_values.3.key", "past_key_values.3.value"]
    outs = [o.name for o in eng.decoder.get_outputs()]
    assert outs[1:] == [n.replace("past_key_values", "present") for n in names[3:]]
    empty = eng.empty_past()
    assert empty[0].shape == (1, 64, 3) and empty[1].shape == (1, 4, 8, 8) and empty[6].shape == (1, 2, 0, 16)
    assert not any(e.any() for e in empty)
    # The two graphs: plain ops (a Loop over the sequence, TensorRT-friendly) and ORT's fused contrib ops,
    # which the runtime picks on CPU; the same I/O.
    import onnx

    plain = {n.op_type for n in onnx.load(str(bundle / "decoder.onnx")).graph.node}
    contrib = {(n.domain, n.op_type) for n in onnx.load(str(bundle / "decoder_contrib.onnx")).graph.node}
    assert "Loop" in plain and not {"LinearAttention", "CausalConvWithState"} & plain
    assert {("com.microsoft", "LinearAttention"), ("com.microsoft", "CausalConvWithState")} <= contrib
    auto = VlmEngine(bundle)
    assert auto.roles["decoder"] == "decoder_contrib_fp32"
    assert [i.name for i in auto.decoder.get_inputs()] == names


def test_quantized_hybrid_decoders(exported):
    """INT8 / INT4 weight-only decoders of the hybrid model: agreement recorded, states stay FP32."""
    _, bundle, _ = exported
    man = json.loads((bundle / "manifest.json").read_text())
    for prec in ("int8", "int4"):
        for kind, graph in (("decoder", "plain"), ("decoder_contrib", "contrib")):
            assert man["files"][f"{kind}_{prec}"]["precision"] == prec
            assert 0.0 <= man["quality"][f"{kind}_{prec}"]["teacher_forced"] <= 1.0
            eng = VlmEngine(bundle, precision=prec, graph=graph)
            assert eng.roles["decoder"] == f"{kind}_{prec}"
            assert all(i.type == "tensor(float)" for i in eng._state_inputs)
            g = eng.generate(_image(80, 80, 1), "Describe the defect .", max_new_tokens=4, stop_token_ids=[])
            assert len(g.tokens) == 4
        assert man["quality"][f"decoder_{prec}"]["teacher_forced"] == man["quality"][f"decoder_contrib_{prec}"][
            "teacher_forced"]
    assert man["quality"]["decoder_int8"]["teacher_forced"] >= 0.9
    assert (bundle / "decoder_int4.onnx").stat().st_size < (bundle / "decoder.onnx").stat().st_size


def test_fp16_hybrid_decoder_keeps_fp32_states(exported, tmp_path):
    """--fp16 on a hybrid bundle: the FP16 decoder keeps FP32 I/O, so the states stay FP32 across steps."""
    import shutil

    from linecam.export.vlm.quantize import add_variants

    _, bundle, _ = exported
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    add_variants(copy, quantize=(), fp16=True, n_prompts=1, n_tokens=4)
    eng = VlmEngine(copy, precision="fp16")  # no contrib FP16 graph: the plain one, also on CPU
    assert eng.roles["decoder"] == "decoder_fp16"
    assert all(i.type == "tensor(float)" for i in eng._state_inputs)
    g = eng.generate(_image(80, 80, 2), "Describe the defect .", max_new_tokens=3, stop_token_ids=[])
    assert len(g.tokens) == 3


def test_graphs_written_with_external_weights_are_one_hashed_data_file(tmp_path, monkeypatch):
    """Over 2 GB torch's exporter scatters one file per weight: the export keeps one <graph>.onnx.data,
    lists and hashes it in the manifest, and the bundle runs. (Forced here on a tiny model.)"""
    import onnx

    import linecam.export.vlm.export as ex
    from linecam.export.vlm import export_vlm
    from linecam.runtime.vlm.bundle import load_vlm_bundle

    real = torch.onnx.export

    def scattering_export(module, args, f, **kw):  # what torch does for a model over 2 GB
        real(module, args, f, **kw)
        onnx.save_model(onnx.load(f), f, save_as_external_data=True, all_tensors_to_one_file=False,
                        size_threshold=0)

    monkeypatch.setattr(ex.torch.onnx, "export", scattering_export)
    model_dir = build_model_folder("qwen3_5", tmp_path / "model", seed=0)
    export_vlm(model_dir, tmp_path / "bundle", quantize=())
    files = sorted(p.name for p in (tmp_path / "bundle").iterdir())
    assert not [f for f in files if f.startswith(".")]  # no scratch left behind
    man = load_vlm_bundle(tmp_path / "bundle").manifest  # verifies every listed file's sha256
    for kind in ("vision", "embedding", "decoder", "decoder_contrib"):
        assert man.files[f"{kind}_fp32_data"].path == f"{kind}.onnx.data"
    onnx_files = [f for f in files if ".onnx" in f]
    assert len(onnx_files) == 8  # 4 graphs + their 4 weight files, nothing else
    eng = VlmEngine(tmp_path / "bundle")
    assert len(eng.generate(_image(80, 80, 3), "Describe .", max_new_tokens=3, stop_token_ids=[]).tokens) == 3
