"""Offline Hugging Face processors for the random-weight VLM folders (tests and benchmarks).

``write_processor_files(folder, family, fixed, vocab_size)`` writes what
``AutoProcessor.from_pretrained(folder)`` reads, built without the network: a real
byte-level BPE ``tokenizer.json`` (trained here with ``tokenizers``, the Qwen pre-tokenizer
regex, the family's special tokens pinned at the ids the model config uses), a
``tokenizer_config.json``, the family's chat template (``chat_template.jinja``, shaped
like the released one) and the image processor / processor configs. The raw-input parity
tests run transformers' own processor on these and linecam's edge preprocessing on the
exported bundle.
"""

from __future__ import annotations

import json
from pathlib import Path

from linecam.export.vlm.tiny import _PUNCT, _WORDS

#: Qwen2 / Qwen3.5 pre-tokenizer split (transformers' tokenization_qwen3_5.PRETOKENIZE_REGEX).
PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}|"""
                     r""" ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

_QWEN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' and default_system %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{{ generation_suffix }}{% endif %}")

_SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


def chat_template(family: str) -> str:
    """The family's chat template: Qwen2.5-VL's (default system prompt), Qwen3-VL's (none),
    Qwen3.5's (none; the assistant turn opens with an empty think block) or SmolVLM's."""
    if family == "idefics3":
        return _SMOLVLM_TEMPLATE
    system = "true" if family == "qwen2_5_vl" else "false"
    suffix = "<think>\n\n</think>\n\n" if family == "qwen3_5" else ""
    return (f"{{% set default_system = {system} %}}{{% set generation_suffix = {json.dumps(suffix)} %}}"
            + _QWEN_TEMPLATE)


def _corpus() -> list[str]:
    words = _WORDS + _PUNCT
    lines = [" ".join(words[i:i + 9]) for i in range(0, len(words), 3)]
    lines += ["Describe the defect in box x = 3 , y = 4 , area 12 px .", "What is a scratch ?",
              "The line inspection model flagged 1 anomalous region(s) in this 96x64 crop.",
              "Region 1: box x=10, y=12, w=30, h=8 in this crop, area 240 px, anomaly score 1.37."]
    return lines * 4


def write_bpe_tokenizer(path: Path, vocab_size: int, specials: list[str], fixed: dict[str, int]) -> None:
    """A byte-level BPE ``tokenizer.json`` of ``vocab_size`` ids; ``fixed`` pins special tokens to ids."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    def pipeline(tok: Tokenizer) -> Tokenizer:
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        return tok

    all_special = list(dict.fromkeys(specials + list(fixed)))
    n_bpe = vocab_size - len(all_special)
    trainer = trainers.BpeTrainer(vocab_size=n_bpe, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok = pipeline(Tokenizer(models.BPE()))
    tok.train_from_iterator(_corpus(), trainer)
    data = json.loads(tok.to_str())
    trained = sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1])
    if len(trained) != n_bpe:
        raise ValueError(f"BPE training gave {len(trained)} tokens, wanted {n_bpe}: grow the corpus")
    ids = dict(fixed)
    taken = set(ids.values())
    for s in all_special:
        if s not in ids:
            ids[s] = next(i for i in range(vocab_size) if i not in taken)
            taken.add(ids[s])
    free = iter(i for i in range(vocab_size) if i not in taken)
    vocab = {t: next(free) for t, _ in trained}
    vocab.update({t: ids[t] for t in all_special})  # in the model's vocab, so added tokens keep these ids
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in data["model"]["merges"]]
    out = pipeline(Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)))
    for s in sorted(all_special, key=lambda s: ids[s]):
        out.add_special_tokens([AddedToken(s, special=True, normalized=False)])
    got = {s: out.token_to_id(s) for s in all_special}
    if got != {s: ids[s] for s in all_special}:
        raise ValueError(f"special token ids moved: {got}")
    out.save(str(path))


def write_processor_files(folder: Path, family: str, *, eos: str, pad: str, image_seq_len: int | None = None) -> None:
    """tokenizer_config.json, chat_template.jinja and processor_config.json next to tokenizer.json and
    preprocessor_config.json."""
    folder = Path(folder)
    cls = {"qwen2_5_vl": "Qwen2Tokenizer", "qwen3_vl": "Qwen2Tokenizer", "qwen3_5": "Qwen3_5Tokenizer",
           "idefics3": "GPT2Tokenizer"}[family]
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": cls, "eos_token": eos, "pad_token": pad, "unk_token": None, "bos_token": None,
         "model_max_length": 32768, "add_prefix_space": False, "clean_up_tokenization_spaces": False}, indent=2))
    (folder / "chat_template.jinja").write_text(chat_template(family))
    proc = {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor", "qwen3_5": "Qwen3VLProcessor",
            "idefics3": "Idefics3Processor"}[family]
    pcfg: dict = {"processor_class": proc}
    if image_seq_len is not None:
        pcfg["image_seq_len"] = image_seq_len
    (folder / "processor_config.json").write_text(json.dumps(pcfg, indent=2))
    pp_path = folder / "preprocessor_config.json"
    pp = json.loads(pp_path.read_text())
    pp["image_processor_type"] = ("Idefics3ImageProcessorPil" if family == "idefics3" else "Qwen2VLImageProcessorPil")
    pp["processor_class"] = proc
    pp_path.write_text(json.dumps(pp, indent=2))

