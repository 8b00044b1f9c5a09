"""``export-engine text-expert`` on a tiny random-weight CLIP (CLIPConfig, no download): the ONNX
graph computes the torch map, the prompts are constants (no text tower on the edge), the
good-image bank works, prompt files fail with one line, and distil takes the expert as teacher."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from mvtec_synth import make_category  # noqa: E402
from linecam.bundle import load_bundle  # noqa: E402
from linecam.errors import BundleError  # noqa: E402
from linecam.export.cli import main as export_main  # noqa: E402
from linecam.export.prompts import load_prompts  # noqa: E402

PROMPTS = 'object: metal bracket\nabnormal: []\nregions:\n  scratch: "a scratch on the metal rim"\n' \
          '  dent: ["a dent in the {}", "a dented {}"]\n'


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    from linecam.export.clip_tiny import build_clip_folder

    return build_clip_folder(tmp_path_factory.mktemp("clip") / "clip", size="tiny")


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("prompts") / "prompts.yaml"
    p.write_text(PROMPTS)
    return p


@pytest.fixture(scope="module")
def category(tmp_path_factory) -> Path:
    return make_category(tmp_path_factory.mktemp("data"), size=128, n_train=20, n_good_test=10, n_per_defect=5)


@pytest.fixture(scope="module")
def zero_shot(tmp_path_factory, clip_dir, prompts) -> Path:
    out = tmp_path_factory.mktemp("zs") / "bundle"
    assert export_main(["text-expert", "--clip", str(clip_dir), "--prompts", str(prompts), "--out", str(out),
                        "--threads", "1", "-q"]) == 0
    return out


def _reference(clip_dir: Path, prompts_text: str, tmp: Path):
    from linecam.export.prompts import PromptSpec
    from linecam.export.text_expert import TextExpert, embed_prompts, load_clip
    import yaml

    clip = load_clip(clip_dir)
    spec = PromptSpec.model_validate(yaml.safe_load(prompts_text))
    return TextExpert(clip, embed_prompts(clip, spec), (clip.image_size, clip.image_size)), clip


def test_zero_shot_onnx_matches_torch_reference(zero_shot, clip_dir, category, tmp_path):
    import onnxruntime as ort

    from linecam.preprocess import Preprocessor, read_image

    bundle = load_bundle(zero_shot)
    m = bundle.manifest
    assert m.extra["mode"] == "zero-shot" and m.thresholds.method.startswith("zero-shot")
    assert set(m.files) == {"onnx_fp32"}
    assert m.outputs.label_maps is not None and m.outputs.label_maps.labels == ["scratch", "dent"]
    model, _ = _reference(clip_dir, PROMPTS, tmp_path)
    pre = Preprocessor(m.preprocess)
    sess = ort.InferenceSession(str(bundle.path("onnx_fp32")), providers=["CPUExecutionProvider"])
    images = sorted((category / "test").rglob("*.png"))[::7][:4]
    assert len(images) == 4
    for p in images:
        x = pre(*read_image(p), copy=True)
        got = sess.run(["anomaly_map", "score", "prompt_maps"], {"image": x})
        with torch.no_grad():
            want = [t.numpy() for t in model(torch.from_numpy(x))]
        assert got[0].shape == (1, 1, 64, 64) and got[2].shape == (1, 2, 64, 64)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, atol=1e-4, rtol=0)
        # the map is the maximum of the named maps (no generic ensemble in these prompts)
        np.testing.assert_allclose(got[0][0, 0], got[2][0].max(axis=0), atol=1e-6)


def test_prompts_are_baked_no_text_encoder_in_graph(zero_shot, clip_dir, tmp_path):
    import onnx
    from onnx import numpy_helper

    from linecam.export.text_expert import load_clip

    g = onnx.load(str(load_bundle(zero_shot).path("onnx_fp32"))).graph
    assert [i.name for i in g.input] == ["image"]  # no input_ids / attention_mask
    clip = load_clip(clip_dir).model
    text_shapes = {tuple(p.shape) for n, p in clip.named_parameters() if n.startswith("text_")}
    vision_numel = sum(p.numel() for n, p in clip.named_parameters() if n.startswith(("vision_", "visual_")))
    text_numel = sum(p.numel() for n, p in clip.named_parameters() if n.startswith("text_"))
    inits = [numpy_helper.to_array(t) for t in g.initializer]
    total = sum(a.size for a in inits)
    # vision tower + projection + the baked prompt rows (1 normal + 2 named, 24 wide) + small constants;
    # a little under the vision count: the exporter shares identical initializers (fresh LayerNorms)
    assert 0.9 * vision_numel <= total < vision_numel + 0.2 * text_numel, (total, vision_numel, text_numel)
    assert (512, 32) in text_shapes  # the token embedding: must not be in the graph
    assert not any(tuple(a.shape) == (512, 32) for a in inits)
    # the baked rows are the text tower's ensemble embeddings
    model, clip_f = _reference(clip_dir, PROMPTS, tmp_path)
    baked = [a if a.shape[1] == 24 else a.T for a in inits if a.ndim == 2 and 24 in a.shape]  # x @ E.T folds
    for want in (model.normal.numpy(), model.abnormal.numpy()):  # [1, 24] and [2, 24]
        assert any(a.shape == want.shape and np.allclose(a, want, atol=1e-6) for a in baked), want.shape


def test_prompts_change_the_map(clip_dir, tmp_path):
    """The baked text matters: other prompts, other maps (a constant would pass parity too)."""
    a, _ = _reference(clip_dir, PROMPTS, tmp_path)
    b, _ = _reference(clip_dir, PROMPTS.replace("a scratch on the metal rim", "a stain on the bracket"), tmp_path)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ma, mb = a(x)[2][0, 0], b(x)[2][0, 0]  # the 'scratch' map
        assert float((ma - mb).abs().max()) > 1e-3
        assert torch.equal(a(x)[2][0, 1], b(x)[2][0, 1])  # 'dent' unchanged


def test_few_shot_bank_separates_defects(clip_dir, prompts, category, tmp_path):
    """Random CLIP weights: the text side localises nothing, the good-patch bank does."""
    from linecam.evaluate import evaluate_bundle

    aurocs = {}
    for mode in ("few", "zero"):
        out = tmp_path / mode
        args = ["text-expert", "--clip", str(clip_dir), "--prompts", str(prompts), "--out", str(out),
                "--images", str(category / "train" / "good"), "--quantize", "none", "--threads", "1", "-q"]
        assert export_main(args + (["--zero-shot"] if mode == "zero" else [])) == 0
        man = load_bundle(out).manifest
        assert man.extra["bank_size"] == (0 if mode == "zero" else 102)  # 10 % of 16 images x 64 patches
        assert man.thresholds.method == "good_quantile" and man.thresholds.n_good == 100
        aurocs[mode] = evaluate_bundle(out, category, progress=False).metrics.image_auroc
    print(f"\nimage AUROC on generated textures, random-weight CLIP: few-shot {aurocs['few']:.3f}, "
          f"zero-shot {aurocs['zero']:.3f}")
    assert aurocs["few"] >= 0.9
    assert aurocs["few"] - aurocs["zero"] >= 0.2


def test_int8_fp16_behind_the_gate(clip_dir, prompts, category, tmp_path):
    res = export_main(["text-expert", "--clip", str(clip_dir), "--prompts", str(prompts), "--out",
                       str(tmp_path / "q"), "--images", str(category / "train" / "good"), "--threads", "1", "-q"])
    assert res == 0
    m = load_bundle(tmp_path / "q").manifest
    assert {f.precision for f in m.files.values()} == {"fp32", "fp16", "int8"}
    assert m.extra["gate"]["passed"] is True
    assert (tmp_path / "q" / "gate.json").is_file()


@pytest.mark.parametrize("text, match", [
    ("regions: {a: b}", "field 'object'"),
    ("object: x\nabnormal: []", "no abnormal prompts"),
    ("object: x\ntemplates: ['a photo']", "has no '{}'"),
    ("object: x\nregions: {'bad/name': 'y'}", "region name"),
    ("object: x\nnormall: [a]", "field 'normall'"),
    ("- just\n- a list", "not a YAML mapping"),
    ("object: [unclosed", "cannot read prompts file"),
])
def test_bad_prompts_one_line(tmp_path, text, match):
    p = tmp_path / "p.yaml"
    p.write_text(text)
    with pytest.raises(BundleError, match=match) as e:
        load_prompts(p)
    assert "\n" not in str(e.value)


def test_cli_errors_say_what_to_do(tmp_path, prompts, capsys):
    assert export_main(["text-expert", "--clip", str(tmp_path / "nope"), "--prompts", str(prompts),
                        "--out", str(tmp_path / "b")]) == BundleError.exit_code
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --clip") and "config.json" in err and "\n" not in err
    assert export_main(["text-expert", "--clip", str(tmp_path), "--prompts", str(tmp_path / "none.yaml"),
                        "--out", str(tmp_path / "b")]) == BundleError.exit_code
    err = capsys.readouterr().err.strip()
    assert "prompts file" in err and "does not exist" in err
    assert export_main(["text-expert", "--clip", str(tmp_path), "--prompts", str(prompts), "--zero-shot",
                        "--out", str(tmp_path / "b")]) == 2
    assert "--zero-shot" in capsys.readouterr().err
    assert not (tmp_path / "b" / "manifest.json").exists()


def test_distil_with_text_expert_teacher(zero_shot, category, tmp_path):
    out = tmp_path / "student"
    assert export_main(["distil", "--teacher", "text-expert", "--teacher-model", str(zero_shot), "--images",
                        str(category / "train" / "good"), "--out", str(out), "--steps", "30", "--pool-size", "32",
                        "--quantize", "int8", "--force", "--threads", "1", "-q"]) == 0
    m = load_bundle(out).manifest
    assert m.extra["expert"] == "student" and m.extra["teacher"]["kind"] == "text-expert"
    assert m.extra["teacher"]["bundle"] == str(zero_shot.resolve())
    assert m.preprocess == load_bundle(zero_shot).manifest.preprocess  # CLIP's normalisation, 64 px
    assert "onnx_int8" in m.files


def test_bench_text_expert_quick(tmp_path):
    from linecam.bench.text_expert import main as bench_main

    assert bench_main(["--quick", "--threads", "1", "--out", str(tmp_path)]) == 0
    r = __import__("json").loads((tmp_path / "text_expert_quick.json").read_text())
    assert r["quick"] and r["threads"] == [1] and r["input"] == [64, 64]
    ms = r["runs"][0]["ms_per_frame_median"]
    assert set(ms) == {"text_fp32", "text_int8", "student_s_fp32", "student_s_int8"}
    assert all(len(v) == 3 and min(v) > 0 for v in r["runs"][0]["ms_per_frame_all"].values())
    assert "| text expert INT8 (Q/DQ) |" in (tmp_path / "text_expert_quick.md").read_text()


def test_siglip_folder_exports_too(tmp_path, prompts):
    import onnx

    from linecam.export.clip_tiny import build_siglip_folder

    folder = build_siglip_folder(tmp_path / "siglip")
    out = tmp_path / "b"
    assert export_main(["text-expert", "--clip", str(folder), "--prompts", str(prompts), "--out", str(out),
                        "--threads", "1", "-q"]) == 0  # export_onnx refuses a graph off torch's map
    m = load_bundle(out).manifest
    assert m.provenance.details["family"] == "siglip" and m.preprocess.mean == (0.5, 0.5, 0.5)
    g = onnx.load(str(out / "model.onnx")).graph
    assert [i.name for i in g.input] == ["image"] and [o.name for o in g.output] == \
        ["anomaly_map", "score", "prompt_maps"]


def test_text_leak_check_finds_a_text_tower(tmp_path):
    """The exporter's own guard must be able to fire: a graph with token input and text weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from linecam.export.text_bundle import text_leaks

    emb = numpy_helper.from_array(np.zeros((8, 4), np.float32), "text_model.embeddings.token_embedding.weight")
    g = helper.make_graph([helper.make_node("Gather", ["text_model.embeddings.token_embedding.weight",
                                                       "input_ids"], ["out"])], "g",
                          [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, 3])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 4])], [emb])
    onnx.save(helper.make_model(g), str(tmp_path / "t.onnx"))
    assert {"input_ids", "text_model.embeddings.token_embedding.weight"} <= set(text_leaks(tmp_path / "t.onnx"))


def test_distil_text_expert_needs_the_bundle(tmp_path, capsys):
    assert export_main(["distil", "--teacher", "text-expert", "--images", str(tmp_path), "--out",
                        str(tmp_path / "s")]) == 2
    assert "--teacher text-expert needs --teacher-model <text-expert bundle folder>" in capsys.readouterr().err
