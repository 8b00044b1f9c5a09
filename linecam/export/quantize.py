"""FP16 and INT8 ONNX for a region expert: the files TensorRT builds strongly typed engines from.

* :func:`to_fp16`: FP16 weights and compute, FP32 graph inputs/outputs (the runtime
  contract is unchanged). Runs on ONNX Runtime's CPU provider too, which inserts casts
  to FP32 around the ops it has no FP16 kernel for (``InsertCastTransformer``), so the
  CPU check there approximates TensorRT's FP16 numerics (it rounds weights and
  activations between ops to FP16 but mostly computes in FP32).
* :func:`to_int8`: static INT8 with **symmetric** Q/DQ nodes (every zero point 0, int8):
  the only INT8 form a strongly typed TensorRT network takes. Calibrated on images
  preprocessed exactly as at inference (:func:`calibration_batch`), with the head kept
  in float (see :data:`KEEP_HEAD_FLOAT` and :func:`head_nodes`), and a conv output that feeds
  only a ReLU / ReLU6 ranged on what that activation keeps
  (:func:`~linecam.export.calibration_set.clipped_conv_outputs`; the ORT path only: ModelOpt
  calibrates its own ranges, untouched here).

Whether a quantized file is good enough is not decided here: :mod:`linecam.export.gate`
compares it with the FP32 model on labelled images and refuses it when accuracy drops.

No torch at import time: the TensorRT build on a Jetson derives its FP16 ONNX through
:func:`to_fp16`.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import inspect
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from linecam.errors import BundleError
from linecam.export.calibration_set import (  # noqa: F401  (re-exported: callers import them from here)
    CALIBRATION_ANOMALY_RATIO,
    CalibrationSet,
    array_hash,
    calibration_batch,
)
from linecam.export.calibration_set import (  # noqa: F401
    ENTROPY_BINS,
    ENTROPY_QUANTIZED_BINS,
    HISTOGRAM_BINS,
    HISTOGRAM_CHUNK,
    PERCENTILE,
    _histogram_ranges,
    activation_overrides,
    _Reader,
)
from linecam.export.qdq import QdqSummary, _name_nodes, check_symmetric, head_nodes  # noqa: F401
from linecam.runtime.device import first_line

if TYPE_CHECKING:
    import onnx

logger = logging.getLogger(__name__)

Method = Literal["minmax", "percentile", "entropy"]
Tool = Literal["auto", "ort", "modelopt"]
METHODS: tuple[str, ...] = ("minmax", "percentile", "entropy")
TOOLS: tuple[str, ...] = ("auto", "ort", "modelopt")
#: Default calibration method, chosen by measurement on ScratchExpert (see tests/test_quantize.py):
#: the anomaly signal *is* the tail of the activation distributions; percentile (99.999) and
#: entropy clip it, min-max keeps the whole observed range. Max score difference vs FP32 (two
#: seeds, % of the map range, on the old sigmoid map): min-max 1.7 / 1.5, percentile 2.1 / 2.1,
#: entropy 6.8 / 8.3; min-max still agrees best on the unbounded map (tests/test_quantize.py).
DEFAULT_METHOD: Method = "minmax"
#: Below this many calibration images a warning says accuracy may collapse (NVIDIA suggests >= 500).
MIN_CALIBRATION_IMAGES = 32
#: Keep the head in float: the last conv(s) and everything after them (upsampling of the logits,
#: the map's sigmoid + relu, score pooling and reduction), see :func:`head_nodes`. Measured on ScratchExpert
#: (64x64, two seeds): slightly better map agreement (max score difference 1.67 % vs 1.80 % and
#: 1.46 % vs 1.58 % of the map range; p99 map difference 0.89 % vs 1.00 %) for a tiny share
#: of the compute on a GPU; on ORT CPU the float head costs ~6 % (its Resize runs in float).
KEEP_HEAD_FLOAT = True
#: Op types given Q/DQ nodes (the others run in float between a DQ and the next Q). Relu is
#: not listed: with symmetric int8 ORT cannot fold it away, and its own Q/DQ pair changed
#: nothing measurable but cost ~6 % on ORT CPU; TensorRT fuses Conv+Relu either way.
DEFAULT_OP_TYPES: tuple[str, ...] = ("Conv", "ConvTranspose", "Resize", "MaxPool", "AveragePool", "Gemm", "MatMul")


# --------------------------------------------------------------------------- helpers


#: Protobuf's limit: larger models keep their weights in an external ``<name>.data`` file.
PROTOBUF_LIMIT = 2 * 1024**3 - 1024**2


def _save_atomic(model: onnx.ModelProto, dst: Path) -> Path:
    """Write ``model`` to ``dst`` through a temporary file in the same folder (the rename
    commits it; a model over 2 GB writes its weights to ``<dst name>.data`` first)."""
    import onnx

    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if model.ByteSize() > PROTOBUF_LIMIT:
            onnx.save(model, tmp, save_as_external_data=True, location=f"{dst.name}.data")
        else:
            onnx.save(model, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dst


def _session(path: str | Path) -> Any:
    from linecam.runtime.session import make_session

    return make_session(path, log_severity_level=3)


_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
              "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}


def _smoke_run(path: Path, what: str) -> None:
    """Load ``path`` on ORT CPU and run it once on zeros; a failure is a BundleError.

    Dynamic dimensions are fed as 1; if such a model then fails to *run* (a size it cannot
    take), that says nothing about the conversion: logged, not raised.
    """
    try:
        sess = _session(path)
    except Exception as e:  # onnxruntime raises its own exception types
        raise BundleError(f"the {what} model {path} does not load on ONNX Runtime CPU: {first_line(e)}") from None
    feeds, dynamic = {}, False
    for i in sess.get_inputs():
        dtype = _ORT_TYPES.get(i.type)
        if dtype is None:
            logger.debug("not smoke-testing %s: input %s has type %s", path, i.name, i.type)
            return
        dynamic |= any(not (isinstance(d, int) and d > 0) for d in i.shape)
        feeds[i.name] = np.zeros([d if isinstance(d, int) and d > 0 else 1 for d in i.shape], dtype)
    try:
        outs = sess.run(None, feeds)
    except Exception as e:
        if dynamic:
            logger.warning("could not test-run the %s model %s on zeros with dynamic axes set to 1: %s",
                           what, path, first_line(e))
            return
        raise BundleError(f"the {what} model {path} does not run on ONNX Runtime CPU: {first_line(e)}") from None
    for o, meta in zip(outs, sess.get_outputs()):
        a = np.asarray(o)
        if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
            raise BundleError(f"the {what} model {path} gives non-finite values in '{meta.name}' on a zero "
                              f"input: the conversion overflowed; keep the FP32 model")


# --------------------------------------------------------------------------- FP16


def to_fp16(src: str | Path, dst: str | Path, *, keep_io_types: bool = True,
            op_block_list: Sequence[str] | None = None, check: bool = True) -> Path:
    """Cast the FP32 ONNX ``src`` to FP16 at ``dst`` (inputs and outputs stay FP32 unless
    ``keep_io_types`` is False), atomically.

    ``op_block_list`` (default: ORT's ``DEFAULT_OP_BLOCK_LIST``, nothing more) keeps ops in
    FP32. ORT's CPU provider lacks FP16 kernels for most conv-net ops (Conv, Resize,
    AveragePool on x86), but its InsertCastTransformer wraps such nodes in casts at session
    creation, so the file runs there unchanged; blocking them here would also keep them FP32
    in TensorRT, which is the point of the file (measured on ScratchExpert, ORT 1.31).
    ``check`` runs the result once on ONNX Runtime CPU and raises :class:`BundleError`
    (removing ``dst``) if it does not load, run, or gives non-finite values.
    """
    try:
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError as e:
        raise BundleError(f"the bundle has no FP16 ONNX and deriving one needs the onnx package "
                          f"({e.name} is missing): pip install onnx") from None
    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src))
    fp16 = convert_float_to_float16(model, keep_io_types=keep_io_types, disable_shape_infer=False,
                                    op_block_list=None if op_block_list is None else list(op_block_list))
    _save_atomic(fp16, dst)
    if check:
        try:
            _smoke_run(dst, "FP16")
        except BundleError:
            dst.unlink(missing_ok=True)
            raise
    return dst


# --------------------------------------------------------------------------- INT8


@dataclass(frozen=True)
class QuantResult:
    path: Path
    tool: str
    method: str
    calibration_sha256: str
    calibration_n: int
    per_channel: bool
    #: Op types that got Q/DQ on their inputs, with how many nodes of each.
    ops_quantized: dict[str, int]
    #: Nodes deliberately left in float (``nodes_to_exclude``, then the head), by name.
    kept_float: tuple[str, ...]
    #: QuantizeLinear -> DequantizeLinear pairs on activations (weights have a DequantizeLinear only).
    qdq_pairs: int
    #: DequantizeLinear nodes on int8 weights.
    weight_dq: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        d["kept_float"] = list(self.kept_float)
        return d


def modelopt_available() -> bool:
    try:
        importlib.import_module("modelopt.onnx.quantization")
    except Exception:  # ImportError, or a broken install (CUDA libraries missing, ...)
        return False
    return True


def _check_calibration(model_path: Path, calib: CalibrationSet) -> tuple[str, tuple[int, ...]]:
    """(input name, expected shape); raises on an empty set or a shape mismatch."""
    import onnx

    if calib.n == 0:
        raise BundleError("the calibration set is empty: give good images from the line (>= 500 suggested)")
    graph = onnx.load(str(model_path), load_external_data=False).graph
    init_names = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in init_names]
    if len(inputs) != 1:
        raise BundleError(f"INT8 calibration expects a model with one input, {model_path} has {len(inputs)}")
    dims = inputs[0].type.tensor_type.shape.dim
    want = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims)
    got = calib.input_shape
    if len(want) != len(got) or any(w not in (-1, g) for w, g in zip(want, got)):
        raise BundleError(f"calibration inputs have shape {list(got)} but the model input "
                          f"'{inputs[0].name}' expects {[d if d >= 0 else '?' for d in want]}: "
                          f"preprocess the calibration images with the bundle's spec")
    if calib.n < MIN_CALIBRATION_IMAGES:
        logger.warning("only %d calibration image(s): INT8 accuracy may collapse (NVIDIA suggests >= 500; "
                       "use at least %d)", calib.n, MIN_CALIBRATION_IMAGES)
    return inputs[0].name, want


def to_int8(src: str | Path, dst: str | Path, calib: CalibrationSet, *, method: Method = DEFAULT_METHOD,
            tool: Tool = "auto", per_channel: bool = True, keep_head_float: bool = KEEP_HEAD_FLOAT,
            op_types: Iterable[str] | None = None, nodes_to_exclude: Iterable[str] = ()) -> QuantResult:
    """Static INT8 quantization of the FP32 ONNX ``src`` to ``dst`` with symmetric Q/DQ nodes.

    ``method``: how activation ranges are set from ``calib`` ("minmax": observed range;
    "percentile": the 99.999th percentile of |x|; "entropy": KL-divergence optimal clip).
    ``tool``: "ort" (ONNX Runtime's ``quantize_static``), "modelopt" (NVIDIA ModelOpt,
    Q/DQ placed by TensorRT's rules; needs ``nvidia-modelopt[onnx]``), "auto" (ModelOpt
    when importable, else ORT). ``keep_head_float`` leaves :func:`head_nodes` unquantized.
    The written file is checked: every zero point int8 0, runs on ORT CPU.
    """
    if method not in METHODS:
        raise BundleError(f"calibration method {method!r} is not one of {', '.join(METHODS)}")
    if tool not in TOOLS:
        raise BundleError(f"quantization tool {tool!r} is not one of {', '.join(TOOLS)}")
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise BundleError(f"ONNX model {src} does not exist")
    if tool == "modelopt" and not modelopt_available():
        raise BundleError("INT8 with --quant-tool modelopt needs NVIDIA ModelOpt: pip install nvidia-modelopt[onnx] "
                          "(or use --quant-tool ort)")
    # "auto": ModelOpt (Q/DQ placed by TensorRT's rules) when it is installed and calibrates
    # this way; otherwise ONNX Runtime.
    use = "modelopt" if tool == "modelopt" or (tool == "auto" and method != "percentile"
                                               and modelopt_available()) else "ort"
    input_name, _ = _check_calibration(src, calib)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="linecam-int8-") as tmpdir:
        tmp_out = Path(tmpdir) / "model.int8.onnx"
        if use == "ort":
            kept = _quantize_ort(src, tmp_out, calib, input_name, Path(tmpdir), method=method,
                                 per_channel=per_channel, keep_head_float=keep_head_float,
                                 op_types=op_types, nodes_to_exclude=nodes_to_exclude)
        else:
            kept = _quantize_modelopt(src, tmp_out, calib, input_name, Path(tmpdir), method=method,
                                      keep_head_float=keep_head_float, nodes_to_exclude=nodes_to_exclude)
        import onnx

        model = onnx.load(str(tmp_out))
        summary = check_symmetric(model)
        if summary.qdq_pairs == 0:
            raise BundleError(f"quantizing {src} inserted no Q/DQ nodes: the model has no quantizable ops")
        _save_atomic(model, dst)
    try:
        _smoke_run(dst, "INT8")
    except BundleError:
        dst.unlink(missing_ok=True)
        raise
    seconds = time.perf_counter() - t0
    result = QuantResult(path=dst, tool=use, method=method, calibration_sha256=calib.sha256,
                         calibration_n=calib.n, per_channel=per_channel, ops_quantized=summary.ops_quantized,
                         kept_float=tuple(kept), qdq_pairs=summary.qdq_pairs, weight_dq=summary.weight_dq,
                         seconds=round(seconds, 2))
    logger.info("INT8 (%s, %s, %d calibration images) written to %s in %.1f s: %d Q/DQ pairs, ops %s",
                use, method, calib.n, dst, seconds, summary.qdq_pairs, summary.ops_quantized)
    return result


def _quantize_ort(src: Path, dst: Path, calib: CalibrationSet, input_name: str, tmpdir: Path, *, method: str,
                  per_channel: bool, keep_head_float: bool, op_types: Iterable[str] | None,
                  nodes_to_exclude: Iterable[str]) -> list[str]:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prep = tmpdir / "prep.onnx"
    t = time.perf_counter()
    logger.info("INT8: pre-processing %s (shape inference, graph optimisation)", src.name)
    # Folds constants (the Shape -> Resize sizes subgraph), fuses BN into Conv, infers shapes:
    # calibration then sees the graph that is quantized.
    try:
        quant_pre_process(str(src), str(prep), skip_symbolic_shape=False)
    except ImportError as e:  # symbolic shape inference needs sympy (usually there via torch)
        logger.info("INT8: %s; using ONNX shape inference only (static shapes need no more)", e)
        quant_pre_process(str(src), str(prep), skip_symbolic_shape=True)
    model = onnx.load(str(prep))
    _name_nodes(model)
    onnx.save(model, str(prep))
    exclude = list(nodes_to_exclude)
    kept = head_nodes(model) if keep_head_float else []
    exclude += [n for n in kept if n not in exclude]
    types = list(op_types) if op_types is not None else list(DEFAULT_OP_TYPES)
    extra: dict[str, Any] = {
        "ActivationSymmetric": True,
        "WeightSymmetric": True,
        # Float biases: TensorRT fuses them into the conv; int32 bias DQ nodes are not needed
        # (and not every TensorRT version parses int32 DequantizeLinear).
        "QuantizeBias": False,
        "CalibTensorRangeSymmetric": True,
    }
    reader = _Reader(input_name, calib.inputs)
    if method != "minmax":
        # ORT's own entropy calibrator histograms into 128 bins and picks a clip among 128
        # quantized bins: unless a later batch widens the histogram, the only candidate is
        # the full range, i.e. min-max (measured: identical scales on a 256x256 ScratchExpert).
        # Ranges are computed here with more bins (see ENTROPY_BINS) and handed over as overrides.
        ranges = _histogram_ranges(prep, reader, method, types, tmpdir)
        reader.set_range(0, calib.n)
    else:
        ranges = {}
    # Conv outputs feeding a ReLU / ReLU6 are ranged on what the activation keeps (see
    # clipped_conv_outputs); the other tensors keep their calibrated ranges.
    ranges.update(activation_overrides(prep, reader, types, tmpdir, ranges or None))
    if ranges:
        extra["TensorQuantOverrides"] = {k: [{"rmin": np.float32(lo), "rmax": np.float32(hi)}]
                                         for k, (lo, hi) in ranges.items()}
    logger.info("INT8: calibrating (%s) on %d image(s) and quantizing", method, calib.n)
    with contextlib.redirect_stdout(io.StringIO()) as chatter:  # ORT prints progress to stdout
        quantize_static(
            str(prep), str(dst), reader,
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            per_channel=per_channel,
            op_types_to_quantize=types,
            nodes_to_exclude=exclude,
            calibrate_method=CalibrationMethod.MinMax,
            calibration_providers=["CPUExecutionProvider"],
            extra_options=extra,
        )
    if chatter.getvalue().strip():
        logger.debug("onnxruntime.quantization: %s", chatter.getvalue().strip())
    logger.info("INT8: quantized in %.1f s", time.perf_counter() - t)
    return exclude


def _quantize_modelopt(src: Path, dst: Path, calib: CalibrationSet, input_name: str, tmpdir: Path, *,
                       method: str, keep_head_float: bool, nodes_to_exclude: Iterable[str]) -> list[str]:
    """NVIDIA ModelOpt (not installed in CI: exercised only where it is)."""
    import onnx
    from modelopt.onnx.quantization import quantize as mo_quantize

    if method == "percentile":
        raise BundleError("ModelOpt calibrates with max or entropy: use --int8-method minmax or entropy "
                          "(or --quant-tool ort for percentile)")
    model = onnx.load(str(src))
    _name_nodes(model)
    named = tmpdir / "named.onnx"
    onnx.save(model, str(named))
    kept = head_nodes(model) if keep_head_float else []
    # ModelOpt matches nodes_to_exclude as regular expressions.
    exclude = [f"^{re.escape(n)}$" for n in dict.fromkeys([*nodes_to_exclude, *kept])]
    kwargs: dict[str, Any] = {
        "onnx_path": str(named),
        "quantize_mode": "int8",
        "calibration_data": {input_name: calib.inputs},
        "calibration_method": "max" if method == "minmax" else "entropy",
        "calibration_eps": ["cpu"],
        "nodes_to_exclude": exclude or None,
        "output_path": str(dst),
        # What is not quantized stays FP32 (newer ModelOpt casts it to FP16 by default; the
        # FP16 model is a separate file here, and the gate compares INT8 against FP32).
        "high_precision_dtype": "fp32",
        "use_zero_point": False,
    }
    accepted = inspect.signature(mo_quantize).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    logger.info("INT8: ModelOpt calibrating (%s) on %d image(s)", method, calib.n)
    mo_quantize(**kwargs)
    return list(dict.fromkeys([*nodes_to_exclude, *kept]))
