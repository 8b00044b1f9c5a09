"""The text-prompted region expert: CLIP / SigLIP patch tokens against baked prompt embeddings.

WinCLIP (zero-shot) and WinCLIP+ (few-shot) in one ``nn.Module`` that exports to a plain
region-expert ONNX:

1. the vision tower's patch tokens (CLIP: after ``post_layernorm`` and ``visual_projection``,
   as AnomalyCLIP / APRIL-GAN read them; SigLIP: its normed last hidden state), averaged over
   ``k x k`` windows for every window scale ``k`` (WinCLIP's multi-scale windows, done on the
   token grid so the image is encoded once, not once per window), L2-normalised;
2. per window and abnormal prompt ``a``: ``softmax(T * [cos(f, normal), cos(f, abnormal_a)])[1]``
   (the probability of "abnormal" against the normal ensemble), averaged over the scales;
3. few-shot: ``(1 - max cos(f, bank)) / 2`` against a memory bank of good patch features,
   mixed in with weight ``1 - text_weight``;
4. the anomaly map is the maximum over abnormal prompts, upsampled to the input; the image
   score averages the global token's abnormal probability and the map's maximum.

The prompt embeddings are computed once when the module is built (:func:`embed_prompts`) and
held as buffers, so the exported graph has them as constants and carries no text encoder:
the edge runs the image tower alone. With named referring prompts the module has a third
output, ``prompt_maps`` ``[1, K, H, W]`` (one map per name, same units as the anomaly map,
which is their maximum when there is no generic abnormal ensemble).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from linecam.bundle import sha256_file, source_hash
from linecam.errors import BundleError
from linecam.export.prompts import PromptSpec
from linecam.runtime.device import first_line

logger = logging.getLogger(__name__)

#: CLIP's normalisation (used when a CLIP folder has no preprocessor_config.json).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: CLIP's learned logit scale is ~100 in every released checkpoint; fixed so that a random-
#: weight model behaves like a trained one and maps from different weights share units.
TEMPERATURE = 100.0
DEFAULT_SCALES = (1, 3)
PROMPT_MAPS = "prompt_maps"


@dataclass
class ClipFolder:
    """A loaded CLIP / SigLIP model folder."""

    model: Any  # CLIPModel | SiglipModel
    tokenizer: Any
    family: str  # "clip" | "siglip"
    image_size: int
    patch_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str
    sha256: str | None


def load_clip(folder: str | Path) -> ClipFolder:
    """A local Hugging Face CLIP or SigLIP folder (config, weights, tokenizer)."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not folder.is_dir() or not cfg_path.is_file():
        raise BundleError(f"--clip {folder} is not a model folder (no config.json): give a local Hugging Face "
                          "CLIP or SigLIP folder, e.g. one saved with CLIPModel.save_pretrained")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise BundleError(f"cannot read {cfg_path} ({e}): the model folder is damaged") from None
    family = {"clip": "clip", "siglip": "siglip"}.get(str(cfg.get("model_type")))
    if family is None:
        raise BundleError(f"--clip {folder} holds a {cfg.get('model_type')!r} model: give a CLIP (model_type "
                          "'clip') or SigLIP ('siglip') folder with both towers")
    from transformers import AutoTokenizer, CLIPModel, SiglipModel

    cls = CLIPModel if family == "clip" else SiglipModel
    try:
        # eager attention: the one the TorchScript ONNX exporter turns into plain MatMul/Softmax
        model = cls.from_pretrained(str(folder), local_files_only=True, attn_implementation="eager").eval()
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, ImportError) as e:
        raise BundleError(f"cannot load {family.upper()} from {folder}: {first_line(e)[:200]}; the folder needs "
                          "config.json, the weights and the tokenizer files") from None
    # the family's own normalisation unless the folder says otherwise (SigLIP's is 0.5 / 0.5)
    mean, std = (CLIP_MEAN, CLIP_STD) if family == "clip" else ((0.5,) * 3, (0.5,) * 3)
    pp = folder / "preprocessor_config.json"
    if pp.is_file():
        try:
            d = json.loads(pp.read_text())
            mean, std = tuple(d.get("image_mean", mean)), tuple(d.get("image_std", std))
        except (OSError, ValueError):
            logger.warning("cannot read %s: using %s's default mean/std", pp, family)
    vc = model.config.vision_config
    weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    digest = source_hash([sha256_file(p) for p in weights]) if weights else None
    return ClipFolder(model, tokenizer, family, int(vc.image_size), int(vc.patch_size), mean, std,  # type: ignore[arg-type]
                      str(folder.resolve()), digest)


@torch.no_grad()
def embed_texts(clip: ClipFolder, sentences: Sequence[str], batch: int = 64) -> torch.Tensor:
    """L2-normalised text embeddings ``[n, D]`` of ``sentences``."""
    out = []
    pad: dict[str, Any] = {"padding": "max_length", "max_length": 64} if clip.family == "siglip" else {"padding": True}
    for i in range(0, len(sentences), batch):
        tok = clip.tokenizer(list(sentences[i:i + batch]), truncation=True, return_tensors="pt", **pad)
        kw = {"input_ids": tok["input_ids"]}
        if "attention_mask" in tok and clip.family == "clip":
            kw["attention_mask"] = tok["attention_mask"]
        res = clip.model.get_text_features(**kw)
        out.append(res if isinstance(res, torch.Tensor) else res.pooler_output)
    return F.normalize(torch.cat(out).float(), dim=-1)


def _ensemble(clip: ClipFolder, sentences: Sequence[str]) -> torch.Tensor:
    """One embedding for a list of sentences: the normalised mean of theirs (WinCLIP)."""
    return F.normalize(embed_texts(clip, sentences).mean(0), dim=0)


@dataclass
class PromptEmbeddings:
    normal: torch.Tensor  # [D]
    abnormal: torch.Tensor  # [A, D]: the generic ensemble (if any) first, then one row per label
    labels: list[str]  # names of the last len(labels) rows of ``abnormal``


def embed_prompts(clip: ClipFolder, spec: PromptSpec) -> PromptEmbeddings:
    rows = []
    if spec.abnormal:
        rows.append(_ensemble(clip, spec.abnormal_sentences()))
    for phrases in spec.region_sentences().values():
        rows.append(_ensemble(clip, phrases))
    return PromptEmbeddings(_ensemble(clip, spec.normal_sentences()), torch.stack(rows), spec.labels)


class TextExpert(nn.Module):
    """Image -> (anomaly map, score[, prompt maps]); see the module docstring."""

    def __init__(self, clip: ClipFolder, prompts: PromptEmbeddings, input_size: tuple[int, int], *,
                 scales: Sequence[int] = DEFAULT_SCALES, text_weight: float = 0.5,
                 bank: torch.Tensor | None = None) -> None:
        super().__init__()
        if any(k < 1 or k % 2 == 0 for k in scales):
            raise BundleError(f"window scales {list(scales)}: use odd sizes >= 1 (e.g. 1,3)")
        h, w = input_size
        if (h, w) != (clip.image_size, clip.image_size):
            raise BundleError(f"input size {h}x{w}: this {clip.family.upper()} takes {clip.image_size}x"
                              f"{clip.image_size} (--size {clip.image_size})")
        self.family = clip.family
        self.vision = clip.model.vision_model  # the text tower is not referenced: not in the graph
        self.proj = clip.model.visual_projection if clip.family == "clip" else nn.Identity()
        self.input_size = (h, w)
        self.grid = (h // clip.patch_size, w // clip.patch_size)
        self.scales = tuple(int(k) for k in scales)
        self.text_weight = float(text_weight) if bank is not None else 1.0
        self.n_labels = len(prompts.labels)
        self.register_buffer("normal", prompts.normal[None].clone())  # [1, D]
        self.register_buffer("abnormal", prompts.abnormal.clone())  # [A, D]
        self.register_buffer("bank", bank.clone() if bank is not None else torch.zeros(0, prompts.normal.shape[0]))
        self.has_bank = bank is not None and bank.shape[0] > 0  # a plain bool: fixed when traced
        for p in self.parameters():
            p.requires_grad_(False)

    def tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(patch features ``[N, D, gh, gw]``, global feature ``[N, D]``), projected, not normalised."""
        out = self.vision(pixel_values=x)
        if self.family == "clip":
            t = self.proj(self.vision.post_layernorm(out.last_hidden_state))
            glob, patches = t[:, 0], t[:, 1:]
        else:  # SigLIP: last_hidden_state is already normed; the attention-pool head is its global token
            glob, patches = out.pooler_output, out.last_hidden_state
        d = patches.shape[-1]
        return patches.transpose(1, 2).reshape(-1, d, *self.grid), glob

    def patch_features(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised single-patch features ``[N * gh * gw, D]`` (what the good-image bank holds)."""
        f, _ = self.tokens(x)
        return F.normalize(f.flatten(2).transpose(1, 2).reshape(-1, f.shape[1]), dim=-1)

    def _abnormal_prob(self, f: torch.Tensor) -> torch.Tensor:
        """``f`` ``[..., D]`` normalised -> ``[..., A]`` abnormal probabilities, one per prompt."""
        sn = f @ self.normal.T  # [..., 1]
        sa = f @ self.abnormal.T  # [..., A]
        # softmax over (normal, abnormal_a) for each a: sigmoid of the scaled difference
        return torch.sigmoid(TEMPERATURE * (sa - sn))

    def maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-prompt maps ``[N, A, gh, gw]`` in final units, global score ``[N]``)."""
        f, glob = self.tokens(x)
        text = 0.0
        for k in self.scales:
            fk = f if k == 1 else F.avg_pool2d(f, k, stride=1, padding=k // 2, count_include_pad=False)
            fk = F.normalize(fk, dim=1).permute(0, 2, 3, 1)  # [N, gh, gw, D]
            text = text + self._abnormal_prob(fk)
        text = (text / len(self.scales)).permute(0, 3, 1, 2)  # [N, A, gh, gw]
        g = self._abnormal_prob(F.normalize(glob, dim=-1)).amax(dim=1)  # [N]
        if not self.has_bank:
            return text, g
        fn = F.normalize(f, dim=1).permute(0, 2, 3, 1)  # [N, gh, gw, D]
        visual = ((1.0 - (fn @ self.bank.T).amax(dim=-1)) * 0.5)[:, None]  # [N, 1, gh, gw]
        w = self.text_weight
        return w * text + (1.0 - w) * visual, w * g + (1.0 - w) * visual.flatten(1).amax(dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        per_prompt, g = self.maps(x)
        amap = per_prompt.amax(dim=1, keepdim=True)  # [N, 1, gh, gw]
        score = 0.5 * (g + amap.flatten(1).amax(dim=1))
        if not self.n_labels:
            return F.interpolate(amap, size=self.input_size, mode="bilinear", align_corners=False), score
        # Upsample each prompt's map, then take the maximum: the anomaly map is then exactly the
        # largest prompt map at every pixel, so a region above the pixel threshold always has a
        # named map above it there (upsampling the maximum would be higher than every prompt's).
        up = F.interpolate(per_prompt, size=self.input_size, mode="bilinear", align_corners=False)
        return up.amax(dim=1, keepdim=True), score, up[:, up.shape[1] - self.n_labels:]

    def describe(self) -> dict[str, Any]:
        return {"family": self.family, "grid": list(self.grid), "scales": list(self.scales),
                "text_weight": self.text_weight, "bank_size": int(self.bank.shape[0]),
                "n_abnormal_prompts": int(self.abnormal.shape[0]), "temperature": TEMPERATURE}
