"""TensorRT (>= 10) runner: a serialized engine from the bundle, run with the name-based I/O API.

``set_tensor_address`` + ``execute_async_v3`` on a non-default CUDA stream; device
buffers from cuda-python (``cuda.bindings.runtime``), or from torch when cuda-python
is missing; page-locked (pinned) host buffers so that copies are truly asynchronous;
optional CUDA-graph replay of copy-in + inference + copy-out (one graph per input shape).
No pycuda.

Thread safety: :meth:`TensorRTRunner.run` may be called from several worker threads.
The runner owns ``slots`` execution *slots*, each with its own execution context (they
share the engine's weights; each needs its own activation memory), CUDA stream, buffers
and CUDA graph. A call borrows a free slot and returns it, so with ``slots`` equal to
the number of workers no thread ever waits for another; with fewer, calls queue for a
slot (a lock, in effect), never share one.

Import of this module never imports TensorRT: :func:`import_tensorrt` does, on first use,
and turns a missing package into one line that says how to get it.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from linecam.bundle import Manifest
from linecam.errors import BundleError
from linecam.runtime.backends.base import ExpertOutput, Runner
from linecam.runtime.device import BackendUnavailable, first_line, load_cudart

logger = logging.getLogger(__name__)


TRT_INSTALL_HINT = ("on Jetson use JetPack's own TensorRT (sudo apt install nvidia-tensorrt python3-libnvinfer; "
                    "no pip wheel exists for Tegra; a venv needs --system-site-packages to see it), "
                    "elsewhere pip install 'linecam[trt]'")


def trt_missing_message(why: str | None, what: str = "backend 'tensorrt'") -> str:
    alt = "set model.backend: onnxruntime" if what.startswith("backend") else "keep using the bundle's ONNX model"
    return (f"{what} needs the TensorRT Python package, which cannot be imported here "
            f"({why or 'No module named tensorrt'}): {TRT_INSTALL_HINT}; or {alt}")


def import_tensorrt(what: str = "backend 'tensorrt'") -> Any:
    try:
        import tensorrt as trt  # type: ignore[import-not-found]
    except Exception as e:  # ImportError, or libnvinfer failing to load
        raise BackendUnavailable(trt_missing_message(first_line(e), what)) from None
    major = int(str(trt.__version__).split(".")[0])
    if major < 10:
        raise BackendUnavailable(f"{what} needs TensorRT >= 10 (this is {trt.__version__}): upgrade JetPack "
                                 f"to 6.x or pip install 'linecam[trt]'")
    return trt


@functools.cache
def make_trt_logger(trt: Any, name: str = "linecam.tensorrt") -> Any:
    """A TensorRT ILogger that forwards to :mod:`logging` and remembers the latest errors (for
    one-line messages). One per process: TensorRT keeps a global logger and warns when a
    builder or runtime is handed a different one."""
    log = logging.getLogger(name)
    sev = trt.ILogger.Severity
    levels = {sev.INTERNAL_ERROR: logging.ERROR, sev.ERROR: logging.ERROR, sev.WARNING: logging.WARNING,
              sev.INFO: logging.DEBUG, sev.VERBOSE: logging.DEBUG}

    class _Logger(trt.ILogger):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            level = levels.get(severity, logging.DEBUG)
            if level >= logging.ERROR:
                self.errors.append(msg.strip())
                del self.errors[:-20]
            log.log(level, "%s", msg.strip())

    return _Logger()


def numpy_dtype(trt: Any, dt: Any) -> np.dtype:
    try:
        return np.dtype(trt.nptype(dt))
    except (TypeError, KeyError):
        raise BundleError(f"engine tensor type {dt} has no numpy equivalent: rebuild the engine from an "
                          f"ONNX with float32/float16 inputs and outputs (keep_io_types)") from None


# --------------------------------------------------------------------------- CUDA memory


def _check(result: Any) -> Any:
    """cuda-python calls return (cudaError_t, *values)."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {int(err)} ({getattr(err, 'name', err)})")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else tuple(rest)


class _CudartMemory:
    """Buffers, streams and graphs through cuda-python's runtime API."""

    name = "cuda-python"

    def __init__(self) -> None:
        self.rt = load_cudart()
        self._graph_exec: Any = None

    def device(self, nbytes: int) -> tuple[int, Any]:
        ptr = _check(self.rt.cudaMalloc(max(nbytes, 1)))
        return int(ptr), ptr

    def host(self, nbytes: int, dtype: np.dtype, shape: tuple[int, ...]) -> tuple[np.ndarray, Any]:
        ptr = int(_check(self.rt.cudaMallocHost(max(nbytes, 1))))
        raw = (ctypes.c_byte * max(nbytes, 1)).from_address(ptr)
        arr = np.frombuffer(raw, dtype=np.uint8, count=nbytes).view(dtype).reshape(shape)
        return arr, ptr

    def stream(self) -> tuple[int, Any]:
        # Non-blocking: never serialised with the legacy default stream (a capture requirement too).
        flags = getattr(self.rt, "cudaStreamNonBlocking", 1)
        s = _check(self.rt.cudaStreamCreateWithFlags(flags))
        return int(s), s

    def h2d(self, dst: int, src: np.ndarray, stream: Any) -> None:
        _check(self.rt.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes,
                                       self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))

    def d2h(self, dst: np.ndarray, src: int, stream: Any) -> None:
        _check(self.rt.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes,
                                       self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))

    def sync(self, stream: Any) -> None:
        _check(self.rt.cudaStreamSynchronize(stream))

    def capture(self, stream: Any, work: Any) -> Any:
        """Record ``work()`` (issued on ``stream``) into an executable graph."""
        rt = self.rt
        # ThreadLocal: other workers' CUDA calls (on their own streams) must not be
        # pulled into, or invalidate, this capture.
        _check(rt.cudaStreamBeginCapture(stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))
        try:
            work()
        finally:
            graph = _check(rt.cudaStreamEndCapture(stream))
        try:
            try:
                exe = _check(rt.cudaGraphInstantiate(graph, 0))
            except TypeError:  # cuda-python 11.x signature: (graph, logBuffer, bufferSize)
                exe = _check(rt.cudaGraphInstantiate(graph, b"", 0))
                exe = exe[0] if isinstance(exe, tuple) else exe
        finally:
            _check(rt.cudaGraphDestroy(graph))
        return exe

    def launch(self, exe: Any, stream: Any) -> None:
        _check(self.rt.cudaGraphLaunch(exe, stream))

    def free(self, kind: str, handle: Any) -> None:
        rt = self.rt
        fn = {"device": rt.cudaFree, "host": rt.cudaFreeHost, "stream": rt.cudaStreamDestroy,
              "graph": rt.cudaGraphExecDestroy}[kind]
        try:
            _check(fn(handle))
        except Exception:  # freeing at shutdown must not mask the real error
            logger.debug("freeing %s failed", kind, exc_info=True)


class _TorchMemory:
    """The same through torch (when cuda-python is missing but a CUDA torch is installed)."""

    name = "torch"

    def __init__(self) -> None:
        import torch  # noqa: PLC0415 - optional, heavy

        if not torch.cuda.is_available():
            raise RuntimeError("torch is installed without CUDA")
        self.torch = torch
        self._tensors: dict[int, Any] = {}  # pointer -> tensor, for copies

    def device(self, nbytes: int) -> tuple[int, Any]:
        t = self.torch.empty(max(nbytes, 1), dtype=self.torch.uint8, device="cuda")
        self._tensors[t.data_ptr()] = t
        return t.data_ptr(), t

    def host(self, nbytes: int, dtype: np.dtype, shape: tuple[int, ...]) -> tuple[np.ndarray, Any]:
        t = self.torch.empty(max(nbytes, 1), dtype=self.torch.uint8, pin_memory=True)
        arr = t.numpy()[:nbytes].view(dtype).reshape(shape)
        self._tensors[arr.ctypes.data] = t
        return arr, t

    def stream(self) -> tuple[int, Any]:
        s = self.torch.cuda.Stream()
        return int(s.cuda_stream), s

    def _dev(self, ptr: int, nbytes: int) -> Any:
        return self._tensors[ptr][:nbytes]

    def h2d(self, dst: int, src: np.ndarray, stream: Any) -> None:
        with self.torch.cuda.stream(stream):
            self._dev(dst, src.nbytes).copy_(self._tensors[src.ctypes.data][:src.nbytes], non_blocking=True)

    def d2h(self, dst: np.ndarray, src: int, stream: Any) -> None:
        with self.torch.cuda.stream(stream):
            self._tensors[dst.ctypes.data][:dst.nbytes].copy_(self._dev(src, dst.nbytes), non_blocking=True)

    def sync(self, stream: Any) -> None:
        stream.synchronize()

    def capture(self, stream: Any, work: Any) -> Any:
        g = self.torch.cuda.CUDAGraph()
        with self.torch.cuda.graph(g, stream=stream, capture_error_mode="thread_local"):
            work()
        return g

    def launch(self, exe: Any, stream: Any) -> None:
        with self.torch.cuda.stream(stream):
            exe.replay()

    def free(self, kind: str, handle: Any) -> None:
        if kind in ("device", "host"):
            for k, v in list(self._tensors.items()):
                if v is handle:
                    del self._tensors[k]


def make_memory(prefer: str = "auto") -> Any:
    """cuda-python first (no torch import on the edge); torch as the fallback."""
    errors = []
    if prefer in ("auto", "cuda-python"):
        try:
            return _CudartMemory()
        except Exception as e:
            errors.append(f"cuda-python: {first_line(e)}")
    if prefer in ("auto", "torch"):
        try:
            return _TorchMemory()
        except Exception as e:
            errors.append(f"torch: {first_line(e)}")
    raise BackendUnavailable(f"backend 'tensorrt' needs cuda-python (or a CUDA build of torch) for device "
                             f"buffers ({'; '.join(errors)}): pip install 'cuda-python>=12' (on Jetson: "
                             f"pip install cuda-python matching JetPack's CUDA)")


# --------------------------------------------------------------------------- engine I/O


@dataclass
class _Tensor:
    name: str
    is_input: bool
    dtype: np.dtype
    shape: tuple[int, ...]          # allocation shape (the profile's max for dynamic inputs)
    dynamic: bool = False


@dataclass
class _Slot:
    context: Any
    stream_ptr: int
    stream: Any
    device: dict[str, int] = field(default_factory=dict)
    host: dict[str, np.ndarray] = field(default_factory=dict)
    keep: list[tuple[str, Any]] = field(default_factory=list)
    shape: tuple[int, ...] | None = None      # current input shape set on the context
    graphs: dict[tuple[int, ...], Any] = field(default_factory=dict)
    graph_failed: bool = False


class TensorRTRunner(Runner):
    """Runs a serialized TensorRT engine. Construct it only after the sidecar check
    (:func:`linecam.runtime.backends.sidecar.check_engine`); :func:`make_runner` does."""

    name = "tensorrt"

    def __init__(self, engine_path: Path, manifest: Manifest, role: str, *, slots: int = 1,
                 cuda_graph: bool = False, dla_core: int | None = None, memory: str = "auto") -> None:
        trt = import_tensorrt()
        self.role = role
        self.cuda_graph = cuda_graph
        self._trt = trt
        self._mem = make_memory(memory)
        self._logger = make_trt_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        if dla_core is not None:
            self._runtime.DLA_core = int(dla_core)
        try:
            data = Path(engine_path).read_bytes()
        except OSError as e:
            raise BundleError(f"cannot read TensorRT engine {engine_path} ({e.strerror or e})") from None
        self._engine = self._runtime.deserialize_cuda_engine(data)
        if self._engine is None:
            why = self._logger.errors[-1] if self._logger.errors else "TensorRT could not deserialize it"
            raise BundleError(f"TensorRT cannot load engine {engine_path} ({why.splitlines()[0]}): rebuild it "
                              f"on this device with export-engine trt")
        self._input = manifest.input.name
        self._map = manifest.outputs.anomaly_map.name
        self._score = manifest.outputs.image_score.name
        self._labels = manifest.outputs.label_maps.name if manifest.outputs.label_maps else None  # text expert
        self._tensors = self._describe_io(engine_path)
        self._slots: queue.SimpleQueue[_Slot] = queue.SimpleQueue()
        self._all: list[_Slot] = []
        self._closed = threading.Event()
        for _ in range(max(1, slots)):
            slot = self._new_slot()
            self._all.append(slot)
            self._slots.put(slot)
        logger.info("tensorrt %s engine %s (%s): %d slot(s), buffers via %s, CUDA graph %s", trt.__version__,
                    Path(engine_path).name, role, len(self._all), self._mem.name, "on" if cuda_graph else "off")

    # -- setup ---------------------------------------------------------------------------------
    def _describe_io(self, engine_path: Path) -> dict[str, _Tensor]:
        trt, eng = self._trt, self._engine
        tensors: dict[str, _Tensor] = {}
        for i in range(eng.num_io_tensors):
            name = eng.get_tensor_name(i)
            is_input = eng.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            shape = tuple(int(d) for d in eng.get_tensor_shape(name))
            dynamic = any(d < 0 for d in shape)
            if dynamic and is_input:
                shape = tuple(int(d) for d in eng.get_tensor_profile_shape(name, 0)[2])  # profile max
            tensors[name] = _Tensor(name, is_input, numpy_dtype(trt, eng.get_tensor_dtype(name)), shape, dynamic)
        missing = [n for n in (self._input, self._map, self._score, self._labels) if n and n not in tensors]
        if missing or not tensors[self._input].is_input:
            raise BundleError(f"engine {engine_path} does not match its manifest (missing tensors: "
                              f"{', '.join(missing) or self._input}); rebuild it with export-engine trt")
        extra = [t.name for t in tensors.values() if t.is_input and t.name != self._input]
        if extra:
            raise BundleError(f"engine {engine_path} has inputs the manifest does not describe ({', '.join(extra)}): "
                              f"the region expert takes one image input; re-export the model")
        return tensors

    def _new_slot(self) -> _Slot:
        ctx = self._engine.create_execution_context()
        if ctx is None:
            raise BundleError("TensorRT cannot create an execution context (out of GPU memory?): "
                              "use fewer runtime.workers or a smaller model")
        ptr, stream = self._mem.stream()
        slot = _Slot(context=ctx, stream_ptr=ptr, stream=stream)
        slot.keep.append(("stream", stream))
        # Dynamic inputs: size output buffers for the largest input the profile allows.
        for t in self._tensors.values():
            if t.is_input and t.dynamic:
                ctx.set_input_shape(t.name, t.shape)
        for t in self._tensors.values():
            shape = t.shape if t.is_input else tuple(int(d) for d in ctx.get_tensor_shape(t.name))
            nbytes = int(np.prod(shape)) * t.dtype.itemsize
            dptr, dh = self._mem.device(nbytes)
            host, hh = self._mem.host(nbytes, t.dtype, shape)
            slot.keep += [("device", dh), ("host", hh)]
            slot.device[t.name] = dptr
            slot.host[t.name] = host
            if not ctx.set_tensor_address(t.name, dptr):
                raise BundleError(f"TensorRT refused the buffer for tensor '{t.name}'")
        return slot

    # -- inference -----------------------------------------------------------------------------
    def _set_shape(self, slot: _Slot, shape: tuple[int, ...]) -> None:
        t = self._tensors[self._input]
        if shape == slot.shape:
            return
        if t.dynamic:
            if len(shape) != len(t.shape) or any(s > m for s, m in zip(shape, t.shape)):
                raise ValueError(f"input shape {shape} is outside the engine's profile (max {t.shape})")
            slot.context.set_input_shape(t.name, shape)
        elif shape != t.shape:
            raise ValueError(f"input shape {shape} does not match the engine's static shape {t.shape}")
        slot.shape = shape

    def _enqueue(self, slot: _Slot, shape: tuple[int, ...]) -> None:
        """Copy-in, inference, copy-out on the slot's stream (also what a graph records)."""
        mem, s = self._mem, slot.stream
        n_in = int(np.prod(shape))
        for t in self._tensors.values():
            if t.is_input:
                mem.h2d(slot.device[t.name], slot.host[t.name].reshape(-1)[:n_in], s)
        if not slot.context.execute_async_v3(slot.stream_ptr):
            raise RuntimeError("TensorRT execute_async_v3 failed: " + (self._logger.errors[-1:] or ["see log"])[0])
        for t in self._tensors.values():
            if not t.is_input:
                mem.d2h(slot.host[t.name], slot.device[t.name], s)

    def _graph(self, slot: _Slot, shape: tuple[int, ...]) -> Any | None:
        if not self.cuda_graph or slot.graph_failed:
            return None
        exe = slot.graphs.get(shape)
        if exe is None:
            try:
                # TensorRT needs one ordinary enqueue for a shape before it can be captured.
                self._enqueue(slot, shape)
                self._mem.sync(slot.stream)
                exe = self._mem.capture(slot.stream, lambda: self._enqueue(slot, shape))
            except Exception as e:  # e.g. DLA layers or an engine feature that cannot be captured
                slot.graph_failed = True
                logger.warning("CUDA graph capture failed (%s): running without it", first_line(e))
                return None
            slot.graphs[shape] = exe
            slot.keep.append(("graph", exe))
        return exe

    def run(self, x: np.ndarray) -> ExpertOutput:
        if self._closed.is_set():
            raise RuntimeError("runner is closed")
        slot = self._slots.get()
        try:
            shape = tuple(x.shape)
            self._set_shape(slot, shape)
            host_in = slot.host[self._input]
            np.copyto(host_in.reshape(-1)[: x.size].reshape(shape), x, casting="same_kind")
            exe = self._graph(slot, shape)
            if exe is not None:
                self._mem.launch(exe, slot.stream)
            else:
                self._enqueue(slot, shape)
            self._mem.sync(slot.stream)
            out_shape = tuple(int(d) for d in slot.context.get_tensor_shape(self._map))
            n = int(np.prod(out_shape))
            # Copies: the slot's pinned buffers are reused by the next call on this slot.
            amap = slot.host[self._map].reshape(-1)[:n].astype(np.float32).reshape(out_shape[-2:])
            score = float(slot.host[self._score].reshape(-1)[0])
            named = None
            if self._labels is not None:
                lshape = tuple(int(d) for d in slot.context.get_tensor_shape(self._labels))
                named = (slot.host[self._labels].reshape(-1)[:int(np.prod(lshape))].astype(np.float32)
                         .reshape(lshape[-3:]))
        finally:
            self._slots.put(slot)
        return ExpertOutput(anomaly_map=amap, score=score, label_maps=named)

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        for slot in self._all:
            slot.context = None  # the context goes first: it holds the buffers' addresses
            for kind, handle in reversed(slot.keep):  # graphs, then buffers, then the stream
                self._mem.free(kind, handle)
        self._all.clear()
        self._engine = None
