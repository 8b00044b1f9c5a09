"""The region projector (IAD-Unify token injection): train it with the student, export it to ONNX.

:class:`RegionProjectorNet` maps the runtime's region features
(:func:`linecam.runtime.vlm.region_tokens.region_features`: box geometry, score, the
anomaly-map crop) to ``K`` rows of the language model's hidden size. :class:`Injector`
puts those rows into a Hugging Face student exactly where the edge runtime puts them:
it inserts the same ``K`` placeholder ids at the same index
(:func:`~linecam.runtime.vlm.region_tokens.slot_index`) and overwrites their embedding
rows through a forward hook on the input embedding, so gradients reach the projector
(and, jointly, the LoRA adapters). :func:`export_projector` writes
``region_projector.onnx`` (FP32, plus FP16 and weight INT8 variants), checks it against
torch and records it, with ``extra.region_tokens``, in the VLM bundle's manifest.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from linecam.errors import BundleError
from linecam.export.vlm.hfmodel import HfVlm, Sample
from linecam.runtime.vlm.region_tokens import (
    EXTRA_KEY,
    FREQS,
    MAP_SIDE,
    N_FEATURES,
    N_GEOMETRY,
    ROLE_PREFIX,
    ProjectorInfo,
    map_crop,
    region_features,
    slot_index,
)

logger = logging.getLogger(__name__)

ONNX_FILE = "region_projector.onnx"
#: Largest |ORT - torch| accepted for the FP32 projector, relative to the rows' largest value.
PARITY_RTOL = 1e-4


class RegionProjectorNet(nn.Module):
    """features ``[B, N_FEATURES]`` -> rows ``[B, K, hidden]`` (a two-hidden-layer MLP)."""

    def __init__(self, k: int, hidden: int, n_features: int = N_FEATURES, width: int = 128,
                 scale: float = 1.0) -> None:
        super().__init__()
        self.k, self.hidden, self.n_features = k, hidden, n_features
        self.net = nn.Sequential(nn.Linear(n_features, width), nn.GELU(), nn.Linear(width, width), nn.GELU(),
                                 nn.Linear(width, k * hidden))
        with torch.no_grad():  # start near the scale of the model's token embeddings
            self.net[-1].weight.mul_(scale)
            self.net[-1].bias.zero_()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # [B, 1, F] keeps the linear layers MatMul + Add in ONNX (weight INT8 quantizes MatMul)
        return self.net(features.unsqueeze(1)).reshape(features.shape[0], self.k, self.hidden)


def placeholder_id(hf: HfVlm) -> int:
    """The token id the K slots carry (its embedding is overwritten): the pad token, else the stop token."""
    tcfg = hf.model.config.text_config if hasattr(hf.model.config, "text_config") else hf.model.config
    pad = getattr(tcfg, "pad_token_id", None)
    pid = int(pad) if pad is not None else hf.eos_ids[0]
    if pid == hf.image_token_id:
        raise BundleError(f"{hf.folder}: the pad token is the image token; region tokens need another placeholder")
    return pid


def augment(features: torch.Tensor, jitter: float = 0.01, map_drop: float = 0.5, map_noise: float = 0.1) -> torch.Tensor:
    """Training-time noise on one feature row (torch's RNG: a resumed run draws the same): the box
    centre moves by ~``jitter`` of the frame (Fourier features follow), the map crop is dropped
    with probability ``map_drop`` (the projector must not lean on one image's map texture) or
    gets noise. Keeps the projector from memorising images instead of reading geometry."""
    f = features.clone()
    c = f[:2] + torch.randn(2, device=f.device) * jitter
    f[:2] = c
    i = N_GEOMETRY
    for fr in FREQS:
        a = torch.pi * fr * c
        f[i:i + 4] = torch.stack([torch.sin(a[0]), torch.cos(a[0]), torch.sin(a[1]), torch.cos(a[1])])
        i += 4
    n = MAP_SIDE * MAP_SIDE
    if float(torch.rand(())) < map_drop:
        f[i:i + n + 1] = 0.0
    else:
        f[i:i + n] += torch.randn(n, device=f.device) * map_noise
    return f


class Injector:
    """A projector bound to one HF student; see the module doc."""

    ATTR = "linecam_region_projector"

    def __init__(self, hf: HfVlm, k: int, *, width: int = 128, lr_scale: float = 1.0,
                 augment: bool = True) -> None:
        if k < 1:
            raise BundleError(f"--region-tokens {k}: give K >= 1 (or leave it out for prompt-only grounding)")
        self.hf, self.k = hf, k
        #: The projector's learning rate relative to the adapters'.
        self.lr_scale = lr_scale
        #: Feature noise while training (:func:`augment`).
        self.augment = augment
        tcfg = hf.model.config.text_config if hasattr(hf.model.config, "text_config") else hf.model.config
        self.hidden = int(tcfg.hidden_size)
        self.net = RegionProjectorNet(k, self.hidden, width=width).to(hf.device).eval()
        self.placeholder = placeholder_id(hf)
        self._rows: torch.Tensor | None = None
        self._at = 0
        self._hook = hf.model.get_input_embeddings().register_forward_hook(self._inject)

    def _inject(self, module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        rows, at = self._rows, self._at
        if rows is None or out.dim() != 3 or out.shape[1] < at + self.k:  # decode steps: one token
            return out
        out = out.clone()
        out[0, at:at + self.k] = rows[0].to(out.dtype)
        return out

    def attach(self, model: nn.Module) -> None:
        """Make the projector a (trainable) submodule of ``model``: optimiser, checkpoint and resume see it."""
        model.add_module(self.ATTR, self.net)
        for p in self.net.parameters():
            p.requires_grad_(True)

    def detach(self, model: nn.Module) -> None:
        if hasattr(model, self.ATTR):
            delattr(model, self.ATTR)
        self.net.eval()

    def close(self) -> None:
        self._hook.remove()

    def apply(self, s: Sample, features: np.ndarray) -> Sample:
        """``s`` with the K placeholder ids inserted; the next forward overwrites their rows."""
        ids = s.inputs["input_ids"]
        at = slot_index(ids[0, :s.prompt_len].cpu().numpy(), self.hf.image_token_id)
        inputs = {}
        for name, t in s.inputs.items():
            if name in ("input_ids", "attention_mask", "mm_token_type_ids"):
                fill = self.placeholder if name == "input_ids" else (1 if name == "attention_mask" else 0)
                slot = torch.full((1, self.k), fill, dtype=t.dtype, device=t.device)
                t = torch.cat([t[:, :at], slot, t[:, at:]], dim=1)
            inputs[name] = t
        f = torch.as_tensor(np.asarray(features, np.float32), device=self.hf.device)
        if self.net.training and self.augment:
            f = augment(f)
        f = f[None]
        self._rows, self._at = self.net(f), at
        return Sample(inputs, s.prompt_len + self.k, s.target)

    @torch.no_grad()
    def generate(self, image: np.ndarray, prompt: str, features: np.ndarray, *, max_new_tokens: int) -> str:
        """Greedy description with the region rows (what the bundle will say)."""
        hf = self.hf
        net_training = self.net.training
        self.net.eval()
        s = self.apply(hf.sample(image, prompt), features)
        was_training = hf.model.training
        hf.model.eval()
        try:
            out = hf.model.generate(**s.inputs, do_sample=False, max_new_tokens=max_new_tokens,
                                    eos_token_id=hf.eos_ids, pad_token_id=hf.eos_ids[0])
        finally:
            hf.model.train(was_training)
            self.net.train(net_training)
            self._rows = None
        return hf.tokenizer.decode(out[0, s.inputs["input_ids"].shape[1]:].tolist(), skip_special_tokens=True)


class FeatureMaker:
    """Region features of training images, from the region expert as the daemon runs it
    (its anomaly map and geometry; the regions are the record's)."""

    def __init__(self, expert_bundle: str | Path, cfg: Any) -> None:
        from linecam.export.vlm.dataset import RegionLocator

        self.locator = RegionLocator(expert_bundle, image_threshold=cfg.image_threshold,
                                     pixel_threshold=cfg.pixel_threshold, min_area_px=cfg.min_region_area_px)

    def __call__(self, image_path: str, regions: list[dict[str, Any]]) -> np.ndarray:
        from linecam.preprocess import read_image

        image, depth = read_image(image_path)
        ins = self.locator.inspector.inspect(image, depth)
        crop = None
        if regions:
            top = max(regions, key=lambda r: r["score"])
            crop = map_crop(np.array(ins.anomaly_map, copy=True), top["bbox"], ins.geometry)
        return region_features(regions, (image.shape[1], image.shape[0]), crop)


def _export_onnx(net: RegionProjectorNet, path: Path) -> None:
    x = torch.zeros(1, net.n_features)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net.cpu().eval(), (x,), str(path), input_names=["features"],
                          output_names=["region_embeds"], opset_version=17, dynamo=False)


def export_projector(net: RegionProjectorNet, bundle_dir: str | Path, *, placeholder: int,
                     precisions: tuple[str, ...] = ("fp16", "int8"), probe: np.ndarray | None = None) -> dict[str, Any]:
    """Write the projector (FP32 + ``precisions``) into the VLM bundle; returns the parity numbers.

    The bundle's manifest gets the files (with their hashes) and ``extra.region_tokens``.
    ``probe``: feature rows to compare ONNX Runtime with torch on (default: seeded noise)."""
    from linecam.bundle import file_entry, write_manifest
    from linecam.export.quantize import to_fp16
    from linecam.runtime.vlm.bundle import load_vlm_bundle
    from linecam.runtime.vlm.region_tokens import RegionProjector

    root = Path(bundle_dir)
    vb = load_vlm_bundle(root)
    if net.hidden != vb.manifest.text.hidden_size:
        raise BundleError(f"region projector makes rows of {net.hidden} but the VLM in {root} reads "
                          f"{vb.manifest.text.hidden_size}: train it with this bundle's student")
    net = net.cpu().eval()
    fp32 = root / ONNX_FILE
    _export_onnx(net, fp32)
    paths = {"fp32": ONNX_FILE}
    if "fp16" in precisions:
        to_fp16(fp32, root / "region_projector_fp16.onnx")
        paths["fp16"] = "region_projector_fp16.onnx"
    if "int8" in precisions:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(fp32), str(root / "region_projector_int8.onnx"), weight_type=QuantType.QInt8,
                         per_channel=True)
        paths["int8"] = "region_projector_int8.onnx"
    info = ProjectorInfo(net.k, net.n_features, placeholder)
    files = dict(vb.manifest.files)
    for prec, rel in paths.items():
        files[f"{ROLE_PREFIX}{prec}"] = file_entry(root, rel, precision=prec)  # type: ignore[arg-type]
    extra = {**vb.manifest.extra, EXTRA_KEY: info.as_dict()}
    quality = dict(vb.manifest.quality)
    write_manifest(root, vb.manifest.model_copy(update={"files": files, "extra": extra}))  # type: ignore[arg-type]
    # parity: ONNX Runtime (the daemon's class) vs torch on probe features
    if probe is None:
        probe = np.random.default_rng(0).normal(0, 1, (8, net.n_features)).astype(np.float32)
    with torch.no_grad():
        ref = net(torch.from_numpy(probe)).numpy()
    vb = load_vlm_bundle(root)
    scale = float(np.abs(ref).max()) or 1.0
    diffs = {}
    for prec in paths:
        proj = RegionProjector(vb, prec)
        got = np.stack([proj.rows(f) for f in probe])
        diffs[prec] = round(float(np.abs(got - ref).max()) / scale, 6)
    if diffs["fp32"] > PARITY_RTOL:
        raise BundleError(f"exported region projector differs from torch by {diffs['fp32']:.1e} (relative): the "
                          f"export is wrong; report it with your torch/onnxruntime versions")
    quality[EXTRA_KEY] = {"max_rel_diff": diffs}
    write_manifest(root, vb.manifest.model_copy(update={"quality": quality}))  # type: ignore[arg-type]
    logger.info("region projector (K=%d) exported to %s; max |ORT - torch| / max |rows|: %s", net.k, root, diffs)
    return diffs
