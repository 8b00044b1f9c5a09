"""What the numbers were measured on: CPU, cores, memory, GPU, library versions, load.

A benchmark result without the machine is not a result. The load average and the
CPU other processes used *during* the run are recorded too: on a shared machine they
explain a noisy tail better than any guess.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import shutil
import subprocess
import sys
from typing import Any

import psutil

logger = logging.getLogger(__name__)

#: Distributions whose versions change the numbers (missing ones are recorded as null).
LIBRARIES = ("linecam", "numpy", "opencv-python-headless", "onnxruntime", "onnxruntime-gpu", "paho-mqtt",
             "psutil", "tensorrt", "torch", "matplotlib")


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux, ``platform`` elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def gpus() -> list[dict[str, str]]:
    """NVIDIA GPUs by ``nvidia-smi`` (empty when there is none or no driver)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        logger.debug("nvidia-smi failed", exc_info=True)
        return []
    rows = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            rows.append({"name": parts[0], "memory": parts[1], "driver": parts[2]})
    return rows


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def mosquitto_version(exe: str | None) -> str | None:
    if exe is None:
        return None
    try:
        # mosquitto -h prints "mosquitto version X.Y.Z" and exits non-zero.
        proc = subprocess.run([exe, "-h"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (proc.stdout + proc.stderr).splitlines():
        if "version" in line:
            return line.strip().split("version", 1)[1].strip() or None
    return None


def ort_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def machine_info(mosquitto_exe: str | None = None) -> dict[str, Any]:
    """Everything about this machine that a reader needs to compare results."""
    vm = psutil.virtual_memory()
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not on every OS
        affinity = os.cpu_count() or 1
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = []
    return {
        "hostname": platform.node(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_model": cpu_model(),
        "cpu_logical": psutil.cpu_count(logical=True) or 1,
        "cpu_physical": psutil.cpu_count(logical=False),
        "cpu_usable": affinity,
        "memory_gb": round(vm.total / 2**30, 1),
        "gpus": gpus(),
        "onnxruntime_providers": ort_providers(),
        "libraries": library_versions(),
        "mosquitto": mosquitto_version(mosquitto_exe),
        "load_average_at_start": load,
    }
