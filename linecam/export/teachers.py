"""Region-expert teachers behind one interface: preprocessed images in, anomaly maps out.

A teacher is what the compact student learns to imitate (:mod:`linecam.export.distil`).
Every teacher takes the model input exactly as the bundle's
:class:`~linecam.preprocess.PreprocessSpec` makes it (``[N, 3, H, W]`` float32) and returns
``[N, H, W]`` float32 anomaly maps at that same resolution, so teacher and student are
compared pixel for pixel. Kinds:

* ``dinov2`` — a frozen DINOv2 backbone (transformers ``Dinov2Model`` from a local folder)
  and a memory bank of patch features of good images, greedy-coreset subsampled; the map
  is each patch's cosine distance to its nearest bank feature, upsampled and blurred
  (PatchCore's memory bank with AnomalyDINO's cosine kNN). It cannot go to TensorRT
  itself (kNN over a bank, cdist): that is why it is distilled.
* ``scratch`` — the segmentation net trained from scratch on synthetic anomalies
  (:mod:`linecam.export.scratch`), used through its exported ONNX.
* ``onnx`` / ``torchscript`` — bring your own model (e.g. exported from anomalib) with its
  preprocessing declared; a linecam bundle folder also works (its spec is read from it).
"""

from __future__ import annotations

import abc
import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from linecam.bundle import sha256_file, source_hash
from linecam.errors import BundleError
from linecam.runtime.device import first_line
from linecam.preprocess import PreprocessSpec, Preprocessor
from linecam.progress import make_progress

if TYPE_CHECKING:
    from linecam.export.scratch import SourceImage

logger = logging.getLogger(__name__)


class Teacher(abc.ABC):
    """Image -> anomaly map. ``spec`` is the preprocessing its inputs must have."""

    kind: str = "teacher"

    def __init__(self, spec: PreprocessSpec) -> None:
        self.spec = spec

    def fit(self, images: Sequence[SourceImage], *, cache: Path | None = None, progress: bool = True) -> None:
        """Learn from good images (preprocessed here with ``spec``, as needed). Default: nothing to learn."""

    @abc.abstractmethod
    def maps(self, x: np.ndarray) -> np.ndarray:
        """``[N, 3, H, W]`` float32 -> ``[N, H, W]`` float32 anomaly maps (higher = more anomalous)."""

    def describe(self) -> dict[str, Any]:
        """Provenance recorded in the student's bundle."""
        return {"kind": self.kind}


def _resize_maps(maps: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """``[N, h, w]`` -> ``[N, H, W]`` bilinear (no-op when the size already matches)."""
    if maps.shape[-2:] == tuple(hw):
        return maps.astype(np.float32, copy=False)
    t = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))[:, None]
    return F.interpolate(t, size=hw, mode="bilinear", align_corners=False)[:, 0].numpy()


# --------------------------------------------------------------------------- DINOv2 memory bank


def greedy_coreset(features: torch.Tensor, n: int, *, seed: int = 0, proj_dim: int = 128) -> torch.Tensor:
    """Indices of ``n`` rows of ``features`` chosen by greedy k-center (PatchCore).

    Each step adds the feature farthest from everything chosen so far, so the bank covers
    the good-feature distribution with few rows; distances are taken in a random
    projection (Johnson-Lindenstrauss) to make the selection cheap."""
    m = features.shape[0]
    if n >= m:
        return torch.arange(m)
    g = torch.Generator().manual_seed(seed)  # on the CPU: the same draws whatever device holds the features
    f = features
    if features.shape[1] > proj_dim:
        proj = torch.randn(features.shape[1], proj_dim, generator=g) / proj_dim**0.5
        f = features @ proj.to(features.device)
    chosen = torch.empty(n, dtype=torch.long)
    chosen[0] = int(torch.randint(m, (1,), generator=g))
    # Squared distances as |f|^2 - 2 f.c + |c|^2: one matrix-vector product per step (cdist
    # against a single row costs ~4x more on the CPU); the order of the maxima is the same.
    sq = (f * f).sum(1)

    def d2(i: int) -> torch.Tensor:
        return (sq - 2 * (f @ f[i]) + sq[i]).clamp_min_(0)

    dist = d2(int(chosen[0]))
    for i in range(1, n):
        idx = int(torch.argmax(dist))
        chosen[i] = idx
        dist = torch.minimum(dist, d2(idx))
    return chosen


def build_bank(features: torch.Tensor, n: int, *, seed: int, cache: Path | None) -> torch.Tensor:
    """The memory bank of a feature-bank teacher: ``n`` greedy-coreset rows of ``features``,
    written atomically to ``cache`` when given (a later fit with the same key loads it)."""
    logger.info("coreset: %d of %d patch features", n, features.shape[0])
    bank = features[greedy_coreset(features, n, seed=seed).to(features.device)].contiguous()
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".tmp")
        torch.save(bank.cpu(), tmp)  # a CPU tensor: the cache loads on a machine without the GPU too
        tmp.replace(cache)
    return bank


class Dinov2Teacher(Teacher):
    """Frozen DINOv2 + coreset memory bank + cosine 1-NN distance per patch."""

    kind = "dinov2"

    def __init__(self, model: Any, spec: PreprocessSpec, *, source: str = "(in memory)",
                 source_sha256: str | None = None, coreset_ratio: float = 0.1, max_bank: int = 16384,
                 blur_sigma: float | None = None, batch_size: int = 8, seed: int = 0) -> None:
        super().__init__(spec)
        if not 0 < coreset_ratio <= 1:
            raise BundleError(f"coreset ratio must be in (0, 1], got {coreset_ratio}")
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        cfg = model.config
        self.patch = int(cfg.patch_size)
        h, w = spec.input_size
        if h % self.patch or w % self.patch:
            raise BundleError(f"input size {h}x{w} is not a multiple of the DINOv2 patch size {self.patch}: "
                              f"choose e.g. {self.patch * 16}x{self.patch * 16}")
        self.grid = (h // self.patch, w // self.patch)
        self.n_skip = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)  # CLS (+ registers)
        self.source = source
        self.source_sha256 = source_sha256
        self.coreset_ratio = coreset_ratio
        self.max_bank = max_bank
        # Blur the upsampled patch map (PatchCore uses sigma 4 at 224 px): one patch = 14 px.
        self.blur_sigma = blur_sigma if blur_sigma is not None else self.patch * 0.3
        self.batch_size = batch_size
        self.seed = seed
        self.bank: torch.Tensor | None = None

    @classmethod
    def from_folder(cls, folder: str | Path, spec: PreprocessSpec, **kwargs: Any) -> "Dinov2Teacher":
        folder = Path(folder)
        cfg_path = folder / "config.json"
        if not cfg_path.is_file():
            raise BundleError(f"{folder} has no config.json: point --teacher-model at a local Hugging Face "
                              "DINOv2 folder (config.json + model.safetensors)")
        try:
            model_type = json.loads(cfg_path.read_text()).get("model_type")
        except (OSError, ValueError) as e:
            raise BundleError(f"cannot read {cfg_path} ({e}): the model folder is damaged") from None
        if model_type not in ("dinov2", "dinov2_with_registers"):
            raise BundleError(f"{folder} holds a {model_type!r} model, not DINOv2: give a DINOv2 folder "
                              "(e.g. facebook/dinov2-small downloaded with its config)")
        from transformers import AutoModel

        try:
            model = AutoModel.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as e:
            raise BundleError(f"cannot load DINOv2 from {folder}: {first_line(e)}") from None
        weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
        digest = source_hash([sha256_file(p) for p in weights]) if weights else None
        return cls(model, spec, source=str(folder.resolve()), source_sha256=digest, **kwargs)

    @torch.no_grad()
    def features(self, x: np.ndarray) -> torch.Tensor:
        """``[N, 3, H, W]`` -> L2-normalised patch features ``[N, gh*gw, C]``."""
        out = self.model(pixel_values=torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
        tokens = out.last_hidden_state[:, self.n_skip:, :]
        if tokens.shape[1] != self.grid[0] * self.grid[1]:
            raise BundleError(f"DINOv2 returned {tokens.shape[1]} patch tokens, expected "
                              f"{self.grid[0]}x{self.grid[1]}: unsupported model variant")
        return F.normalize(tokens.float(), dim=-1)

    def fit(self, images: Sequence[SourceImage], *, cache: Path | None = None, progress: bool = True) -> None:
        if cache is not None and cache.is_file():
            self.bank = torch.load(cache, weights_only=True)
            logger.info("memory bank loaded from %s (%d features)", cache, self.bank.shape[0])
            return
        feats = []
        bar = make_progress(progress)
        with bar:
            pre = Preprocessor(self.spec)
            task = bar.add_task("DINOv2 features of good images", total=len(images), info="")
            for i in range(0, len(images), self.batch_size):  # preprocessed batch by batch: bounded memory
                batch = np.concatenate([pre(s.image, s.bit_depth, copy=True) for s in images[i:i + self.batch_size]])
                feats.append(self.features(batch).reshape(-1, self.model.config.hidden_size))
                bar.update(task, advance=batch.shape[0])
        allf = torch.cat(feats)
        n = min(self.max_bank, max(1, int(round(allf.shape[0] * self.coreset_ratio))))
        self.bank = build_bank(allf, n, seed=self.seed, cache=cache)

    @torch.no_grad()
    def maps(self, x: np.ndarray) -> np.ndarray:
        if self.bank is None:
            raise RuntimeError("Dinov2Teacher.fit() must run before maps()")
        out = np.empty((x.shape[0], *self.spec.input_size), np.float32)
        for i in range(0, x.shape[0], self.batch_size):
            f = self.features(x[i:i + self.batch_size])  # [n, P, C]
            n = f.shape[0]
            flat = f.reshape(-1, f.shape[-1])
            best = torch.full((flat.shape[0],), -2.0)
            for j in range(0, self.bank.shape[0], 8192):  # bounded memory for big banks
                best = torch.maximum(best, (flat @ self.bank[j:j + 8192].T).amax(dim=1))
            dist = (1.0 - best).clamp_min(0).reshape(n, 1, *self.grid)
            up = F.interpolate(dist, size=self.spec.input_size, mode="bilinear", align_corners=False)[:, 0]
            for k in range(n):
                out[i + k] = cv2.GaussianBlur(up[k].numpy(), (0, 0), self.blur_sigma)
        return out

    def describe(self) -> dict[str, Any]:
        cfg = self.model.config
        return {"kind": self.kind, "source": self.source, "source_sha256": self.source_sha256,
                "hidden_size": int(cfg.hidden_size), "layers": int(cfg.num_hidden_layers),
                "patch_size": self.patch, "bank_size": int(self.bank.shape[0]) if self.bank is not None else 0,
                "coreset_ratio": self.coreset_ratio, "blur_sigma": self.blur_sigma,
                "distance": "cosine, nearest neighbour"}


# --------------------------------------------------------------------------- bring your own


def _pick_map(outputs: Sequence[np.ndarray], names: Sequence[str], want: str | None, where: str) -> int:
    if want is not None:
        if want not in names:
            raise BundleError(f"{where} has no output {want!r} (it has: {', '.join(names)}): "
                              "give --teacher-output one of those")
        return list(names).index(want)
    for i, o in enumerate(outputs):
        if o.ndim in (3, 4) and (o.ndim == 3 or o.shape[1] == 1) and min(o.shape[-2:]) > 1:
            return i
    shapes = ", ".join(f"{n} {tuple(o.shape)}" for n, o in zip(names, outputs))
    raise BundleError(f"{where} returns no anomaly map ([N, 1, h, w] or [N, h, w]); its outputs are {shapes}: "
                      "name the right one with --teacher-output")


class OnnxTeacher(Teacher):
    """An ONNX model mapping the preprocessed image to an anomaly map (ONNX Runtime CPU)."""

    kind = "onnx"

    def __init__(self, path: str | Path, spec: PreprocessSpec, *, output: str | None = None,
                 threads: int | None = None) -> None:
        super().__init__(spec)
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise BundleError(f"teacher model {self.path} does not exist: give an .onnx file")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.sess = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise BundleError(f"cannot load teacher {self.path}: {first_line(e)[:200]}") from None
        inp = self.sess.get_inputs()
        if len(inp) != 1:
            raise BundleError(f"teacher {self.path} has {len(inp)} inputs; linecam teachers take one image input")
        self.input_name = inp[0].name
        shape = inp[0].shape
        want = [3, *spec.input_size]
        fixed = [d for d in shape[1:]]
        if len(fixed) != 3 or any(isinstance(d, int) and d != e for d, e in zip(fixed, want)):
            raise BundleError(f"teacher {self.path} takes input {shape}, but the declared preprocessing gives "
                              f"[N, {want[0]}, {want[1]}, {want[2]}]: fix --size / the teacher's spec")
        self.batch_fixed = isinstance(shape[0], int)
        self.sha256 = sha256_file(self.path)  # once: describe() is asked for it at every cache key
        self.output_names = [o.name for o in self.sess.get_outputs()]
        self.output = output
        self._index: int | None = None

    def maps(self, x: np.ndarray) -> np.ndarray:
        if self.batch_fixed:
            parts = [self._run(x[i:i + 1]) for i in range(x.shape[0])]
            return np.concatenate(parts)
        return self._run(x)

    def _run(self, x: np.ndarray) -> np.ndarray:
        outs = self.sess.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})
        if self._index is None:
            self._index = _pick_map(outs, self.output_names, self.output, f"teacher {self.path}")
        m = np.asarray(outs[self._index], dtype=np.float32)
        m = m[:, 0] if m.ndim == 4 else m
        return _resize_maps(m, self.spec.input_size)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "source": str(self.path.resolve()), "source_sha256": self.sha256,
                "output": self.output or (self.output_names[self._index] if self._index is not None else None)}


class TorchScriptTeacher(Teacher):
    """A TorchScript module (``torch.jit.save``) mapping the preprocessed image to an anomaly map."""

    kind = "torchscript"

    def __init__(self, path: str | Path, spec: PreprocessSpec, *, output: str | None = None,
                 batch_size: int = 8) -> None:
        super().__init__(spec)
        self.path = Path(path)
        if not self.path.is_file():
            raise BundleError(f"teacher model {self.path} does not exist: give a TorchScript .pt file")
        try:
            self.module = torch.jit.load(str(self.path), map_location="cpu").eval()
        except (RuntimeError, ValueError) as e:
            raise BundleError(f"cannot load {self.path} as TorchScript ({first_line(e)[:160]}): "
                              "save it with torch.jit.script/trace + torch.jit.save") from None
        self.sha256 = sha256_file(self.path)
        self.output = output
        self.batch_size = batch_size

    @torch.no_grad()
    def maps(self, x: np.ndarray) -> np.ndarray:
        parts = []
        for i in range(0, x.shape[0], self.batch_size):
            res = self.module(torch.from_numpy(np.ascontiguousarray(x[i:i + self.batch_size], dtype=np.float32)))
            if isinstance(res, dict):
                names, outs = list(res), [v.numpy() for v in res.values()]
            elif isinstance(res, (tuple, list)):
                names, outs = [str(k) for k in range(len(res))], [v.numpy() for v in res]
            else:
                names, outs = ["0"], [res.numpy()]
            m = outs[_pick_map(outs, names, self.output, f"teacher {self.path}")].astype(np.float32)
            parts.append(_resize_maps(m[:, 0] if m.ndim == 4 else m, self.spec.input_size))
        return np.concatenate(parts)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "source": str(self.path.resolve()), "source_sha256": self.sha256}


def sigmoid_of_scratch_map(m: np.ndarray) -> np.ndarray:
    """The probability ``sigmoid(z)`` behind a scratch map ``m = sigmoid(z) + max(0, z)``: ``m``
    itself below 0.5; above, ``z`` solves ``z = m - sigmoid(z)`` (a contraction: sigmoid' <= 1/4)."""
    out = np.array(m, dtype=np.float32)
    sel = out > 0.5
    hi = out[sel].astype(np.float64)
    z = np.maximum(hi - 0.75, 0.0)
    for _ in range(30):  # error shrinks 4x per step: 30 steps are far below float32 precision
        z = hi - 1.0 / (1.0 + np.exp(-z))
    out[sel] = 1.0 / (1.0 + np.exp(-z))
    return out


class BundleTeacher(OnnxTeacher):
    """A linecam region-expert bundle as teacher (its FP32 ONNX and its preprocessing).

    A scratch expert's unbounded map (issue 21) is handed to the student as the probability it
    was before (:func:`sigmoid_of_scratch_map`): regressing the unbounded one (defects up to
    ~3500x the good-pixel unit) left the INT8 student 17.8 % of its map range off FP32, past the
    accuracy gate's 10 % (measured on tests/test_region_expert_e2e.py's category)."""

    def __init__(self, folder: str | Path, *, kind: str = "onnx", threads: int | None = None) -> None:
        from linecam.bundle import load_bundle
        from linecam.export.scratch import LEGACY_MAP_SCALE, MAP_SCALE

        bundle = load_bundle(folder)
        role = bundle.pick("onnxruntime", "fp32")
        super().__init__(bundle.path(role), bundle.manifest.preprocess,
                         output=bundle.manifest.outputs.anomaly_map.name, threads=threads)
        self.kind = kind
        self.bundle = bundle
        extra = bundle.manifest.extra
        # The teacher's map units, in the student's provenance: a scratch bundle from before issue 21
        # has no "map_scale" and a sigmoid map already.
        self.map_scale = extra.get("map_scale") or (LEGACY_MAP_SCALE if extra.get("expert") == "scratch" else None)
        self.to_probability = extra.get("expert") == "scratch" and self.map_scale == MAP_SCALE

    def maps(self, x: np.ndarray) -> np.ndarray:
        m = super().maps(x)
        return sigmoid_of_scratch_map(m) if self.to_probability else m

    def describe(self) -> dict[str, Any]:
        scale = {"map_scale": self.map_scale} if self.map_scale else {}
        if self.to_probability:
            scale["student_learns"] = "sigmoid"  # part of the pool's cache key
        return {**super().describe(), "kind": self.kind, "bundle": str(self.bundle.root.resolve()),
                "bundle_sha256": self.bundle.model_sha256, **scale}


def load_spec(path: str | Path) -> PreprocessSpec:
    """A :class:`PreprocessSpec` from a YAML/JSON file (the teacher's declared preprocessing)."""
    import yaml
    from pydantic import ValidationError

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise BundleError(f"cannot read preprocessing spec {p}: {e}") from None
    if isinstance(data, dict) and "preprocess" in data:  # a whole manifest.json works too
        data = data["preprocess"]
    try:
        return PreprocessSpec.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        raise BundleError(f"{p}: field '{'.'.join(map(str, err['loc']))}': {err['msg']}; the spec needs "
                          "input_size [h, w] and may set interpolation, crop, color_order, mean, std") from None


def scratch_teacher(images: str | Path, work: Path, input_size: tuple[int, int], *, steps: int, seed: int,
                    holdout: float, base_width: int = 12, threads: int | None = None,
                    progress: bool = True, encoder: str = "none", encoder_lr_scale: float = 0.0,
                    device: str = "auto") -> BundleTeacher:
    """Train the scratch expert (cached in ``work``) and use it as teacher.

    It is fitted with the same ``seed`` and ``holdout`` as the distillation, hence on the
    same training split: the held-out images stay unseen by teacher and student alike."""
    from linecam.bundle import load_bundle
    from linecam.export.scratch import MAP_SCALE, fit_scratch_expert, list_images

    # Keyed by the images' content, not the folder's name: edited images must retrain the teacher;
    # and by the map scale: a cached teacher from before issue 21 (saturating maps) is not reused;
    # and by a pretrained encoder (left out for none, so from-scratch caches keep their key), and
    # its learning-rate share when it is fine-tuned (left out when frozen, so those keep theirs).
    content = source_hash([s.sha256 for s in list_images(images)])
    enc: list = [] if encoder == "none" else [encoder] + ([encoder_lr_scale] if encoder_lr_scale else [])
    key = hashlib.sha256(json.dumps([content, list(input_size), steps, seed, holdout,
                                     base_width, MAP_SCALE] + enc).encode()).hexdigest()[:12]
    folder = work / f"teacher-scratch-{key}"
    try:
        load_bundle(folder)
        logger.info("scratch teacher reused from %s", folder)
    except BundleError:
        fit_scratch_expert(images, folder, input_size=input_size, steps=steps, seed=seed, holdout=holdout,
                           base_width=base_width, threads=threads, progress=progress, encoder=encoder,
                           encoder_lr_scale=encoder_lr_scale, device=device)
    return BundleTeacher(folder, kind="scratch", threads=threads)
