"""Facts about this machine's accelerator stack: GPU, compute capability, TensorRT, CUDA, JetPack.

Everything is optional: on a machine without an NVIDIA GPU every field is None and
:func:`probe_device` still returns in milliseconds. The facts decide which backend
``auto`` picks and whether a TensorRT engine in the bundle was built for this device
(see :mod:`linecam.runtime.backends.sidecar`). Only GPU 0 is described: the daemon runs
one model on one device; choose another with ``CUDA_VISIBLE_DEVICES``.

torch is never imported here (the daemon side starts without it); whether it is
installed is recorded so the TensorRT runner can fall back to it for device buffers.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from linecam.errors import LinecamError

logger = logging.getLogger(__name__)

TEGRA_RELEASE = Path("/etc/nv_tegra_release")

#: Device facts a TensorRT engine is bound to, in the order messages name them.
#: An engine runs only where all of these equal what they were at build time.
ENGINE_KEYS = ("tensorrt", "gpu", "compute_capability", "l4t", "platform")


class BackendUnavailable(LinecamError):
    """The inference backend asked for cannot run on this machine (a package or the GPU is missing).

    Exit code 3, like a bundle that does not fit this machine (an engine built for another GPU):
    a restart cannot install TensorRT, so systemd must not retry it (``RestartPreventExitStatus``)."""

    exit_code = 3


@dataclass(frozen=True)
class DeviceFacts:
    #: GPU 0's name as the CUDA runtime reports it, e.g. "NVIDIA H100 80GB HBM3", "Orin".
    gpu: str | None = None
    #: "major.minor", e.g. "9.0" (H100), "8.7" (Orin), "8.9" (RTX 40xx).
    compute_capability: str | None = None
    #: Why there is no GPU information (no driver, no cuda-python ...), for log lines.
    gpu_error: str | None = None
    #: ``tensorrt.__version__``, e.g. "10.3.0.30"; None when it cannot be imported.
    tensorrt: str | None = None
    tensorrt_error: str | None = None
    #: CUDA runtime / driver API versions as "major.minor" (informational: TensorRT
    #: engines are bound to the TensorRT build, which is bound to its CUDA major).
    cuda_runtime: str | None = None
    cuda_driver: str | None = None
    #: NVIDIA driver version (nvidia-smi), e.g. "575.57.08".
    driver: str | None = None
    #: cuda-python's runtime bindings import (device buffers, streams, CUDA graphs).
    cuda_python: bool = False
    cuda_python_error: str | None = None
    #: torch with CUDA is installed (not imported; a "+cpu" build does not count): the fallback
    #: for device buffers.
    torch: bool = False
    #: ``onnxruntime.get_available_providers()``.
    ort_providers: tuple[str, ...] = ()
    #: Jetson: L4T release from /etc/nv_tegra_release ("36.4.0") and JetPack ("6.1").
    l4t: str | None = None
    jetpack: str | None = None
    #: "<OS>-<arch>", e.g. "Linux-x86_64", "Linux-aarch64".
    platform: str = field(default_factory=lambda: f"{platform.system()}-{platform.machine()}")

    @property
    def has_gpu(self) -> bool:
        return self.gpu is not None

    @property
    def is_jetson(self) -> bool:
        return self.l4t is not None

    def engine_target(self) -> dict[str, str]:
        """The facts an engine built here is bound to (None fields left out), as stored in
        the bundle manifest's ``FileEntry.target`` and the engine's sidecar."""
        return {k: str(getattr(self, k)) for k in ENGINE_KEYS if getattr(self, k) is not None}

    def describe(self) -> str:
        """One line for logs, e.g. 'NVIDIA H100 80GB HBM3 (sm 9.0), TensorRT 10.13.0.35, CUDA 12.9'."""
        if self.gpu is None:
            return f"no NVIDIA GPU ({self.gpu_error or 'none found'})"
        parts = [f"{self.gpu} (compute capability {self.compute_capability or '?'})"]
        parts.append(f"TensorRT {self.tensorrt}" if self.tensorrt else "no TensorRT")
        if self.cuda_runtime:
            parts.append(f"CUDA {self.cuda_runtime}")
        if self.l4t:
            parts.append(f"L4T {self.l4t}" + (f" / JetPack {self.jetpack}" if self.jetpack else ""))
        return ", ".join(parts)

    def with_(self, **changes: Any) -> DeviceFacts:
        return replace(self, **changes)


# --------------------------------------------------------------------------- parsing (pure)


def parse_nv_tegra_release(text: str) -> str | None:
    """``# R36 (release), REVISION: 4.0, GCID: ...`` -> ``"36.4.0"`` (None if not that format)."""
    m = re.search(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*([0-9.]+)", text)
    if m is None:
        return None
    rev = m.group(2).strip(".")
    return f"{m.group(1)}.{rev}"


def parse_jetpack_version(text: str) -> str | None:
    """The ``nvidia-jetpack`` package version (``6.1+b123``, ``5.1.2-b104``) -> ``"6.1"`` / ``"5.1.2"``."""
    m = re.match(r"\s*(\d+(?:\.\d+)*)", text)
    return m.group(1) if m else None


def version_from_int(v: int) -> str:
    """CUDA's integer versions: 12060 -> "12.6", 11080 -> "11.8"."""
    return f"{v // 1000}.{(v % 1000) // 10}"


def first_line(err: BaseException | str) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# --------------------------------------------------------------------------- probing


def load_cudart() -> Any:
    """cuda-python's runtime module (``cuda.bindings.runtime``; ``cuda.cudart`` before 12.6)."""
    try:
        from cuda.bindings import runtime as cudart  # type: ignore[import-not-found]
    except ImportError:
        from cuda import cudart  # type: ignore[import-not-found,no-redef]
    return cudart


def _cuda_facts() -> dict[str, Any]:
    try:
        cudart = load_cudart()
    except Exception as e:  # ImportError, or a broken install raising anything
        return {"cuda_python": False, "cuda_python_error": first_line(e)}
    out: dict[str, Any] = {"cuda_python": True}
    try:
        err, count = cudart.cudaGetDeviceCount()
        if int(err) != 0 or count < 1:
            out["gpu_error"] = f"CUDA reports no device ({err})"
            return out
        err, prop = cudart.cudaGetDeviceProperties(0)
        if int(err) == 0:
            name = prop.name
            out["gpu"] = (name.split(b"\0", 1)[0].decode(errors="replace") if isinstance(name, bytes)
                          else str(name)).strip()
            out["compute_capability"] = f"{prop.major}.{prop.minor}"
        err, rv = cudart.cudaRuntimeGetVersion()
        if int(err) == 0:
            out["cuda_runtime"] = version_from_int(rv)
        err, dv = cudart.cudaDriverGetVersion()
        if int(err) == 0 and dv:
            out["cuda_driver"] = version_from_int(dv)
    except Exception as e:
        out["gpu_error"] = f"CUDA query failed: {first_line(e)}"
    return out


def _nvidia_smi() -> dict[str, str]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {}
    try:
        out = subprocess.run([exe, "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        logger.debug("nvidia-smi failed", exc_info=True)
        return {}
    lines = out.strip().splitlines()
    parts = [p.strip() for p in lines[0].split(",")] if lines else []
    if len(parts) != 3:
        return {}
    facts = {"gpu": parts[0], "driver": parts[2]}
    if re.fullmatch(r"\d+\.\d+", parts[1]):
        facts["compute_capability"] = parts[1]
    return facts


def _jetson(tegra_release: Path) -> dict[str, str | None]:
    try:
        l4t = parse_nv_tegra_release(tegra_release.read_text(errors="replace"))
    except OSError:
        return {}
    if l4t is None:
        return {}
    jetpack = None
    exe = shutil.which("dpkg-query")
    if exe is not None:
        try:
            proc = subprocess.run([exe, "-W", "-f=${Version}", "nvidia-jetpack"], capture_output=True,
                                  text=True, timeout=10)
            if proc.returncode == 0:
                jetpack = parse_jetpack_version(proc.stdout)
        except (OSError, subprocess.SubprocessError):
            logger.debug("dpkg-query failed", exc_info=True)
    return {"l4t": l4t, "jetpack": jetpack}


def tensorrt_version() -> tuple[str | None, str | None]:
    """(version, None) or (None, why it cannot be imported)."""
    try:
        import tensorrt as trt  # type: ignore[import-not-found]
    except Exception as e:  # ImportError, or a wheel whose libraries fail to load
        return None, first_line(e)
    return str(getattr(trt, "__version__", "unknown")), None


def torch_with_cuda() -> bool:
    """torch is installed and is not a CPU-only build, judged without importing it (the
    daemon never imports torch; a CPU wheel says so in its version, e.g. ``2.13.0+cpu``)."""
    try:
        if importlib.util.find_spec("torch") is None:
            return False
    except (ImportError, ValueError):  # a broken or blocked install
        return False
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:  # a source tree on sys.path: give it the benefit
        return True
    return not version.endswith("+cpu")


def probe_device(tegra_release: Path = TEGRA_RELEASE, *, tensorrt: bool = True) -> DeviceFacts:
    """Look at this machine; never raises. ``tensorrt=False`` skips importing TensorRT."""
    facts: dict[str, Any] = {}
    facts.update(_jetson(tegra_release))
    facts.update(_cuda_facts())
    if facts.get("gpu") is None:
        smi = _nvidia_smi()
        if smi:
            facts.update(smi)
            facts.pop("gpu_error", None)
        elif "gpu_error" not in facts:
            facts["gpu_error"] = ("no cuda-python and no nvidia-smi" if not facts.get("cuda_python")
                                  else "no NVIDIA GPU found")
    elif facts.get("driver") is None:
        facts["driver"] = _nvidia_smi().get("driver")
    if tensorrt:
        facts["tensorrt"], facts["tensorrt_error"] = tensorrt_version()
    else:
        facts["tensorrt_error"] = "not probed"
    facts["torch"] = torch_with_cuda()
    try:
        import onnxruntime as ort

        facts["ort_providers"] = tuple(ort.get_available_providers())
    except Exception:  # pragma: no cover - onnxruntime is a hard dependency
        facts["ort_providers"] = ()
    result = DeviceFacts(**facts)
    logger.debug("device facts: %s", result)
    return result
