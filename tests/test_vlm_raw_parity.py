"""From a raw RGB image and a text prompt: transformers' processor + generate == linecam's runtime.

For every exported family, a tiny random-weight model folder is written with a real
byte-level BPE tokenizer, the family's chat template and its image processor config
(built offline, :mod:`linecam.export.vlm.tiny_processor`). Hugging Face's own processor
renders the chat template, resizes / splits the image and tokenizes; ``model.generate``
decodes greedily. linecam's runtime gets the same RGB array and prompt text and does all
of that itself. Token ids, image grids, pixel values and greedy tokens must be identical,
for images that need resizing (and, for Idefics3, splitting into tiles) and one that does not.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

from linecam.export.cli import main as export_main  # noqa: E402
from linecam.export.vlm.export import load_hf_model  # noqa: E402
from linecam.export.vlm.processor import load_hf_processor  # noqa: E402
from linecam.export.vlm.tiny import build_model_folder  # noqa: E402
from linecam.runtime.vlm.engine import VlmEngine  # noqa: E402
from vlm_cache import cache_tensors  # noqa: E402

PROMPT = "Describe the defect in box x=3, y=4, area 12 px."
N_NEW = 12


@pytest.fixture(scope="module", params=["qwen3_5", "qwen3_vl", "qwen2_5_vl", "idefics3"])
def family(request, tmp_path_factory):
    fam = request.param
    root = tmp_path_factory.mktemp(f"raw_{fam}")
    model_dir = build_model_folder(fam, root / "model", tokenizer="bpe", seed=1)
    assert export_main(["vlm", "--model", str(model_dir), "--out", str(root / "bundle"), "--quantize", ""]) == 0
    model, _ = load_hf_model(model_dir)
    return fam, load_hf_processor(model_dir), model, VlmEngine(root / "bundle")


def _image(h, w, seed):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img[h // 3: h // 2, w // 4: w // 2] = 255
    return img


def test_bundle_prompt_is_the_chat_template(family):
    fam, proc, _, eng = family
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    image = {"idefics3": "<image>"}.get(fam, "<|vision_start|><|image_pad|><|vision_end|>")
    assert eng.manifest.prompt.format.replace("{image}", image).replace("{prompt}", PROMPT) == text


@pytest.mark.parametrize("shape", [(90, 130), (150, 100), (64, 64), (300, 41)])
def test_raw_image_and_text_give_generates_tokens(family, shape):
    fam, proc, model, eng = family
    img = _image(*shape, seed=shape[0])
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    inputs = proc(text=[text], images=[Image.fromarray(img)], return_tensors="pt")
    enc = eng.encode(img, PROMPT)
    assert enc.input_ids.tolist() == inputs["input_ids"].tolist()
    theirs = inputs["pixel_values"].numpy()
    if fam == "idefics3":
        theirs = theirs[0]  # [images, tiles, ...] for one image
        assert inputs["pixel_attention_mask"].numpy().all()  # full tiles, no padding
    else:
        assert [list(g) for g in enc.grids] == inputs["image_grid_thw"].tolist()
    ours = enc.vision_feeds["pixel_values"]
    assert ours.shape == theirs.shape
    np.testing.assert_array_equal(ours, theirs)
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=N_NEW, eos_token_id=None, pad_token_id=0)
    ref = out[0, inputs["input_ids"].shape[1]:].tolist()
    got = eng.generate(img, PROMPT, max_new_tokens=N_NEW, stop_token_ids=[])
    assert got.tokens == ref and len(set(ref)) >= 2  # random weights: still not one repeated token


def test_idefics3_splits_like_the_processor(family):
    fam, proc, _, eng = family
    if fam != "idefics3":
        pytest.skip("image splitting is Idefics3's")
    img = _image(90, 130, 5)
    inputs = proc(text=["<image>x"], images=[Image.fromarray(img)], return_tensors="np")
    enc = eng.encode(img, "x")
    n_tiles = inputs["pixel_values"].shape[1]
    assert n_tiles > 1 and enc.vision_feeds["pixel_values"].shape[0] == n_tiles


def test_cache_after_prefill_and_each_step_is_transformers(family):
    """Every cache tensor the decoder returns (KV; Qwen3.5's conv / recurrent states) equals
    transformers' cache after the prefill and after each decode step, from the raw inputs."""
    fam, proc, model, eng = family
    img = _image(90, 130, 3)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    inputs = proc(text=[text], images=[Image.fromarray(img)], return_tensors="pt")
    states: list[list[np.ndarray]] = []
    eng.generate_encoded(eng.encode(img, PROMPT), max_new_tokens=4, stop_token_ids=[], on_state=states.append)
    for k in range(1, 5):
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=k, eos_token_id=None, pad_token_id=0,
                                 return_dict_in_generate=True)
        theirs = cache_tensors(out.past_key_values)
        assert len(theirs) == len(states[k - 1])
        for a, b in zip(states[k - 1], theirs):
            assert a.shape == b.shape
            np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
