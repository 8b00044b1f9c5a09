"""The JSON sidecar next to every TensorRT engine, and the check run before deserializing it.

An engine is bound to the TensorRT version, the GPU model / compute capability and the
OS it was built on. Deserializing a foreign engine fails deep inside TensorRT
("Serialization ... Version tag does not match"), or worse, runs. So the daemon reads
``<engine>.json`` first and, on any difference, stops with one line naming each field
that differs and the exact command that rebuilds the engine on this device.

Metadata stays in a sidecar rather than inside the engine file: a plain engine keeps
working with trtexec, polygraphy and DeepStream.
"""

from __future__ import annotations

import json
import os
import shlex
import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from linecam.bundle import Bundle, FileEntry
from linecam.errors import BundleError
from linecam.runtime.device import ENGINE_KEYS, DeviceFacts

SIDECAR_SCHEMA = 1
SIDECAR_SUFFIX = ".json"
#: Defaults of ``export-engine trt``: options equal to these are left out of rebuild commands.
DEFAULT_OPT_LEVEL = 3


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class EngineDevice(_Model):
    """Where the engine was built (the checked fields are :data:`ENGINE_KEYS`)."""

    tensorrt: str
    gpu: str
    compute_capability: str
    platform: str
    l4t: str | None = None
    jetpack: str | None = None
    cuda_runtime: str | None = None
    cuda_driver: str | None = None
    driver: str | None = None


class EngineSource(_Model):
    role: str
    path: str
    sha256: str
    #: The ONNX this one was derived from (e.g. the FP32 model an FP16 copy was cast from).
    derived_from: str | None = None


class InputProfile(_Model):
    min: list[int]
    opt: list[int]
    max: list[int]


class EngineBuild(_Model):
    """How it was built: enough to rebuild the same engine elsewhere."""

    opt_level: int = DEFAULT_OPT_LEVEL
    workspace_mb: int | None = None
    dla_core: int | None = None
    gpu_fallback: bool = True
    max_batch: int = 1
    strongly_typed: bool = True
    builder_flags: list[str] = Field(default_factory=list)
    timing_cache: str | None = None
    timing_cache_reused: bool = False
    seconds: float | None = None


class EngineSidecar(_Model):
    schema_version: int = SIDECAR_SCHEMA
    engine: str
    engine_sha256: str
    engine_size: int
    built_at: str
    linecam_version: str
    device: EngineDevice
    precision: Literal["fp32", "fp16", "int8"]
    source: EngineSource
    inputs: dict[str, InputProfile]
    outputs: dict[str, list[int]]
    build: EngineBuild
    #: Per-layer device placement (DLA builds), from the engine inspector.
    placement: dict[str, Any] | None = None
    #: Engine vs ONNX Runtime on real images (see linecam.export.trt_verify).
    verification: dict[str, Any] | None = None


def sidecar_path(engine_path: Path) -> Path:
    return engine_path.with_name(engine_path.name + SIDECAR_SUFFIX)


def write_sidecar(engine_path: Path, sidecar: EngineSidecar) -> Path:
    """Atomically, like the manifest: a half-written sidecar must never be read as valid."""
    path = sidecar_path(engine_path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".sidecar.", suffix=".tmp")
    os.fchmod(fd, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(sidecar.model_dump(mode="json"), indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def rebuild_command(bundle_root: Path | str, precision: str, build: EngineBuild | None = None) -> str:
    """The exact ``export-engine trt`` line that rebuilds an engine like this one, here."""
    args = ["export-engine", "trt", "--bundle", str(bundle_root), "--precision", precision]
    if build is not None:
        if build.opt_level != DEFAULT_OPT_LEVEL:
            args += ["--opt-level", str(build.opt_level)]
        if build.workspace_mb is not None:
            args += ["--workspace-mb", str(build.workspace_mb)]
        if build.max_batch != 1:
            args += ["--max-batch", str(build.max_batch)]
        if build.dla_core is not None:
            args += ["--dla-core", str(build.dla_core)]
            if not build.gpu_fallback:
                args.append("--no-gpu-fallback")
    return shlex.join(args)


def _fmt(v: object) -> str:
    return "none" if v is None else (repr(v) if isinstance(v, str) and " " in v else str(v))


def read_sidecar(bundle: Bundle, role: str) -> tuple[FileEntry, EngineSidecar]:
    entry = bundle.manifest.files[role]
    engine = bundle.root / entry.path
    path = sidecar_path(engine)
    cmd = rebuild_command(bundle.root, entry.precision)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"TensorRT engine {engine} has no sidecar {path.name} (it records the device the "
                          f"engine was built for): rebuild it on this device with: {cmd}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"cannot read {path} ({str(e).splitlines()[0]}): rebuild the engine on this "
                          f"device with: {cmd}") from None
    try:
        sidecar = EngineSidecar.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise BundleError(f"{path}: field '{loc}': {first['msg']}: rebuild the engine on this device "
                          f"with: {cmd}") from None
    if sidecar.schema_version > SIDECAR_SCHEMA:
        raise BundleError(f"{path} uses sidecar schema v{sidecar.schema_version}, newer than this linecam "
                          f"reads (v{SIDECAR_SCHEMA}): upgrade linecam on this device")
    return entry, sidecar


def engine_mismatches(sidecar: EngineSidecar, facts: DeviceFacts) -> list[tuple[str, str | None, str | None]]:
    """(field, built for, this device) for every device fact that differs."""
    out = []
    for key in ENGINE_KEYS:
        built = getattr(sidecar.device, key)
        here = getattr(facts, key)
        if (built or None) != (here or None):
            out.append((key, built, here))
    return out


def check_engine(bundle: Bundle, role: str, facts: DeviceFacts) -> EngineSidecar:
    """Refuse an engine that was not built for this device, or not from this bundle's ONNX.

    Raises :class:`BundleError` with one line: every differing field with both values,
    then ``rebuild it on this device with: export-engine trt --bundle <path> ...``.
    Returns the sidecar when the engine may be deserialized here.
    """
    entry, sidecar = read_sidecar(bundle, role)
    engine = bundle.root / entry.path
    cmd = rebuild_command(bundle.root, sidecar.precision, sidecar.build)
    problems: list[str] = []
    if sidecar.engine_sha256 != entry.sha256:
        problems.append(f"engine_sha256 {sidecar.engine_sha256[:12]} in the sidecar, {entry.sha256[:12]} "
                        f"in the manifest (the sidecar belongs to another engine)")
    source = bundle.manifest.files.get(sidecar.source.role)
    if source is None or source.sha256 != sidecar.source.sha256:
        now = source.sha256[:12] if source is not None else "missing"
        problems.append(f"source_onnx {sidecar.source.role} sha256 {sidecar.source.sha256[:12]} at build, "
                        f"{now} in this bundle (the engine was built from another model)")
    for key, built, here in engine_mismatches(sidecar, facts):
        problems.append(f"{key} {_fmt(built)} there, {_fmt(here)} here")
    if problems:
        raise BundleError(f"TensorRT engine {engine} (role '{role}') does not match: {'; '.join(problems)}; "
                          f"rebuild it on this device with: {cmd}")
    # The manifest's own pin (FileEntry.target) too: it must agree with the sidecar.
    bundle.check_target(role, facts.engine_target())
    return sidecar


def engine_roles(bundle: Bundle, precision: str | None = None,
                 order: tuple[str, ...] = ("fp16", "int8", "fp32")) -> list[str]:
    """TensorRT engine roles of ``bundle``, preferred precision first (FP16 is the default:
    INT8 is not always faster, see the README)."""
    precs = (precision,) if precision else order
    return [role for prec in precs for role, e in bundle.manifest.files.items()
            if e.backend == "tensorrt" and e.precision == prec]
