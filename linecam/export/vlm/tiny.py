"""Random-weight VLM folders for tests and benchmarks (no download: built from a config).

``build_model_folder(family, out, size=...)`` writes a Hugging Face model folder
(config, safetensors, ``tokenizer.json``, ``preprocessor_config.json``) that
``export-engine vlm --model`` reads exactly like a downloaded one. ``size="tiny"``
follows transformers' own test configs; ``"smolvlm-256m"`` has SmolVLM-256M's real
dimensions (the benchmark's compact architecture).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch

Family = Literal["qwen2_5_vl", "idefics3", "qwen3_5", "qwen3_vl"]
Size = Literal["tiny", "smolvlm-256m", "qwen3.5-0.8b"]

_WORDS = ("system You are a helpful assistant user User Assistant Describe describe the defect defects in image "
          "region regions box boxes at score area px of is scratch dent stain crack missing part and with on "
          "left right top bottom center surface what A The No visible small large x y w h near edge one two "
          "found inspect inspection camera line NG").split()
_PUNCT = list(".,:;=()%/-[]") + [str(d) for d in range(10)]

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>",
                 "<|vision_start|>", "<|vision_end|>"]
IDEFICS3_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>",
                     "<global-img>"] + [f"<row_{r}_col_{c}>" for r in (1, 2, 3) for c in (1, 2, 3)]


def write_word_tokenizer(path: Path, vocab_size: int, specials: list[str], fixed: dict[str, int]) -> dict[str, int]:
    """A word-level ``tokenizer.json`` whose special tokens have the ids the config expects.

    ``fixed`` pins tokens to ids (e.g. ``{"<image>": 57}``); the rest fill the remaining
    ids, padded with filler words up to ``vocab_size`` so every id decodes.
    """
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab: dict[str, int] = dict(fixed)
    free = (i for i in range(vocab_size) if i not in set(fixed.values()))
    for tok in specials + ["[UNK]"] + _PUNCT + _WORDS:
        if tok not in vocab:
            vocab[tok] = next(free)
    for i in free:
        vocab[f"w{i}"] = i
    if len(vocab) != vocab_size:
        raise ValueError(f"vocab {len(vocab)} != {vocab_size}")
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False)
                            for s in specials + [t for t in fixed if t not in specials]])
    tok.save(str(path))
    return vocab


def _qwen(size: Size):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    if size != "tiny":
        raise ValueError("only size='tiny' is defined for qwen2_5_vl")
    ids = {t: i for i, t in enumerate(QWEN_SPECIALS)}
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0},
                         bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=False),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=42, num_heads=4, out_hidden_size=32,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1], in_channels=3),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    pp = {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 24, "patch_size": 14, "temporal_patch_size": 2,
          "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
          "image_std": [0.26862954, 0.26130258, 0.27577711]}
    return Qwen2_5_VLForConditionalGeneration, cfg, pp, QWEN_SPECIALS, ids, 99


def _qwen3_5(size: Size):
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    ids = {t: i for i, t in enumerate(QWEN_SPECIALS)}
    if size == "tiny":
        vocab = 99
        text = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, linear_key_head_dim=8, linear_value_head_dim=8,
                    linear_num_key_heads=2, linear_num_value_heads=4,
                    rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "mrope_interleaved": True,
                                     "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
        vision = dict(depth=2, hidden_size=32, intermediate_size=42, num_heads=4, out_hidden_size=32,
                      num_position_embeddings=16)
        pp_pixels = (32 * 32 * 4, 32 * 32 * 24)
    elif size == "qwen3.5-0.8b":  # Qwen3.5-0.8B dimensions (random weights)
        vocab = 248320
        text = dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=24, num_attention_heads=8,
                    num_key_value_heads=2, head_dim=256, linear_key_head_dim=128, linear_value_head_dim=128,
                    linear_num_key_heads=16, linear_num_value_heads=16,
                    rope_parameters={"rope_type": "default", "mrope_section": [11, 11, 10], "mrope_interleaved": True,
                                     "rope_theta": 10000000.0, "partial_rotary_factor": 0.25})
        vision = dict(depth=12, hidden_size=768, intermediate_size=3072, num_heads=12, out_hidden_size=1024,
                      num_position_embeddings=2304)
        pp_pixels = (65536, 32 * 32 * 256)
    else:
        raise ValueError(f"size {size!r} is not defined for qwen3_5")
    cfg = Qwen3_5Config(
        text_config=dict(vocab_size=vocab, linear_conv_kernel_dim=4, max_position_embeddings=4096,
                         bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=False, **text),
        vision_config=dict(patch_size=16, spatial_merge_size=2, temporal_patch_size=2, in_channels=3, **vision),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False)
    pp = {"size": {"shortest_edge": pp_pixels[0], "longest_edge": pp_pixels[1]}, "patch_size": 16,
          "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    return Qwen3_5ForConditionalGeneration, cfg, pp, QWEN_SPECIALS, ids, vocab


def _qwen3_vl(size: Size):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    if size != "tiny":
        raise ValueError("only size='tiny' is defined for qwen3_vl")
    ids = {t: i for i, t in enumerate(QWEN_SPECIALS)}
    cfg = Qwen3VLConfig(
        text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True,
                                          "rope_theta": 5000000.0},
                         bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=False),
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=42, num_heads=4, out_hidden_size=32, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3, num_position_embeddings=16,
                           deepstack_visual_indexes=[0, 1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False)
    pp = {"size": {"shortest_edge": 32 * 32 * 4, "longest_edge": 32 * 32 * 24}, "patch_size": 16,
          "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    return Qwen3VLForConditionalGeneration, cfg, pp, QWEN_SPECIALS, ids, 99


def _idefics3(size: Size):
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    specials = IDEFICS3_SPECIALS
    fixed = {t: i for i, t in enumerate(specials)}
    if size == "tiny":
        fixed["<image>"] = 57
        vision = dict(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=37)
        text = dict(vocab_size=100, hidden_size=64, intermediate_size=64, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
        scale, vocab = 2, 100
        pp = {"size": {"longest_edge": 32}, "max_image_size": {"longest_edge": 16}, "do_image_splitting": True}
    else:  # SmolVLM-256M dimensions
        fixed["<image>"] = 49190
        vision = dict(image_size=512, patch_size=16, hidden_size=768, num_hidden_layers=12,
                      num_attention_heads=12, intermediate_size=3072)
        text = dict(vocab_size=49280, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                    rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, rms_norm_eps=1e-5)
        scale, vocab = 4, 49280
        pp = {"size": {"longest_edge": 512}, "max_image_size": {"longest_edge": 512}, "do_image_splitting": False}
    pp.update(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    text.update(model_type="llama", bos_token_id=fixed["<|im_start|>"], eos_token_id=fixed["<end_of_utterance>"],
                pad_token_id=fixed["<|endoftext|>"], tie_word_embeddings=False)
    cfg = Idefics3Config(vision_config=vision, text_config=text, scale_factor=scale,
                         image_token_id=fixed["<image>"], tie_word_embeddings=False)
    return Idefics3ForConditionalGeneration, cfg, pp, specials, fixed, vocab


#: Vocabulary of the tiny models with a byte-level BPE tokenizer (256 byte tokens + merges + specials).
BPE_VOCAB = 400


def build_model_folder(family: Family, out: str | Path, *, size: Size = "tiny", seed: int = 0,
                       tokenizer: Literal["word", "bpe"] = "word") -> Path:
    """Write a random-weight ``family`` model folder to ``out`` and return it.

    ``tokenizer="bpe"``: a byte-level BPE tokenizer, the family's chat template and processor
    configs (:mod:`linecam.export.vlm.tiny_processor`), so ``AutoProcessor`` loads the folder;
    a tiny model's vocabulary then grows to :data:`BPE_VOCAB`.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cls, cfg, pp, specials, fixed, vocab = {"qwen2_5_vl": _qwen, "idefics3": _idefics3, "qwen3_5": _qwen3_5,
                                               "qwen3_vl": _qwen3_vl}[family](size)
    if tokenizer == "bpe":
        if family == "idefics3":
            specials = specials + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)
                                   if f"<row_{r}_col_{c}>" not in specials]
        elif family == "qwen3_5":
            specials = specials + ["<think>", "</think>"]
        if vocab < BPE_VOCAB:
            vocab = BPE_VOCAB
            cfg.text_config.vocab_size = vocab
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    model.save_pretrained(str(out))
    (out / "preprocessor_config.json").write_text(json.dumps(pp, indent=2))
    if tokenizer == "bpe":
        from linecam.export.vlm.tiny_processor import write_bpe_tokenizer, write_processor_files

        write_bpe_tokenizer(out / "tokenizer.json", vocab, specials, fixed)
        idefics = family == "idefics3"
        seq = ((cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2 // cfg.scale_factor ** 2
               if idefics else None)
        write_processor_files(out, family, eos="<end_of_utterance>" if idefics else "<|im_end|>",
                              pad="<|endoftext|>", image_seq_len=seq)
    else:
        write_word_tokenizer(out / "tokenizer.json", vocab, specials, fixed)
    return out
