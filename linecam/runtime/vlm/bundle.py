"""VLM bundle: a folder with ``manifest.json`` (kind ``"vlm"``), three ONNX graphs and a tokenizer.

Same conventions as the region-expert bundle (:mod:`linecam.bundle`): self-describing
manifest, per-file sha256 checked on load, one-line errors that say what to do. The
file entries, hashing, provenance and atomic write are :mod:`linecam.bundle`'s own.

File roles: ``vision_<prec>``, ``embedding_<prec>``, ``decoder_<prec>`` (prec one of
fp32 / fp16 / int8 / int4), ``tokenizer`` (``tokenizer.json``), plus optional extras
(``chat_template``, ``region_projector_<prec>`` with prec fp32 / fp16 / int8: the region-token
projector of :mod:`linecam.runtime.vlm.region_tokens`, described by ``extra.region_tokens``
``{k, n_features, placeholder_id, features_version}``; its parity with torch is in
``quality.region_tokens``). Bundles without a projector (every bundle before it existed) load
unchanged and get prompt-only grounding; the manifest schema did not change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from linecam.bundle import Bundle, FileEntry, Provenance, read_manifest
from linecam.errors import BundleError

#: The VLM manifest schema this linecam writes and the newest it reads (independent of
#: the region-expert manifest's version).
VLM_SCHEMA_VERSION = 1

Family = Literal["qwen2_5_vl", "idefics3", "qwen3_5", "qwen3_vl"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class TextSpec(_Strict):
    """The decoder's cache layout and the token ids the runtime needs."""

    hidden_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    #: "mrope": position_ids [3, B, S] (Qwen-VL); "rope": [B, S].
    positions: Literal["mrope", "rope"]
    image_token_id: int
    eos_token_ids: list[int]
    pad_token_id: int | None = None
    #: Hybrid decoders (Qwen3.5): "linear_attention" / "full_attention" per layer; None: all full.
    layer_types: list[str] | None = None


class QwenImageSpec(_Strict):
    """What every Qwen-VL vision tower shares: Qwen2-VL image processing (patches merged
    ``merge_size`` x ``merge_size``) and the image-pad run in the prompt."""

    patch_size: int
    temporal_patch_size: int
    merge_size: int
    head_dim: int
    rope_theta: float = 10000.0
    min_pixels: int
    max_pixels: int
    image_mean: list[float]
    image_std: list[float]
    #: Token strings around the image-pad run in the prompt.
    vision_start: str = "<|vision_start|>"
    vision_end: str = "<|vision_end|>"
    image_pad: str = "<|image_pad|>"


class QwenVisionSpec(QwenImageSpec):
    """Qwen2.5-VL vision: windowed attention, 2-D rotary positions."""

    kind: Literal["qwen2_5_vl"] = "qwen2_5_vl"
    window_size: int


class Qwen3VisionSpec(QwenImageSpec):
    """Qwen3.5 / Qwen3-VL vision: a learned position table of ``num_grid_per_side`` squared
    rows, no windows (:mod:`linecam.runtime.vlm.qwen3`)."""

    kind: Literal["qwen3_vl"] = "qwen3_vl"
    num_grid_per_side: int


class Idefics3VisionSpec(_Strict):
    kind: Literal["idefics3"] = "idefics3"
    #: Encoder tile side (pixels) and patch side.
    tile_size: int
    patch_size: int
    scale_factor: int
    #: Longest edge the whole image is resized to before tiling.
    longest_edge: int
    do_image_splitting: bool
    image_mean: list[float]
    image_std: list[float]
    image_token: str = "<image>"
    fake_image_token: str = "<fake_token_around_image>"
    global_image_token: str = "<global-img>"

    @property
    def tokens_per_tile(self) -> int:
        return (self.tile_size // self.patch_size) ** 2 // (self.scale_factor**2)


class PromptSpec(_Strict):
    """How a user prompt becomes model text: ``format`` with ``{image}`` and ``{prompt}``.

    Derived at export time from the model's chat template where it has one, so the edge
    needs no template engine.
    """

    format: str
    add_special_tokens: bool = True


class VlmManifest(_Strict):
    schema_version: int = VLM_SCHEMA_VERSION
    kind: Literal["vlm"] = "vlm"
    name: str
    family: Family
    text: TextSpec
    vision: QwenVisionSpec | Qwen3VisionSpec | Idefics3VisionSpec = Field(discriminator="kind")
    prompt: PromptSpec
    files: dict[str, FileEntry]
    provenance: Provenance
    #: Token agreement etc. measured at export time, keyed by role.
    quality: dict[str, Any] = Field(default_factory=dict)
    extra: dict[str, Any] = Field(default_factory=dict)


class VlmBundle(Bundle):
    """A loaded, verified VLM bundle (``path``, ``model_sha256`` as for every bundle)."""

    manifest: VlmManifest

    def has(self, role: str) -> bool:
        return role in self.manifest.files

    def path(self, role: str) -> Path:
        """As for every bundle; a missing precision names the exact command that adds it."""
        if role in self.manifest.files or "_" not in role:
            return super().path(role)
        prec = role.rsplit("_", 1)[1]
        have = ", ".join(sorted(r for r in self.manifest.files if r.startswith("decoder_"))) or "none"
        how = ("--fp16" if prec == "fp16" else f"--quantize {prec}") if prec in ("fp16", "int8", "int4") else ""
        hf = self.manifest.provenance.details.get("source") or "<the HF model folder>"
        raise BundleError(f"VLM bundle {self.root} has no {prec} '{role}' file (decoders: {have}): set "
                          f"vlm.precision to one it has, or re-export: export-engine vlm --model {hf} --out "
                          f"{self.root} {how}".rstrip())


def load_vlm_bundle(root: str | Path, verify: bool = True) -> VlmBundle:
    """Load ``root/manifest.json`` of kind ``vlm``; check schema version and every file's sha256."""
    root = Path(root)
    fix = "re-export it with 'export-engine vlm', or copy the whole bundle folder again"
    manifest = read_manifest(root, VlmManifest, newest_version=VLM_SCHEMA_VERSION, fix=fix, kind="vlm",
                             missing=(f"{root} is not a linecam VLM bundle; build one with "
                                      f"'export-engine vlm --model <hf folder> --out {root}'"), verify=verify)
    return VlmBundle(root, manifest)
