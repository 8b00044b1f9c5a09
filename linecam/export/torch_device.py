"""Where the workstation's torch work runs (training, teacher features, distances): one rule for
every command with ``--device``.

``auto`` takes the CUDA GPU when torch sees one, else the CPU, so a GPU workstation trains on
its GPU without being told and a CPU-only one keeps working. Export, calibration and the gate
always run on the CPU (ONNX Runtime), whatever the device: the deployed graph is what is judged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal, get_args

from linecam.errors import BundleError
from linecam.runtime.device import first_line

if TYPE_CHECKING:
    import torch

Device = Literal["auto", "cpu", "cuda"]
#: The choices of every ``--device`` option. torch is imported inside the functions, so the CLI
#: modules can take this list and ``export-engine --help`` still starts without torch.
DEVICES: tuple[str, ...] = get_args(Device)


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` / ``cpu`` / ``cuda`` -> the torch device; a one-line error when CUDA is asked for
    and torch has none (a CPU build of torch, no driver, or no GPU)."""
    import torch

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
    import torch

    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


@contextlib.contextmanager
def gpu_memory_errors(what: str, kept: str = "") -> Iterator[None]:
    """A GPU out of memory inside the block becomes one line that says what to do; ``kept`` says
    what survives for the re-run (a checkpoint, a cached teacher). Only torch's GPU allocator
    raises :class:`torch.OutOfMemoryError` (the CPU's says ``RuntimeError``), so no device test."""
    import torch

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


class LossLog:
    """A training loop's per-step losses, kept on the device and read back in groups.

    ``float(loss)`` every step would make the CPU wait for the GPU to finish that step before it
    draws the next batch; kept as tensors until a progress update or a checkpoint (every 10 or
    100 steps) reads them, the CPU prepares step ``k + 1`` while the GPU computes step ``k``.
    On the CPU it changes nothing."""

    def __init__(self, values: list[float] | None = None) -> None:
        self._values = list(values or [])
        self._pending: list[torch.Tensor] = []

    def add(self, loss: torch.Tensor) -> None:
        self._pending.append(loss.detach())

    def values(self) -> list[float]:
        """Every loss so far, as floats (waits for the device once for all pending ones)."""
        if self._pending:
            import torch

            self._values.extend(torch.stack(self._pending).tolist())
            self._pending.clear()
        return self._values

    def recent_mean(self, n: int = 50) -> float:
        """Mean of the last ``n`` losses (the progress bar's figure); NaN before the first."""
        v = self.values()[-n:]
        return sum(v) / len(v) if v else float("nan")
