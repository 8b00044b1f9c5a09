"""Region-token injection (IAD-Unify): the region expert's evidence as K embedding rows.

For an NG frame the strongest region becomes a fixed-length feature vector
(:func:`region_features`: box geometry, score, a small crop of the anomaly map under the
box); the bundle's ``region_projector_<prec>`` ONNX graph turns it into ``K`` rows of the
language model's hidden size (:class:`RegionProjector`), and :func:`inject` places them
where the model reads them: right after the image tokens (after the vision end / fake
image token), *before* the text of the prompt, on K placeholder token ids whose
embedding rows the engine overwrites (:attr:`linecam.runtime.vlm.engine.Encoded.injected`).

Training (``export-engine vlm --distil-from ... --region-tokens K``) uses these very
functions, so the student is trained on the rows and slots the daemon produces.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from linecam.errors import BundleError
from linecam.runtime.session import make_session

logger = logging.getLogger(__name__)

#: Side of the anomaly-map crop in the feature vector.
MAP_SIDE = 8
#: Frequencies (times pi) of the Fourier features of the box centre.
FREQS = (1.0, 2.0, 4.0, 8.0)
#: Version of the feature layout below (stored in the manifest; a mismatch is refused).
FEATURES_VERSION = 1
N_GEOMETRY = 7
N_FEATURES = N_GEOMETRY + 4 * len(FREQS) + MAP_SIDE * MAP_SIDE + 1
#: ``VlmManifest.extra`` key describing the projector.
EXTRA_KEY = "region_tokens"
ROLE_PREFIX = "region_projector_"


def map_crop(anomaly_map: np.ndarray, bbox: Sequence[int], geometry: Any) -> np.ndarray:
    """The ``MAP_SIDE`` x ``MAP_SIDE`` anomaly-map crop under ``bbox`` (frame pixels), scaled to max 1.

    ``geometry``: the inspection's :class:`linecam.preprocess.Geometry` (frame <-> map)."""
    m = np.asarray(anomaly_map, dtype=np.float32)
    m = m.reshape(m.shape[-2:])
    mh, mw = m.shape
    sx, sy = geometry.scale_for(mh, mw)
    x, y, w, h = (float(v) for v in bbox)
    x0 = int(np.clip(np.floor((x - geometry.offset_x) / sx), 0, mw - 1))
    y0 = int(np.clip(np.floor((y - geometry.offset_y) / sy), 0, mh - 1))
    x1 = int(np.clip(np.ceil((x + w - geometry.offset_x) / sx), x0 + 1, mw))
    y1 = int(np.clip(np.ceil((y + h - geometry.offset_y) / sy), y0 + 1, mh))
    crop = cv2.resize(m[y0:y1, x0:x1], (MAP_SIDE, MAP_SIDE), interpolation=cv2.INTER_LINEAR)
    crop = np.nan_to_num(crop, nan=0.0, posinf=0.0, neginf=0.0)
    top = float(np.abs(crop).max())
    return crop / top if top > 0 else crop


def region_features(regions: Sequence[Mapping[str, Any]], image_size: tuple[int, int],
                    map_crop_8: np.ndarray | None = None) -> np.ndarray:
    """``[N_FEATURES]`` float32 for the strongest of ``regions`` (normalised dicts as in
    :class:`~linecam.runtime.vlm.prompt.GroundedPrompt`: bbox, area, score).

    Layout: centre x, y, width, height (fractions of the frame), log area fraction, log
    score, region count / 4; sin/cos of the centre at :data:`FREQS`; the map crop
    (zeros without one) and a flag saying whether there was one."""
    iw, ih = (max(1, int(v)) for v in image_size)
    out = np.zeros(N_FEATURES, dtype=np.float32)
    if not regions:
        return out
    r = max(regions, key=lambda d: float(d.get("score", d.get("max_score", 0.0))))
    x, y, w, h = (float(v) for v in r["bbox"])
    cx, cy = (x + w / 2) / iw, (y + h / 2) / ih
    score = float(r.get("score", r.get("max_score", 1.0)))
    geo = [cx, cy, w / iw, h / ih, np.log(max(float(r["area"]), 1.0) / (iw * ih)) / 10.0,
           np.log(max(score, 1e-3)), min(len(regions), 8) / 4.0]
    out[:N_GEOMETRY] = geo
    i = N_GEOMETRY
    for f in FREQS:
        out[i:i + 4] = (np.sin(np.pi * f * cx), np.cos(np.pi * f * cx), np.sin(np.pi * f * cy),
                        np.cos(np.pi * f * cy))
        i += 4
    if map_crop_8 is not None:
        out[i:i + MAP_SIDE * MAP_SIDE] = np.asarray(map_crop_8, np.float32).reshape(-1)
        out[-1] = 1.0
    return out


def slot_index(input_ids: np.ndarray, image_token_id: int) -> int:
    """Where the K region rows go in a prompt's ids: one past the token that closes the last
    image run (Qwen's vision end, Idefics3's fake image token); 0 without an image."""
    ids = np.asarray(input_ids).reshape(-1)
    where = np.flatnonzero(ids == image_token_id)
    if not len(where):
        return 0
    return min(int(where[-1]) + 2, len(ids))


def inject(enc: Any, rows: np.ndarray, placeholder_id: int, image_token_id: int) -> Any:
    """``enc`` (an :class:`~linecam.runtime.vlm.engine.Encoded`) with ``len(rows)`` placeholder
    ids inserted at :func:`slot_index` and ``injected = (index, rows)`` set."""
    at = slot_index(enc.input_ids, image_token_id)
    k = rows.shape[0]
    ids = np.concatenate([enc.input_ids[:, :at], np.full((1, k), placeholder_id, np.int64), enc.input_ids[:, at:]],
                         axis=1)
    return replace(enc, input_ids=ids, injected=(at, rows))


@dataclass(frozen=True, slots=True)
class ProjectorInfo:
    """What the manifest says about the bundle's projector (``extra.region_tokens``)."""

    k: int
    n_features: int
    placeholder_id: int
    features_version: int = FEATURES_VERSION

    @classmethod
    def of(cls, extra: Mapping[str, Any]) -> ProjectorInfo | None:
        d = extra.get(EXTRA_KEY)
        if not d:
            return None
        return cls(int(d["k"]), int(d["n_features"]), int(d["placeholder_id"]),
                   int(d.get("features_version", FEATURES_VERSION)))

    def as_dict(self) -> dict[str, int]:
        return {"k": self.k, "n_features": self.n_features, "placeholder_id": self.placeholder_id,
                "features_version": self.features_version}


def projector_roles(bundle: Any) -> list[str]:
    return sorted(r for r in bundle.manifest.files if r.startswith(ROLE_PREFIX))


class RegionProjector:
    """The bundle's region projector on ONNX Runtime: features ``[N_FEATURES]`` -> rows ``[K, hidden]``.

    ``precision``: fp32 / fp16 / int8 (falls back to fp32 when the bundle lacks it). A
    projector that does not fit the bundle's VLM (hidden size, feature layout) is a
    one-line :class:`BundleError`."""

    def __init__(self, bundle: Any, precision: str = "fp32", *, providers: Sequence[Any] = ("CPUExecutionProvider",),
                 intra_op_threads: int = 1) -> None:
        man = bundle.manifest
        info = ProjectorInfo.of(man.extra)
        roles = projector_roles(bundle)
        if info is None or not roles:
            raise BundleError(f"VLM bundle {bundle.root} has no region projector: re-export it with "
                              f"'export-engine vlm --distil-from ... --region-tokens K', or use prompt-only grounding")
        if info.features_version != FEATURES_VERSION or info.n_features != N_FEATURES:
            raise BundleError(f"region projector of {bundle.root} reads feature layout v{info.features_version} "
                              f"({info.n_features} values); this linecam makes v{FEATURES_VERSION} ({N_FEATURES}): "
                              f"re-export the VLM bundle with this linecam")
        role = f"{ROLE_PREFIX}{precision}" if f"{ROLE_PREFIX}{precision}" in roles else f"{ROLE_PREFIX}fp32"
        self.role, self.info = role, info
        path: Path = bundle.path(role)
        self.session = make_session(path, providers=list(providers), intra_op_threads=intra_op_threads,
                                    hint="re-export the VLM bundle")
        out = self.session.get_outputs()[0]
        hidden = out.shape[-1]
        if not isinstance(hidden, int) or hidden != man.text.hidden_size or out.shape[-2] != info.k:
            raise BundleError(f"region projector {path.name} makes rows of shape {out.shape[1:]} but the bundle's "
                              f"VLM reads {info.k} x {man.text.hidden_size}: the projector belongs to another "
                              f"model; re-export the VLM bundle")
        self._in = self.session.get_inputs()[0].name
        self._in_dtype = np.float16 if self.session.get_inputs()[0].type == "tensor(float16)" else np.float32
        self.image_token_id = man.text.image_token_id

    def rows(self, features: np.ndarray) -> np.ndarray:
        (r,) = self.session.run(None, {self._in: features.reshape(1, -1).astype(self._in_dtype)})
        return np.asarray(r[0], dtype=np.float32)

    def inject(self, enc: Any, features: np.ndarray) -> Any:
        return inject(enc, self.rows(features), self.info.placeholder_id, self.image_token_id)
