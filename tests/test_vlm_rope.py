"""Host-side position math (numpy, runtime) vs transformers' own implementation (torch)."""

from __future__ import annotations

import numpy as np
import pytest

from linecam.runtime.vlm import rope

torch = pytest.importorskip("torch")
vision_utils = pytest.importorskip("transformers.vision_utils")

GRIDS = [[(1, 8, 12)], [(1, 4, 4), (1, 6, 10)], [(2, 8, 8)], [(1, 18, 26)]]


@pytest.mark.parametrize("grids", GRIDS)
def test_vision_position_ids_match(grids):
    ref = vision_utils.get_vision_position_ids(torch.tensor(grids), 2).numpy()
    np.testing.assert_array_equal(rope.vision_position_ids(grids, 2), ref)


@pytest.mark.parametrize("grids", GRIDS)
@pytest.mark.parametrize("window", [56, 112])
def test_window_index_matches(grids, window):
    widx, cu = vision_utils.get_vision_window_index(torch.tensor(grids), spatial_merge_size=2, window_size=window,
                                                    patch_size=14)
    ours_idx, ours_cu = rope.vision_window_index(grids, 2, window, 14)
    np.testing.assert_array_equal(ours_idx, widx.numpy())
    np.testing.assert_array_equal(ours_cu, cu.numpy())


def test_vision_rotary_matches():
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionRotaryEmbedding

    vc = Qwen2_5_VLConfig(vision_config=dict(hidden_size=64, num_heads=4)).vision_config
    mod = Qwen2_5_VLVisionRotaryEmbedding(vc)
    grids = [(1, 6, 10)]
    pos = rope.vision_position_ids(grids, 2)
    cos_ref, sin_ref = mod(torch.zeros(1), torch.from_numpy(pos))
    cos, sin = rope.vision_rotary(pos, 16, 10000.0)
    np.testing.assert_allclose(cos, cos_ref.numpy(), atol=1e-6)
    np.testing.assert_allclose(sin, sin_ref.numpy(), atol=1e-6)


def test_block_mask():
    m = rope.block_mask(np.array([0, 2, 5]))
    assert m.shape == (5, 5)
    allowed = m == 0
    expect = np.zeros((5, 5), bool)
    expect[:2, :2] = True
    expect[2:, 2:] = True
    np.testing.assert_array_equal(allowed, expect)
    assert m.min() == np.finfo(np.float32).min


def test_qwen_vision_inputs_permute_consistently():
    grids = [(1, 8, 12)]
    v = rope.qwen_vision_inputs(grids, merge=2, window_size=56, patch_size=14, head_dim=16)
    n = 96
    assert v.rotary_cos.shape == (n, 16) and v.full_mask.shape == (n, n)
    np.testing.assert_array_equal(v.window_index[v.reverse_index], np.arange(n // 4))
    # Each window is a block of whole merge units (4 patches), and windows tile the image.
    assert (v.window_mask == 0).sum() < (v.full_mask == 0).sum() == n * n


@pytest.mark.parametrize("layout", ["one", "two_images", "image_first"])
def test_mrope_positions_match_get_rope_index(layout):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel

    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 1e4}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=42, num_heads=4, out_hidden_size=32),
        image_token_id=3, video_token_id=4, vision_start_token_id=5, vision_end_token_id=6)
    model = Qwen2_5_VLModel(cfg)
    img = 3
    if layout == "one":
        grids, ids = [(1, 8, 12)], [10, 11, 5] + [img] * 24 + [6, 12, 13]
    elif layout == "two_images":
        grids, ids = [(1, 4, 4), (1, 6, 10)], [10, 5] + [img] * 4 + [6, 11, 5] + [img] * 15 + [6, 12]
    else:
        grids, ids = [(1, 4, 6)], [img] * 6 + [6, 12, 13, 14]
    ids_t = torch.tensor([ids])
    ref, delta = model.get_rope_index(ids_t, mm_token_type_ids=(ids_t == img).int(),
                                      image_grid_thw=torch.tensor(grids))
    pos, d = rope.mrope_positions(ids, img, grids, 2)
    np.testing.assert_array_equal(pos, ref[:, 0].numpy())
    assert d == int(delta[0, 0])


def test_mrope_rejects_mismatched_image_run():
    with pytest.raises(ValueError, match="does not match"):
        rope.mrope_positions([1, 3, 3, 3, 2], 3, [(1, 4, 4)], 2)
