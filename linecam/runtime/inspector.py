"""One inspection: a frame's image -> preprocess -> runner -> postprocess -> :class:`Inspection`.

The one place the region expert is wired: the daemon's workers, ``linecam evaluate``, the
VLM dataset builder and every benchmark inspect through :class:`Inspector`, so they share
the preprocessing, the runner, the output check, the verdict rule and the thresholds (the
bundle's, with the config's overrides applied once, in :meth:`Thresholds.of`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from linecam.bundle import Bundle
from linecam.errors import BundleError
from linecam.preprocess import Geometry, Preprocessor
from linecam.runtime.backends.base import Runner
from linecam.runtime.postprocess import Postprocessor, Region, Verdict

if TYPE_CHECKING:
    from linecam.config import ThresholdsConfig


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Image and pixel thresholds in raw model units, and the smallest region reported."""

    image: float
    pixel: float
    min_region_area_px: int = 0

    @classmethod
    def of(cls, bundle: Bundle, overrides: ThresholdsConfig | None = None) -> Thresholds:
        """The bundle's fitted thresholds, with the config section's overrides applied."""
        t = bundle.manifest.thresholds
        if overrides is None:
            return cls(float(t.image), float(t.pixel))
        return cls(float(overrides.image if overrides.image is not None else t.image),
                   float(overrides.pixel if overrides.pixel is not None else t.pixel),
                   int(overrides.min_region_area_px))


@dataclass(slots=True)
class Inspection:
    """What the region expert said about one image.

    ``verdict`` is None when the model output failed its checks (NaN/Inf): no verdict may
    be derived from it. ``anomaly_map`` is (h, w) raw units at model resolution; when
    :attr:`Inspector.reuses_map` it is the runner's buffer, valid until the next call.
    ``regions`` are in source pixels (NG only, unless asked for every verdict). The
    ``t*_ns`` stamps are ``time.monotonic_ns()`` at start, after preprocessing, after
    inference and after postprocessing.
    """

    verdict: Verdict | None
    score_raw: float
    anomaly_map: np.ndarray
    regions: list[Region]
    geometry: Geometry
    t0_ns: int
    t1_ns: int
    t2_ns: int
    t3_ns: int

    @property
    def valid(self) -> bool:
        return self.verdict is not None

    @property
    def preprocess_ms(self) -> float:
        return (self.t1_ns - self.t0_ns) / 1e6

    @property
    def inference_ms(self) -> float:
        return (self.t2_ns - self.t1_ns) / 1e6

    @property
    def postprocess_ms(self) -> float:
        return (self.t3_ns - self.t2_ns) / 1e6


class Inspector:
    """Bundle + runner + thresholds -> :meth:`inspect`.

    Holds per-thread buffers (the preprocessed input, the postprocessor's scratch and the
    last frame size's :class:`Geometry`): one inspector per thread, :meth:`for_thread` makes
    another one sharing the runner (whose ``run`` is thread-safe).
    """

    def __init__(self, bundle: Bundle, runner: Runner, thresholds: Thresholds | None = None, *,
                 regions_always: bool = False) -> None:
        self.bundle = bundle
        self.runner = runner
        self.thresholds = thresholds if thresholds is not None else Thresholds.of(bundle)
        #: Regions for OK verdicts too (the VLM dataset builder; the daemon wants them for NG only).
        self.regions_always = regions_always
        self.preprocessor = Preprocessor(bundle.manifest.preprocess)
        t = self.thresholds
        try:
            self.postprocessor = Postprocessor(t.pixel, t.image, min_area_px=t.min_region_area_px)
        except ValueError as e:
            raise BundleError(f"bundle {bundle.root} cannot be run on the line: {e} (image {t.image}, pixel "
                              f"{t.pixel}); refit its thresholds with export-engine") from None
        spec = bundle.manifest.outputs.label_maps
        #: The text expert's prompt names, one per label map (empty for other experts).
        self.labels: tuple[str, ...] = tuple(spec.labels) if spec is not None else ()
        self._geometry_key: tuple[int, int] = (-1, -1)
        self._geometry = Geometry(0.0, 0.0, 0.0, 0.0)

    @property
    def reuses_map(self) -> bool:
        """True when the anomaly map is the runner's buffer (copy it to keep it past the next call)."""
        return bool(getattr(self.runner, "reuses_buffers", False))

    @property
    def model_info(self) -> dict[str, str]:
        """``{name, sha256, file}`` as every message carries it."""
        return {"name": self.bundle.manifest.name, "sha256": self.bundle.model_sha256, "file": self.runner.role}

    def for_thread(self) -> Inspector:
        """Another inspector on the same runner and thresholds, with its own buffers."""
        return Inspector(self.bundle, self.runner, self.thresholds, regions_always=self.regions_always)

    def geometry(self, height: int, width: int) -> Geometry:
        """Where the model's view lies in a ``height`` x ``width`` frame (kept per frame size:
        a line's frames all have one size, so this is built once, not per frame)."""
        if self._geometry_key != (height, width):
            self._geometry = self.preprocessor.geometry(height, width)
            self._geometry_key = (height, width)
        return self._geometry

    def inspect(self, image: np.ndarray, bit_depth: int = 8) -> Inspection:
        """Inspect one image in the camera layout ((H, W, 1|3), ``bit_depth`` significant bits).

        Raises ``ValueError`` for an image the preprocessing cannot take (e.g. smaller than the
        bundle's crop)."""
        t0 = time.monotonic_ns()
        x = self.preprocessor(image, bit_depth)
        t1 = time.monotonic_ns()
        out = self.runner.run(x)
        t2 = time.monotonic_ns()
        post = self.postprocessor
        h, w = int(image.shape[0]), int(image.shape[1])
        geometry = self.geometry(h, w)
        amap, score = out.anomaly_map, out.score
        if not (post.is_valid(amap) and math.isfinite(score)):
            return Inspection(None, score, amap, [], geometry, t0, t1, t2, time.monotonic_ns())
        verdict = post.verdict(score)
        regions = (post.regions(amap, geometry, (h, w), out.label_maps, self.labels)
                   if verdict == "NG" or self.regions_always else [])
        return Inspection(verdict, score, amap, regions, geometry, t0, t1, t2, time.monotonic_ns())

    def close(self) -> None:
        self.runner.close()
