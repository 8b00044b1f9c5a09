"""Random-weight CLIP folders for tests and benchmarks (no download: built from a CLIPConfig).

``build_clip_folder(out, size=...)`` writes a Hugging Face folder (config, safetensors, a
word-level ``tokenizer.json``) that ``export-engine text-expert --clip`` reads exactly like a
downloaded CLIP. ``"tiny"`` is a 2-layer, 32-wide model at 64 px; ``"vit-b-16"`` has
CLIP ViT-B/16's real dimensions (the benchmark's size); ``build_siglip_folder`` a tiny SigLIP. Random weights localise nothing:
these folders test the plumbing and time the graph, never accuracy of the text side.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch

Size = Literal["tiny", "vit-b-16"]
SPECIALS = ["<|startoftext|>", "<|endoftext|>"]


def _write_tokenizer(out: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    from linecam.export.prompts import ABNORMAL_STATES, NORMAL_STATES, TEMPLATES

    words: list[str] = []
    text = " ".join(TEMPLATES + NORMAL_STATES + ABNORMAL_STATES) + " metal bracket scratch dent stain rim on the in"
    for wd in text.replace("{}", " ").replace(".", " . ").lower().split():
        if wd not in words:
            words.append(wd)
    vocab = {t: i for i, t in enumerate(SPECIALS + ["[UNK]"] + words)}
    for i in range(len(vocab), vocab_size):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[(s, vocab[s]) for s in SPECIALS])
    tok.add_special_tokens(SPECIALS)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIALS[0], "eos_token": SPECIALS[1],
        "pad_token": SPECIALS[1], "unk_token": "[UNK]", "model_max_length": 77}))


def build_siglip_folder(out: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny random-weight SigLIP folder (64 px, patch 8) to ``out`` and return it."""
    from transformers import SiglipConfig, SiglipModel

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64, vocab_size=512, pad_token_id=1, eos_token_id=1, bos_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  image_size=64, patch_size=8)
    torch.manual_seed(seed)
    SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).eval().save_pretrained(str(out))
    _write_tokenizer(out, 512)
    return out


def build_clip_folder(out: str | Path, *, size: Size = "tiny", seed: int = 0) -> Path:
    """Write a random-weight CLIP folder to ``out`` and return it."""
    from transformers import CLIPConfig, CLIPModel

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab = 512
    if size == "tiny":
        text = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=77)
        vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                      image_size=64, patch_size=8)
        proj = 24
    else:  # CLIP ViT-B/16 (openai/clip-vit-base-patch16) dimensions
        text = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                    max_position_embeddings=77)
        vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      image_size=224, patch_size=16)
        proj = 512
    # eos = <|endoftext|>'s id (not 2): the text tower pools at its first occurrence
    text.update(vocab_size=vocab, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=proj)
    torch.manual_seed(seed)
    CLIPModel(cfg).eval().save_pretrained(str(out))
    _write_tokenizer(out, vocab)
    return out
