"""TensorRT build plans without TensorRT: options, which flags a TensorRT version and precision
need, optimization-profile shapes, engine roles and file names, the placement report, and the
FP16 ONNX derived for a build. Pure functions, so the whole decision table is tested anywhere."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from linecam.errors import BundleError
from linecam.export.trt_verify import Tolerances
from linecam.runtime.device import BackendUnavailable, DeviceFacts

logger = logging.getLogger(__name__)

Precision = Literal["fp32", "fp16", "int8"]
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")
ENGINE_DIR = "trt"
FP16_ONNX = "model.fp16.onnx"


# --------------------------------------------------------------------------- options and plans


@dataclass(frozen=True)
class TrtBuildOptions:
    precision: Precision = "fp16"
    #: builder_optimization_level 0..5 (TensorRT's default 3; higher = longer build, maybe faster engine).
    opt_level: int = 3
    #: Workspace memory pool limit (None: TensorRT's default, the device's memory). On Jetson,
    #: whose GPU shares system memory, a limit (e.g. 1024) avoids builds failing for memory.
    workspace_mb: int | None = None
    dla_core: int | None = None
    gpu_fallback: bool = True
    #: Largest batch the engine accepts (only for an ONNX with a dynamic batch axis).
    max_batch: int = 1
    #: Default: ``<bundle>/trt/timing-<device>.cache``.
    timing_cache: Path | None = None
    #: Verification images (default: the bundle's held-out images, if still on this machine).
    images: Path | None = None
    verify_limit: int = 32
    tolerances: Tolerances | None = None


@dataclass(frozen=True)
class BuildPlan:
    """Flags for a TensorRT version / precision / device combination (names of TensorRT enums)."""

    strongly_typed: bool
    network_flags: tuple[str, ...] = ()
    builder_flags: tuple[str, ...] = ()


def trt_major(version: str) -> int:
    try:
        return int(version.split(".")[0])
    except ValueError:
        raise BackendUnavailable(f"cannot read the TensorRT version {version!r}") from None


def build_plan(trt_version: str, precision: str, dla_core: int | None = None, gpu_fallback: bool = True) -> BuildPlan:
    """Which flags this build needs, by TensorRT version (builder flags only where a version needs them).

    * 11.x: always strongly typed; STRONGLY_TYPED is deprecated (ignored) and FP16/INT8 flags are gone.
    * 10.x on the GPU: STRONGLY_TYPED network, no precision flags; the ONNX's types decide.
    * 10.x on DLA: weakly typed with FP16 (+INT8 for Q/DQ models), because DLA in 10.x
      does not take strongly typed networks (TensorRT 11.4.1 made DLA strongly typed).
    """
    if precision not in PRECISIONS:
        raise BundleError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    major = trt_major(trt_version)
    if major < 10:
        raise BackendUnavailable(f"export-engine trt needs TensorRT >= 10 (this is {trt_version}): upgrade "
                                 f"JetPack to 6.x or pip install 'linecam[trt]'")
    extra: tuple[str, ...] = ()
    if dla_core is not None:
        if precision == "fp32":
            raise BundleError("DLA runs FP16 or INT8 only: build with --precision fp16 (or int8), or drop --dla-core")
        extra = ("GPU_FALLBACK",) if gpu_fallback else ()
    if major >= 11:
        return BuildPlan(strongly_typed=True, builder_flags=extra)
    if dla_core is not None:
        prec = ("FP16", "INT8") if precision == "int8" else ("FP16",)
        return BuildPlan(strongly_typed=False, builder_flags=prec + extra)
    return BuildPlan(strongly_typed=True, network_flags=("STRONGLY_TYPED",), builder_flags=extra)


@dataclass(frozen=True)
class Profile:
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    @property
    def dynamic(self) -> bool:
        return not (self.min == self.opt == self.max)


def _is_dynamic(d: object) -> bool:
    return not isinstance(d, int) or d <= 0


def profile_shapes(name: str, onnx_shape: Sequence[int | str | None], manifest_shape: Sequence[int | str],
                   *, max_batch: int = 1) -> Profile:
    """min/opt/max shapes of one input. Static axes must agree with the manifest; a dynamic
    batch axis (0) spans 1..``max_batch`` (opt 1: the line sends one frame at a time);
    any other dynamic axis takes the manifest's fixed size."""
    if max_batch < 1:
        raise BundleError(f"--max-batch must be at least 1 (got {max_batch})")
    if len(onnx_shape) != len(manifest_shape):
        raise BundleError(f"input '{name}' has {len(onnx_shape)} dimensions in the ONNX but {len(manifest_shape)} "
                          f"in the manifest: re-export the bundle")
    lo, opt, hi = [], [], []
    for axis, (d, m) in enumerate(zip(onnx_shape, manifest_shape)):
        if not _is_dynamic(d):
            if isinstance(m, int) and m != d:
                raise BundleError(f"static dimension mismatch: input '{name}' axis {axis} is {d} in the ONNX but "
                                  f"{m} in the manifest: re-export the bundle")
            if axis == 0 and max_batch > d:
                raise BundleError(f"static dimension mismatch: input '{name}' has a fixed batch of {d}, so "
                                  f"--max-batch {max_batch} cannot be built: use --max-batch {d} or export the "
                                  f"ONNX with a dynamic batch axis")
            lo.append(int(d))
            opt.append(int(d))
            hi.append(int(d))
        elif axis == 0:
            lo.append(1)
            opt.append(1)
            hi.append(max_batch)
        elif isinstance(m, int) and m > 0:
            lo.append(m)
            opt.append(m)
            hi.append(m)
        else:
            raise BundleError(f"input '{name}' axis {axis} is dynamic in both the ONNX and the manifest: export "
                              f"the model with a fixed input size (the line camera's frame size is fixed)")
    return Profile(tuple(lo), tuple(opt), tuple(hi))


def slug(text: str, n: int = 24) -> str:
    """A file-name-safe short form of a GPU name: "NVIDIA H100 80GB HBM3" -> "h100-80gb-hbm3"."""
    s = re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-")
    s = re.sub(r"^nvidia-", "", s)
    return s[:n].strip("-") or "gpu"


def device_slug(facts: DeviceFacts) -> str:
    """e.g. ``h100-80gb-hbm3_sm90_trt10.13.0``: names engines and timing caches per device."""
    trt = ".".join((facts.tensorrt or "unknown").split(".")[:3])
    cc = (facts.compute_capability or "unknown").replace(".", "")
    return f"{slug(facts.gpu or 'unknown')}_sm{cc}_trt{trt}"


def engine_role(precision: str, facts: DeviceFacts, dla_core: int | None = None) -> str:
    dla = f"_dla{dla_core}" if dla_core is not None else ""
    return f"trt_{precision}{dla}_{device_slug(facts)}"


def placement_report(engine_info: dict[str, Any], gpu_only_network_layers: Sequence[tuple[str, str]] = (),
                     dla_core: int | None = None) -> dict[str, Any]:
    """Which engine layers run on DLA and which on the GPU, from the engine inspector's JSON
    (``get_engine_information(JSON)`` with DETAILED profiling verbosity). DLA subgraphs show
    up as layers of type ``DLA`` (names ``{ForeignNode[...]}``); everything else is GPU."""
    dla, gpu, unknown = [], [], 0
    for layer in engine_info.get("Layers", []):
        if not isinstance(layer, dict):  # names only: verbosity was not DETAILED
            unknown += 1
            continue
        name = str(layer.get("Name", "?"))
        kind = str(layer.get("LayerType", ""))
        (dla if kind.upper() == "DLA" else gpu).append(f"{name} ({kind})" if kind else name)
    return {"dla_core": dla_core, "engine_layers_on_dla": dla, "engine_layers_on_gpu": gpu,
            "engine_layers_unknown": unknown,
            "network_layers_gpu_only": [f"{n} ({t})" for n, t in gpu_only_network_layers]}


def placement_line(report: dict[str, Any]) -> str:
    dla, gpu = report["engine_layers_on_dla"], report["engine_layers_on_gpu"]
    line = f"DLA core {report['dla_core']}: {len(dla)} DLA subgraph(s), {len(gpu)} GPU layer(s)"
    if gpu:
        line += ": " + ", ".join(gpu[:8]) + (f" (+{len(gpu) - 8} more)" if len(gpu) > 8 else "")
    cannot = report["network_layers_gpu_only"]
    if cannot:
        line += f"; {len(cannot)} network layer(s) cannot run on DLA: " + ", ".join(cannot[:8])
    return line


# --------------------------------------------------------------------------- FP16 ONNX


def derive_fp16_onnx(src: Path, dst: Path) -> Path:
    """Cast an FP32 ONNX to FP16 (inputs and outputs kept FP32, so the runtime contract is
    unchanged) with ONNX Runtime's converter; used when the bundle holds no FP16 model.
    See :func:`linecam.export.quantize.to_fp16` (atomic write, checked on ORT CPU)."""
    from linecam.errors import BundleError
    from linecam.export.quantize import to_fp16

    try:
        return to_fp16(src, dst)
    except BundleError as e:
        raise BundleError(f"{e}; or build with --precision fp32") from None
