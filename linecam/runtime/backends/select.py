"""Which backend runs the region expert, from the bundle and the machine.

``auto``: TensorRT when the bundle holds an engine whose sidecar matches this device
(and TensorRT + cuda-python are importable), else ONNX Runtime's CUDA provider when
there is a GPU and an ``onnxruntime-gpu`` build, else ONNX Runtime on the CPU. The
choice and the reason for every step down are logged.

An explicit backend (``tensorrt``, ``onnxruntime-cuda``, ``onnxruntime``) never steps
down: if it cannot run, the daemon stops with one line saying what is missing and how
to get it.

:func:`choose_backend` is pure (device facts are passed in), so the whole decision
table is tested on machines without a GPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

from linecam.bundle import Bundle
from linecam.errors import BundleError, LinecamError
from linecam.runtime.backends.base import Runner
from linecam.runtime.backends.sidecar import check_engine, engine_roles, read_sidecar, rebuild_command
from linecam.runtime.device import BackendUnavailable, DeviceFacts

logger = logging.getLogger(__name__)

Requested = Literal["auto", "tensorrt", "onnxruntime-cuda", "onnxruntime"]
Chosen = Literal["tensorrt", "onnxruntime-cuda", "onnxruntime"]
BACKENDS: tuple[str, ...] = ("auto", "tensorrt", "onnxruntime-cuda", "onnxruntime")
CUDA_EP = "CUDAExecutionProvider"


@dataclass(frozen=True)
class Choice:
    backend: Chosen
    role: str
    #: Why this backend (and why not the better ones), one line for the log.
    reason: str
    #: TensorRT only: DLA core the engine was built for.
    dla_core: int | None = None
    #: What ``auto`` tried before this one, to try next if this one fails to open.
    fallbacks: tuple[Choice, ...] = field(default=(), compare=False)


def _trt_blocker(facts: DeviceFacts) -> tuple[str, str] | None:
    """(short reason, full one-line error) when TensorRT cannot run here at all; None when it can."""
    from linecam.runtime.backends.tensorrt import trt_missing_message

    if facts.tensorrt is None:
        return (f"TensorRT not importable: {facts.tensorrt_error or 'not installed'}",
                trt_missing_message(facts.tensorrt_error))
    if facts.gpu is None:
        return (f"no NVIDIA GPU: {facts.gpu_error or 'none found'}",
                f"backend 'tensorrt' needs an NVIDIA GPU, and none was found ({facts.gpu_error or 'none found'}): "
                f"check the driver (nvidia-smi) or set model.backend: onnxruntime")
    if not (facts.cuda_python or facts.torch):
        return (f"no cuda-python: {facts.cuda_python_error or 'not installed'}",
                f"backend 'tensorrt' needs cuda-python for device buffers "
                f"({facts.cuda_python_error or 'not installed'}): pip install 'cuda-python>=12' "
                f"(or install torch with CUDA); or set model.backend: onnxruntime")
    return None


def _pick_engine(bundle: Bundle, precision: str | None, facts: DeviceFacts) -> tuple[str | None, str]:
    """(role, reason): the first engine (preferred precision first) built for this device;
    (None, the first engine's mismatch line) when there is none."""
    roles = engine_roles(bundle, precision)
    if not roles:
        want = f" for {precision}" if precision else ""
        return None, (f"bundle {bundle.root} has no TensorRT engine{want}: build one on this device with: "
                      f"{rebuild_command(bundle.root, precision or 'fp16')}")
    first_error = ""
    for role in roles:
        try:
            check_engine(bundle, role, facts)
        except BundleError as e:
            first_error = first_error or str(e)
            continue
        return role, f"engine '{role}' was built for this device ({facts.describe()})"
    return None, first_error


def _ort_role(bundle: Bundle, precision: str | None) -> str:
    return bundle.pick("onnxruntime", precision)  # raises BundleError naming what the bundle has


def choose_backend(bundle: Bundle, requested: str, precision: str | None, facts: DeviceFacts) -> Choice:
    """Decide; raises :class:`BackendUnavailable` / :class:`BundleError` for an explicit backend
    that cannot run (and for ``auto`` only when no backend at all can run the bundle)."""
    if requested not in BACKENDS:
        raise LinecamError(f"unknown backend {requested!r}: use one of {', '.join(BACKENDS)}")
    if requested == "onnxruntime":
        return Choice("onnxruntime", _ort_role(bundle, precision), "asked for in the config")

    if requested == "tensorrt":
        blocker = _trt_blocker(facts)
        if blocker:
            raise BackendUnavailable(blocker[1])
        role, reason = _pick_engine(bundle, precision, facts)
        if role is None:
            raise BundleError(reason)
        return Choice("tensorrt", role, reason, dla_core=_dla_core(bundle, role))

    if requested == "onnxruntime-cuda":
        from linecam.runtime.backends.onnxruntime import ORT_GPU_HINT, ort_cuda_missing_message

        if CUDA_EP not in facts.ort_providers:
            raise BackendUnavailable(ort_cuda_missing_message())
        if facts.gpu is None:
            raise BackendUnavailable(f"backend 'onnxruntime-cuda' needs an NVIDIA GPU, and none was found "
                                     f"({facts.gpu_error or 'none found'}): check the driver (nvidia-smi); "
                                     f"{ORT_GPU_HINT}; or set model.backend: onnxruntime")
        return Choice("onnxruntime-cuda", _ort_role(bundle, precision), "asked for in the config")

    # auto: best first; every step down says why the better one was passed over.
    why_not: list[str] = []
    tried: list[Choice] = []
    blocker = _trt_blocker(facts)
    if blocker:
        why_not.append(f"no TensorRT ({blocker[0]})")
    else:
        role, reason = _pick_engine(bundle, precision, facts)
        if role is not None:
            tried.append(Choice("tensorrt", role, f"auto: {reason}", dla_core=_dla_core(bundle, role)))
        else:
            why_not.append(f"no TensorRT engine for this device ({reason})")
    prefix = "auto: " + "".join(f"{w}; " for w in why_not)
    errors: list[BundleError] = []
    if CUDA_EP in facts.ort_providers and facts.gpu is not None:
        try:
            tried.append(Choice("onnxruntime-cuda", _ort_role(bundle, precision),
                                f"{prefix}ONNX Runtime CUDA on {facts.gpu}"))
        except BundleError as e:
            errors.append(e)
        cpu_why = "ONNX Runtime on the CPU"
    else:
        cpu_why = ("no ONNX Runtime CUDA (" + ("no GPU" if facts.gpu is None else f"onnxruntime has no {CUDA_EP}")
                   + "); ONNX Runtime on the CPU")
    try:
        tried.append(Choice("onnxruntime", _ort_role(bundle, precision), prefix + cpu_why))
    except BundleError as e:
        errors.append(e)
    if not tried:
        raise errors[0]
    best = tried[0]
    return Choice(best.backend, best.role, best.reason, best.dla_core, tuple(tried[1:]))


def _dla_core(bundle: Bundle, role: str) -> int | None:
    return read_sidecar(bundle, role)[1].build.dla_core


def open_runner(bundle: Bundle, choice: Choice, *, intra_op_threads: int = 0, workers: int = 1,
                cuda_graph: bool = False, auto: bool = False) -> Runner:
    """Construct the chosen runner; with ``auto``, a runner that fails to open steps down
    to the next choice (logged), an explicit one raises."""
    candidates = (choice, *choice.fallbacks)
    for i, c in enumerate(candidates):
        try:
            runner = _construct(bundle, c, intra_op_threads, workers, cuda_graph)
        except Exception as e:  # auto also steps down on CUDA errors (out of memory, driver trouble)
            if not auto or i == len(candidates) - 1:
                raise
            logger.warning("backend %s (%s) failed to start: %s; trying %s", c.backend, c.role, e,
                           candidates[i + 1].backend)
            continue
        logger.info("backend %s, model %s: %s", c.backend, c.role, c.reason)
        return runner
    raise AssertionError("unreachable")  # pragma: no cover


def _construct(bundle: Bundle, c: Choice, intra_op_threads: int, workers: int, cuda_graph: bool) -> Runner:
    path = bundle.path(c.role)
    if c.backend == "tensorrt":
        from linecam.runtime.backends.tensorrt import TensorRTRunner

        return TensorRTRunner(path, bundle.manifest, c.role, slots=workers, cuda_graph=cuda_graph,
                              dla_core=c.dla_core)
    if c.backend == "onnxruntime-cuda":
        from linecam.runtime.backends.onnxruntime import OrtRunner, cuda_providers

        return OrtRunner(path, bundle.manifest, role=c.role, providers=cuda_providers())
    from linecam.runtime.backends.onnxruntime import OrtRunner

    return OrtRunner(path, bundle.manifest, intra_op_threads=intra_op_threads, role=c.role)
