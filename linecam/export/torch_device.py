"""Where the workstation's torch work runs (training, teacher features, distances): one rule for
every command with ``--device``.

``auto`` takes the CUDA GPU when torch sees one, else the CPU, so a GPU workstation trains on
its GPU without being told and a CPU-only one keeps working. Export, calibration and the gate
always run on the CPU (ONNX Runtime), whatever the device: the deployed graph is what is judged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch

from linecam.errors import BundleError
from linecam.runtime.device import first_line

Device = Literal["auto", "cpu", "cuda"]
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` / ``cpu`` / ``cuda`` -> the torch device; a one-line error when CUDA is asked for
    and torch has none (a CPU build of torch, no driver, or no GPU)."""
    if device not in DEVICES:
        raise BundleError(f"device {device!r}: choose from {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise BundleError(f"--device cuda asked for but torch {torch.__version__} ({build}) sees no CUDA GPU: "
                          "install a CUDA build of torch and the NVIDIA driver, or use --device cpu")
    if device in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def describe_device(device: torch.device) -> str:
    """``cuda (NVIDIA H200)`` / ``cpu (8 threads)``: for the log line that says where training runs."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


@contextlib.contextmanager
def gpu_memory_errors(what: str, kept: str = "") -> Iterator[None]:
    """A GPU out of memory inside the block becomes one line that says what to do; ``kept`` says
    what survives for the re-run (a checkpoint, a cached teacher). Only torch's GPU allocator
    raises :class:`torch.OutOfMemoryError` (the CPU's says ``RuntimeError``), so no device test."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        free = ""
        if torch.cuda.is_available():
            got, total = torch.cuda.mem_get_info()
            free = f"; {got / 2**30:.1f} of {total / 2**30:.1f} GiB free now"
        said = ". ".join(first_line(e).split(". ")[:2])  # torch's line runs on with allocator advice
        raise BundleError(f"{what}: the GPU ran out of memory ({said}{free}): free it (another "
                          f"process may hold it), lower --batch-size, or use --device cpu{kept}") from None
