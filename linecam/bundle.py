"""Model bundle v1: a folder with ``manifest.json`` and the model files it names.

The manifest is self-describing (shapes, preprocessing, thresholds, provenance,
per-file sha256) so that the edge needs nothing but the folder. Loading verifies
the schema version and every file's hash, and fails with one line that says what
to do, never with a model that failed its checks.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from linecam import __version__
from linecam.errors import BundleError
from linecam.preprocess import PreprocessSpec

#: The manifest schema this linecam writes and the newest it can read.
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"

M = TypeVar("M", bound=BaseModel)
Backend = Literal["onnxruntime", "tensorrt"]
Precision = Literal["fp32", "fp16", "int8", "int4"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class TensorSpec(_Strict):
    name: str
    #: Fixed ints, or a string for a dynamic axis (e.g. "batch").
    shape: list[int | str]
    dtype: str = "float32"
    layout: str | None = None


class LabelMapsSpec(TensorSpec):
    """Named per-prompt maps ([1, K, h, w], anomaly-map units): a region is labelled with the
    names whose map reaches the pixel threshold inside it (the text expert's referring prompts)."""

    labels: list[str]


class OutputsSpec(_Strict):
    #: Per-pixel anomaly score at model resolution, shape [1, 1, h, w].
    anomaly_map: TensorSpec
    #: Image-level anomaly score, shape [1].
    image_score: TensorSpec
    #: Optional; left out of the JSON when absent, so manifests without it read as before.
    label_maps: LabelMapsSpec | None = Field(default=None, exclude_if=lambda v: v is None)


class Thresholds(_Strict):
    """Thresholds on the model's *raw* outputs; a score >= threshold is NG."""

    image: float
    pixel: float
    method: str = "manual"
    #: Number of good images the estimate rests on (0 when set by hand).
    n_good: int = 0
    n_bad: int = 0
    target_frr: float | None = None
    details: dict[str, Any] = Field(default_factory=dict)


class FileEntry(_Strict):
    path: str
    sha256: str
    size: int
    backend: Backend = "onnxruntime"
    precision: Precision = "fp32"
    #: What a device-bound file (a TensorRT engine) was built for, e.g.
    #: {"gpu": "Orin (nvgpu)", "compute_capability": "8.7", "tensorrt": "10.3.0"};
    #: checked with :meth:`Bundle.check_target` before the file is loaded. None: portable.
    target: dict[str, str] | None = None


class Provenance(_Strict):
    created_at: str
    linecam_version: str
    tool_versions: dict[str, str] = Field(default_factory=dict)
    #: Hash of what the model was made from (training images, teacher weights...).
    source_sha256: str | None = None
    details: dict[str, Any] = Field(default_factory=dict)


class Manifest(_Strict):
    schema_version: int = SCHEMA_VERSION
    kind: Literal["region_expert"] = "region_expert"
    name: str
    input: TensorSpec
    preprocess: PreprocessSpec
    outputs: OutputsSpec
    thresholds: Thresholds
    #: Keyed by role, e.g. "onnx_fp32", "onnx_int8", "trt_fp16".
    files: dict[str, FileEntry]
    provenance: Provenance
    extra: dict[str, Any] = Field(default_factory=dict)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def source_hash(hashes: Sequence[str]) -> str:
    """sha256 over the sorted per-file sha256 hex digests, newline-joined: what a model was made
    from (training images, a calibration set), independent of file order."""
    return hashlib.sha256("\n".join(sorted(hashes)).encode()).hexdigest()


def file_entry(root: str | Path, relpath: str, backend: Backend = "onnxruntime",
               precision: Precision = "fp32") -> FileEntry:
    """Describe (and hash) a file already written inside the bundle folder."""
    p = Path(root) / relpath
    return FileEntry(path=relpath, sha256=sha256_file(p), size=p.stat().st_size,
                     backend=backend, precision=precision)


def new_provenance(**kwargs: Any) -> Provenance:
    return Provenance(created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      linecam_version=__version__, **kwargs)


def write_manifest(root: str | Path, manifest: Manifest) -> Path:
    """Write atomically: a half-written manifest must never look like a bundle."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    data = json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=False) + "\n"
    fd, tmp = tempfile.mkstemp(dir=root, prefix=".manifest.", suffix=".tmp")
    # mkstemp creates 0600; a bundle must be readable by the service's (dynamic) user.
    os.fchmod(fd, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    target = root / MANIFEST
    os.replace(tmp, target)
    return target


class Bundle:
    """A loaded, verified bundle."""

    def __init__(self, root: Path, manifest: Manifest) -> None:
        self.root = root
        self.manifest = manifest

    def path(self, role: str) -> Path:
        try:
            return self.root / self.manifest.files[role].path
        except KeyError:
            have = ", ".join(sorted(self.manifest.files)) or "none"
            raise BundleError(
                f"bundle {self.root} has no '{role}' file (it has: {have}); "
                f"export one with export-engine or choose another backend/precision"
            ) from None

    def pick(self, backend: Backend, precision: Precision | None = None) -> str:
        """Role of the first file for ``backend`` (and ``precision`` if given)."""
        order = ["fp32", "fp16", "int8"] if precision is None else [precision]
        for prec in order:
            for role, entry in self.manifest.files.items():
                if entry.backend == backend and entry.precision == prec:
                    return role
        want = backend + (f"/{precision}" if precision else "")
        have = ", ".join(f"{e.backend}/{e.precision}" for e in self.manifest.files.values()) or "none"
        raise BundleError(f"bundle {self.root} has no {want} model (it has: {have}); "
                          f"export one with export-engine or choose another backend/precision")

    def check_target(self, role: str, current: Mapping[str, str]) -> None:
        """Refuse a file built for another device: every key its ``target`` pins must match
        ``current`` (what the backend found on this device); keys it does not pin are ignored.
        Loading a foreign TensorRT engine fails deep inside the runtime, or worse, runs."""
        entry = self.manifest.files.get(role)
        if entry is None or not entry.target:
            return
        diff = {k: (v, current.get(k)) for k, v in entry.target.items() if str(current.get(k)) != str(v)}
        if diff:
            built = ", ".join(f"{k} {v}" for k, (v, _) in diff.items())
            here = ", ".join(f"{k} {c if c is not None else 'unknown'}" for k, (_, c) in diff.items())
            raise BundleError(f"bundle file {self.root / entry.path} (role '{role}') was built for {built}, "
                              f"this device has {here}: rebuild it on this device (export-engine) or use "
                              "the bundle's ONNX model")

    @property
    def model_sha256(self) -> str:
        """Hash identifying this model (the manifest's hash), published in every verdict."""
        return sha256_file(self.root / MANIFEST)


def _describe(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    text = f"field '{loc}': {first['msg']}{more}"
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)  # a key may hold a newline


def _verify_file(root: Path, mpath: Path, role: str, entry: FileEntry, fix: str) -> None:
    where = f"bundle file {root / entry.path!s:.300} (role '{role}')"
    try:
        p = (root / entry.path).resolve()
        if root.resolve() not in p.parents:
            raise BundleError(f"{mpath}: file '{role}' points outside the bundle ({entry.path:.300}); {fix}")
        if not p.is_file():
            raise BundleError(f"{where} is missing; {fix}")
        if p.stat().st_size != entry.size or sha256_file(p) != entry.sha256:
            raise BundleError(f"{where} fails its sha256 check: corrupt or half-copied; {fix}")
    except (OSError, ValueError) as e:  # a NUL byte, a name too long, no permission ...
        raise BundleError(f"{where} cannot be read ({e.strerror if isinstance(e, OSError) else e}); {fix}") from None


def read_manifest(root: Path, model: type[M], *, newest_version: int, fix: str, missing: str,
                  kind: str | None = None, verify: bool = True) -> M:
    """Read, validate and (with ``verify``) hash-check ``root/manifest.json`` as ``model``.

    Shared by every bundle kind so that each gets the same one-line errors for the same
    damage (bad JSON, too deep, unreadable, wrong kind, newer schema, bad field, bad file)."""
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{mpath} is missing: {missing}")
    try:
        raw = json.loads(mpath.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{mpath} is not valid JSON ({e}): the bundle is corrupt; {fix}") from None
    except RecursionError:
        raise BundleError(f"{mpath} is nested too deeply to be a manifest: the bundle is corrupt; {fix}") from None
    except OSError as e:
        raise BundleError(f"cannot read {mpath} ({e.strerror or e}): check its permissions; {fix}") from None
    if not isinstance(raw, dict):
        raise BundleError(f"{mpath} is not a JSON object: the bundle is corrupt; {fix}")
    if kind is not None and raw.get("kind", kind) != kind:
        setting, command = {"region_expert": ("model.bundle (or --bundle)", "export-engine fit / distil"),
                            "vlm": ("vlm.bundle", "export-engine vlm")}.get(
                                kind, ("the bundle setting", "export-engine"))
        raise BundleError(f"{mpath} is a {str(raw.get('kind'))[:40]!r} bundle, not a {kind!r} bundle: point "
                          f"{setting} at a folder {command} wrote")
    version = raw.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise BundleError(f"{mpath} has no integer 'schema_version': not a linecam bundle; {fix}")
    if version > newest_version:
        raise BundleError(f"{mpath} uses manifest schema v{version}, newer than this linecam "
                          f"{__version__} reads (v{newest_version}): upgrade linecam on this device")
    try:
        manifest = model.model_validate(raw)
    except ValidationError as e:
        raise BundleError(f"{mpath}: {_describe(e)}; {fix}") from None
    if verify:
        for role, entry in manifest.files.items():  # type: ignore[attr-defined]
            _verify_file(root, mpath, role, entry, fix)
    return manifest


def load_bundle(root: str | Path, verify: bool = True) -> Bundle:
    """Load ``root/manifest.json``, check the schema version and every file's sha256."""
    root = Path(root)
    fix = "re-export the bundle with export-engine, or copy the whole bundle folder again"
    if not root.is_dir():
        raise BundleError(f"bundle folder {root} does not exist: build one with "
                          f"'export-engine fit --images <folder of good images> --out {root}'")
    manifest = read_manifest(root, Manifest, newest_version=SCHEMA_VERSION, fix=fix, kind="region_expert",
                             missing=f"{root} is not a linecam bundle or was copied incompletely; {fix}",
                             verify=verify)
    return Bundle(root, manifest)
