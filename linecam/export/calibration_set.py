"""The INT8 calibration set: model inputs preprocessed exactly as at inference, half of them
with a synthetic anomaly painted on (:data:`CALIBRATION_ANOMALY_RATIO` says why), and its hash
for the bundle. Used by :func:`linecam.export.quantize.to_int8`; no torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from linecam.errors import BundleError

if TYPE_CHECKING:
    from linecam.export.scratch import SourceImage
    from linecam.preprocess import PreprocessSpec

logger = logging.getLogger(__name__)

#: Share of calibration images that get a synthetic anomaly (the training recipes) painted on.
#: Calibrating on good images only sets every activation range to what good parts produce;
#: a defect drives the anomaly-detecting channels beyond it, they clip, and the map's
#: contrast collapses exactly where it matters (measured on a ScratchExpert: defect scores
#: 0.2 instead of 0.9, AUROC unchanged - so the FP32 thresholds no longer fit).
CALIBRATION_ANOMALY_RATIO = 0.5



@dataclass(frozen=True)
class CalibrationSet:
    """Model inputs for calibration, ``[N, 3, H, W]`` float32, and what they were made from."""

    inputs: np.ndarray
    #: sha256 of the set: :func:`linecam.bundle.source_hash` over the images' file hashes
    #: (as bundles hash their sources), or of the array itself (``source == "array"``).
    sha256: str
    source: Literal["images", "array"] = "images"
    files: tuple[str, ...] = field(default=(), repr=False)
    #: Share of images asked to carry a synthetic anomaly, how many did, and the seed.
    anomaly_ratio: float = 0.0
    painted: int = 0
    seed: int = 0

    @property
    def n(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one model input: ``(1, 3, H, W)``."""
        return (1, *self.inputs.shape[1:])

    def describe(self) -> dict[str, Any]:
        """JSON-able provenance (no pixels)."""
        return {"n": self.n, "sha256": self.sha256, "source": self.source, "input_shape": list(self.input_shape),
                "anomaly_ratio": self.anomaly_ratio, "painted": self.painted, "seed": self.seed}


def array_hash(a: np.ndarray) -> str:
    """sha256 of an array's dtype, shape and bytes (C order)."""
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def calibration_batch(images: Sequence[SourceImage] | np.ndarray, spec: PreprocessSpec | None = None, *,
                      anomaly_ratio: float = CALIBRATION_ANOMALY_RATIO,
                      recipe_weights: dict[str, float] | None = None, limit: int | None = None,
                      seed: int = 0) -> CalibrationSet:
    """The calibration set: ``images`` preprocessed exactly as at inference.

    ``images`` are :class:`~linecam.export.scratch.SourceImage` (each goes through
    ``Preprocessor(spec)(image, bit_depth)``; ``sha256`` is ``source_hash`` of their file
    hashes, as bundles hash their sources), or an already preprocessed float array
    ``[N, 3, H, W]`` (``spec``, if given, must agree on ``H, W``; ``sha256`` hashes the
    array; used as is). ``anomaly_ratio`` of the images (seeded) get one synthetic anomaly
    painted on the source image before preprocessing (:data:`CALIBRATION_ANOMALY_RATIO`
    says why). ``limit`` keeps a seeded random subset of that many images.
    """
    if not 0.0 <= anomaly_ratio <= 1.0:
        raise BundleError(f"anomaly_ratio must be in [0, 1], got {anomaly_ratio}")
    rng = np.random.default_rng(seed)
    if isinstance(images, np.ndarray):
        x = images
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[1] != 3:
            raise BundleError(f"calibration array must be [N, 3, H, W], got shape {list(images.shape)}")
        if spec is not None and tuple(x.shape[2:]) != tuple(spec.input_size):
            raise BundleError(f"calibration array is {x.shape[2]}x{x.shape[3]} but the model input is "
                              f"{spec.input_size[0]}x{spec.input_size[1]}: preprocess with the bundle's spec")
        if limit is not None and 0 < limit < x.shape[0]:
            x = x[np.sort(rng.choice(x.shape[0], limit, replace=False))]
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.shape[0] and not np.isfinite(x).all():
            raise BundleError("calibration array has NaN or Inf values: check the preprocessing")
        return CalibrationSet(x, array_hash(x), "array")

    from linecam.export.anomalies import synthesize
    from linecam.bundle import source_hash
    from linecam.preprocess import Preprocessor

    if spec is None:
        raise BundleError("calibration images need the bundle's PreprocessSpec (spec=...)")
    chosen = list(images)
    if limit is not None and 0 < limit < len(chosen):
        idx = np.sort(rng.choice(len(chosen), limit, replace=False))
        chosen = [chosen[i] for i in idx]
    h, w = spec.input_size
    x = np.empty((len(chosen), 3, h, w), np.float32)
    pre = Preprocessor(spec)
    painted = 0
    for i, s in enumerate(chosen):
        img = s.image
        if anomaly_ratio > 0 and rng.random() < anomaly_ratio:
            donor = chosen[int(rng.integers(len(chosen)))].image
            img = synthesize(rng, img, donor, weights=recipe_weights)[0]
            painted += 1
        try:
            x[i] = pre(img, s.bit_depth)[0]
        except ValueError as e:
            raise BundleError(f"cannot preprocess calibration image {s.path}: {e}") from None
    logger.info("calibration set: %d image(s), %d with a synthetic anomaly", len(chosen), painted)
    return CalibrationSet(x, source_hash([s.sha256 for s in chosen]), "images",
                          tuple(str(s.path) for s in chosen), anomaly_ratio=anomaly_ratio, painted=painted,
                          seed=seed)


# --------------------------------------------------------------------------- activation ranges


PERCENTILE = 99.999
#: Images per calibration pass when collecting histograms (percentile/entropy keep every
#: activation tensor of a pass in memory; min-max only keeps per-tensor min/max).
HISTOGRAM_CHUNK = 8


class _Reader:
    """onnxruntime CalibrationDataReader over a :class:`CalibrationSet` (supports strided passes)."""

    def __init__(self, name: str, inputs: np.ndarray) -> None:
        self.name = name
        self.inputs = inputs
        self.start, self.end = 0, len(inputs)
        self.i = 0

    def __len__(self) -> int:
        return len(self.inputs)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.start, self.end = start_index, end_index
        self.i = start_index

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= self.end:
            return None
        x = self.inputs[self.i : self.i + 1]
        self.i += 1
        return {self.name: x}

    def rewind(self) -> None:
        self.i = self.start


#: Histogram bins for percentile calibration (ORT's default).
HISTOGRAM_BINS = 2048
#: Entropy: bins, and the quantized bins the KL-optimal clip is searched over. TensorRT uses
#: 2048 / 128; ORT's search is pure Python and roughly quadratic in the bins (2048: 38 s for a
#: 64x64 ScratchExpert on 32 images, 512: 5 s), so 512 still searches clips from 1/4 to the
#: full range. (ORT's own default, 128 / 128, leaves no choice: it is min-max.)
ENTROPY_BINS = 512
ENTROPY_QUANTIZED_BINS = 128


def _histogram_ranges(model_path: Path, reader: _Reader, method: str, op_types: list[str],
                      tmpdir: Path) -> dict[str, tuple[float, float]]:
    """Per-tensor (rmin, rmax) by percentile or entropy, collected in chunks of HISTOGRAM_CHUNK images."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator

    if method == "percentile":
        cm = CalibrationMethod.Percentile
        opts: dict[str, Any] = {"symmetric": True, "num_bins": HISTOGRAM_BINS, "percentile": PERCENTILE}
    else:
        cm = CalibrationMethod.Entropy
        opts = {"symmetric": True, "num_bins": ENTROPY_BINS, "num_quantized_bins": ENTROPY_QUANTIZED_BINS}
    with contextlib.redirect_stdout(io.StringIO()) as chatter:
        calibrator = create_calibrator(model_path, op_types, augmented_model_path=str(tmpdir / "augmented.onnx"),
                                       calibrate_method=cm, providers=["CPUExecutionProvider"], extra_options=opts)
        n = len(reader)
        for start in range(0, n, HISTOGRAM_CHUNK):
            reader.set_range(start, min(n, start + HISTOGRAM_CHUNK))
            calibrator.collect_data(reader)
        data = calibrator.compute_data()
    logger.debug("onnxruntime.quantization: %s", chatter.getvalue().strip())
    out = {}
    for name, td in data.items():
        lo, hi = td.range_value
        out[name] = (float(np.min(lo)), float(np.max(hi)))
    return out


def clipped_conv_outputs(model: Any) -> dict[str, float]:
    """Conv outputs whose only consumer is a ReLU or a ``Clip(0, hi)``: tensor -> ``hi`` (``inf`` for ReLU).

    Why: with symmetric INT8 activations ORT puts the Q/DQ pair on the conv's output *before*
    the activation, with a scale spanning the whole calibrated range, negatives included, that
    the activation then throws away. An EfficientNet expand conv's output reaches -40 while its
    ReLU6 keeps [0, 6]: the kept part got a handful of levels (a Lite0 student's INT8 map agreed
    with FP32 at r = 0.60). Ranging such a tensor as ±(what the activation keeps) is exact for
    everything the activation passes and saturates only what it zeroes or clips anyway."""
    consumers: dict[str, list[Any]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    consts = {t.name: t for t in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    out: dict[str, float] = {}
    for n in model.graph.node:
        if n.op_type != "Conv" or n.output[0] in outputs or len(consumers.get(n.output[0], [])) != 1:
            continue
        act = consumers[n.output[0]][0]
        if act.op_type == "Relu":
            out[n.output[0]] = float("inf")
        elif act.op_type == "Clip":
            lo, hi = (_const(consts, act.input[i]) if len(act.input) > i and act.input[i] else None for i in (1, 2))
            if lo == 0.0 and hi is not None and hi > 0:
                out[n.output[0]] = hi
    return out


def _const(consts: dict[str, Any], name: str) -> float | None:
    from onnx import numpy_helper

    t = consts.get(name)
    return float(numpy_helper.to_array(t).reshape(-1)[0]) if t is not None else None


def activation_overrides(model_path: Path, reader: _Reader, op_types: list[str], tmpdir: Path,
                         ranges: dict[str, tuple[float, float]] | None = None) -> dict[str, tuple[float, float]]:
    """Symmetric ranges ``±min(hi, calibrated max)`` for :func:`clipped_conv_outputs`; ``ranges``:
    calibrated (rmin, rmax) per tensor when already collected, else a min-max pass collects them."""
    import onnx

    bounds = clipped_conv_outputs(onnx.load(str(model_path)))
    if not bounds:
        return {}
    if ranges is None:
        from onnxruntime.quantization import CalibrationMethod
        from onnxruntime.quantization.calibrate import create_calibrator

        with contextlib.redirect_stdout(io.StringIO()):
            calibrator = create_calibrator(model_path, op_types, augmented_model_path=str(tmpdir / "minmax.onnx"),
                                           calibrate_method=CalibrationMethod.MinMax,
                                           providers=["CPUExecutionProvider"])
            reader.set_range(0, len(reader))
            calibrator.collect_data(reader)
            data = calibrator.compute_data()
        ranges = {k: (float(np.min(v.range_value[0])), float(np.max(v.range_value[1]))) for k, v in data.items()}
        reader.set_range(0, len(reader))
    out = {}
    for name, hi in bounds.items():
        if name in ranges and ranges[name][1] > 0:
            m = min(hi, ranges[name][1])
            out[name] = (-m, m)
    return out
