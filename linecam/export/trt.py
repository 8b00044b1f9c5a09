"""``export-engine trt``: build a TensorRT engine from the bundle's ONNX, on the device that runs it.

Works on TensorRT 10.x (JetPack 6: 10.3) and 11.x alike by taking precision from the
ONNX itself: an FP16 ONNX (cast, inputs and outputs kept FP32) or an INT8 ONNX with
symmetric Q/DQ nodes, built as a *strongly typed* network. TensorRT 11 removed the
FP16/INT8 builder flags and is always strongly typed; 10.x needs the STRONGLY_TYPED
network flag. The one exception: DLA builds on TensorRT 10.x, which stay weakly typed
with the FP16 (+INT8) builder flags (see :func:`build_plan`).

Per build: timing cache in the bundle (reused by the next build on the same device),
optimization level, workspace limit, optimization profile, DLA core with GPU fallback
and a per-layer placement report (engine inspector), progress output; then the engine
is verified against ONNX Runtime on real images (:mod:`linecam.export.trt_verify`) and,
only if it passes, it is added to the bundle manifest with its device ``target`` and a
sidecar JSON (:mod:`linecam.runtime.backends.sidecar`).

:func:`build_engine` takes any ONNX file, so the VLM's vision encoder uses the same path.
No torch: this runs on a Jetson that has only JetPack's TensorRT and linecam.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from linecam import __version__
from linecam.bundle import Bundle, FileEntry, file_entry, load_bundle, write_manifest
from linecam.errors import BundleError
from linecam.export.trt_verify import (DEFAULT_TOLERANCES, Tolerances, VerificationReport, VerifyImage,
                                       bundle_images, compare, load_images, run_images)
from linecam.runtime.backends.sidecar import (EngineBuild, EngineDevice, EngineSidecar, EngineSource,
                                              InputProfile, rebuild_command, write_sidecar)
from linecam.runtime.device import BackendUnavailable, DeviceFacts, first_line, probe_device

from linecam.export.trt_plan import (ENGINE_DIR, FP16_ONNX, BuildPlan, Profile, TrtBuildOptions, build_plan,
                                     derive_fp16_onnx, device_slug, engine_role, placement_line, placement_report,
                                     profile_shapes)

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- TensorRT build


def _progress_monitor(trt: Any, echo: Callable[[str], None]) -> Any | None:
    """Prints build phases (two levels deep) with elapsed time, so a long build never looks hung."""
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None
    t0 = time.perf_counter()

    class _Monitor(base):  # type: ignore[misc,valid-type]
        def __init__(self) -> None:
            base.__init__(self)
            self.depth: dict[str, int] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            try:
                d = 0 if parent_phase is None else self.depth.get(parent_phase, 0) + 1
                self.depth[phase_name] = d
                if d <= 1:
                    echo(f"{'  ' * d}{phase_name} ({num_steps} steps) [{time.perf_counter() - t0:.0f} s]")
            except Exception:  # a callback must never raise into TensorRT
                pass

        def step_complete(self, phase_name: str, step: int) -> bool:
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            try:
                if self.depth.pop(phase_name, 1) == 0:
                    echo(f"{phase_name} done [{time.perf_counter() - t0:.0f} s]")
            except Exception:
                pass

    return _Monitor()


def _write_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class BuiltEngine:
    path: Path
    seconds: float
    inputs: dict[str, Profile]
    outputs: dict[str, list[int]]
    plan: BuildPlan
    timing_cache_reused: bool
    placement: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)


def build_engine(onnx_path: Path, engine_path: Path, options: TrtBuildOptions, *, timing_cache: Path,
                 input_shapes: dict[str, Sequence[int | str]] | None = None,
                 echo: Callable[[str], None] = print) -> BuiltEngine:
    """Build ``onnx_path`` into ``engine_path`` (any ONNX; the region expert and the VLM vision
    encoder alike). ``input_shapes``: the shapes the model is declared with (fills dynamic axes)."""
    from linecam.runtime.backends.tensorrt import import_tensorrt, make_trt_logger

    trt = import_tensorrt("export-engine trt")
    plan = build_plan(trt.__version__, options.precision, options.dla_core, options.gpu_fallback)
    tlog = make_trt_logger(trt)
    builder = trt.Builder(tlog)
    if builder is None:
        raise BackendUnavailable(f"TensorRT cannot start a builder ({(tlog.errors or ['no GPU?'])[-1]}): check the "
                                 f"GPU driver (nvidia-smi)")
    flags = 0
    for name in plan.network_flags:
        flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, tlog)
    if not parser.parse_from_file(str(onnx_path)):
        errs = [str(parser.get_error(i)) for i in range(parser.num_errors)] or tlog.errors[-1:] or ["?"]
        raise BundleError(f"TensorRT {trt.__version__} cannot parse {onnx_path}: {first_line(errs[0])}; inspect it "
                          f"with: polygraphy inspect model {onnx_path} --display-as=trt")

    config = builder.create_builder_config()
    for name in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    if options.workspace_mb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_mb) << 20)
    config.builder_optimization_level = int(options.opt_level)
    # DETAILED: the engine inspector then reports every layer (and where it runs).
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED

    # Timing cache: only valid for this device / TensorRT; a foreign one is dropped, not trusted.
    cache_bytes = timing_cache.read_bytes() if timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    reused = bool(cache_bytes)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        logger.warning("timing cache %s is from another device or TensorRT version: starting a new one", timing_cache)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
        reused = False
    if reused:
        echo(f"reusing timing cache {timing_cache} ({len(cache_bytes)} bytes)")

    inputs: dict[str, Profile] = {}
    needs_profile = False  # TensorRT wants a profile whenever an input has a -1 axis
    for i in range(network.num_inputs):
        t = network.get_input(i)
        onnx_shape = [int(d) for d in t.shape]
        declared = (input_shapes or {}).get(t.name, onnx_shape)
        inputs[t.name] = profile_shapes(t.name, onnx_shape, declared, max_batch=options.max_batch)
        needs_profile |= any(d < 0 for d in onnx_shape)
    if needs_profile:
        profile = builder.create_optimization_profile()
        for name, p in inputs.items():
            profile.set_shape(name, p.min, p.opt, p.max)
        config.add_optimization_profile(profile)

    gpu_only: list[tuple[str, str]] = []
    if options.dla_core is not None:
        n = int(getattr(builder, "num_DLA_cores", 0))
        if n == 0:
            raise BackendUnavailable(f"--dla-core {options.dla_core}: this device has no DLA (Orin Nano, Thor and "
                                     f"desktop GPUs have none; TensorRT 10.8-11.4.0 dropped it): drop --dla-core")
        if not 0 <= options.dla_core < n:
            raise BundleError(f"--dla-core {options.dla_core}: this device has {n} DLA core(s), numbered 0..{n - 1}")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = int(options.dla_core)
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if not config.can_run_on_DLA(layer):
                gpu_only.append((layer.name, str(layer.type).rsplit(".", 1)[-1]))
        if gpu_only and not options.gpu_fallback:
            raise BundleError(f"{len(gpu_only)} layer(s) cannot run on DLA (first: {gpu_only[0][0]}, "
                              f"{gpu_only[0][1]}) and --no-gpu-fallback was given: drop --no-gpu-fallback")
        echo(f"DLA core {options.dla_core}: {network.num_layers - len(gpu_only)} of {network.num_layers} network "
             f"layers can run on DLA" + (", the rest falls back to the GPU" if gpu_only else ""))

    monitor = _progress_monitor(trt, echo)
    if monitor is not None:
        config.progress_monitor = monitor
    echo(f"building {options.precision} engine from {onnx_path.name} (TensorRT {trt.__version__}, "
         f"{'strongly typed' if plan.strongly_typed else 'weakly typed'}"
         + (f", flags {'+'.join(plan.builder_flags)}" if plan.builder_flags else "")
         + f", optimization level {options.opt_level}); this can take minutes")
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if serialized is None:
        why = tlog.errors[-1] if tlog.errors else "see the log"
        hint = ("; on Jetson try --workspace-mb 1024" if "memory" in why.lower() else "")
        raise BundleError(f"TensorRT failed to build the engine from {onnx_path.name}: {first_line(why)}{hint}")
    _write_atomic(engine_path, memoryview(serialized))
    _write_atomic(timing_cache, memoryview(config.get_timing_cache().serialize()))
    echo(f"engine built in {seconds:.1f} s ({engine_path.stat().st_size / 1e6:.1f} MB)")

    runtime = trt.Runtime(tlog)
    if options.dla_core is not None:
        runtime.DLA_core = int(options.dla_core)
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        raise BundleError(f"TensorRT cannot load the engine it just built ({(tlog.errors or ['?'])[-1]})")
    outputs = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
            outputs[name] = [int(d) for d in engine.get_tensor_shape(name)]
    placement = None
    if options.dla_core is not None:
        info = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
        placement = placement_report(info, gpu_only, options.dla_core)
        echo(placement_line(placement))
    del engine, runtime
    return BuiltEngine(engine_path, seconds, inputs, outputs, plan, reused, placement)


# --------------------------------------------------------------------------- bundle build


@dataclass
class BuildResult:
    role: str
    engine: Path
    sidecar: Path
    seconds: float
    verification: VerificationReport | None
    placement: dict[str, Any] | None
    rebuild: str


@dataclass(frozen=True)
class SourceOnnx:
    """The ONNX an engine is built from."""

    role: str
    path: Path
    sha256: str
    #: A FileEntry to add to the manifest (an FP16 model derived here), else None.
    new_entry: FileEntry | None = None
    derived_from: str | None = None


def source_onnx(bundle: Bundle, precision: str, echo: Callable[[str], None] = print) -> SourceOnnx:
    """The bundle's ONNX of ``precision``; for FP16 without one, an FP16 copy cast from the FP32 model."""
    try:
        role = bundle.pick("onnxruntime", precision)
        return SourceOnnx(role, bundle.path(role), bundle.manifest.files[role].sha256)
    except BundleError:
        if precision != "fp16":
            have = ", ".join(f"{r} ({e.precision})" for r, e in bundle.manifest.files.items()) or "none"
            raise BundleError(f"bundle {bundle.root} has no {precision} ONNX model (it has: {have}): add an INT8 "
                              f"ONNX with symmetric Q/DQ nodes to the bundle first (quantize it on the "
                              f"workstation), or build --precision fp16") from None
    src_role = bundle.pick("onnxruntime", "fp32")
    rel = f"{ENGINE_DIR}/{FP16_ONNX}"
    echo(f"no FP16 ONNX in the bundle: casting {src_role} to FP16 ({rel}, inputs/outputs stay FP32)")
    derive_fp16_onnx(bundle.path(src_role), bundle.root / rel)
    entry = file_entry(bundle.root, rel, precision="fp16")
    return SourceOnnx("onnx_fp16", bundle.root / rel, entry.sha256, new_entry=entry, derived_from=src_role)


def verification_set(bundle: Bundle, options: TrtBuildOptions) -> list[VerifyImage]:
    if options.images is not None:
        return load_images(options.images, options.verify_limit)
    images = bundle_images(bundle, options.verify_limit)
    if images is None:
        raise BundleError(f"no verification images: the images bundle {bundle.root} was fitted on are not on this "
                          f"machine; pass --images <folder of the line's images> (good ones, or good/ and defect "
                          f"subfolders)")
    return images


def verify_engine(bundle: Bundle, run_engine: Callable[[Any], Any], images: Sequence[VerifyImage], precision: str,
                  tol: Tolerances, intra_op_threads: int = 1) -> VerificationReport:
    """``run_engine`` (an engine's ``run``) vs ONNX Runtime (CPU) on the bundle's FP32 ONNX, on ``images``."""
    from linecam.runtime.backends.onnxruntime import OrtRunner

    ref_role = bundle.pick("onnxruntime", "fp32")
    ref = OrtRunner(bundle.path(ref_role), bundle.manifest, intra_op_threads=intra_op_threads, role=ref_role)
    ref_out = run_images(ref.run, bundle, images)
    eng_out = run_images(run_engine, bundle, images)
    return compare(ref_out, eng_out, bundle.manifest.thresholds, tol, names=[im.name for im in images],
                   labels=[im.label for im in images], precision=precision)


def register_engine(bundle: Bundle, engine_file: Path, role: str, facts: DeviceFacts, options: TrtBuildOptions,
                    built: BuiltEngine, source: SourceOnnx, report: VerificationReport | None,
                    timing_cache: Path | None = None, echo: Callable[[str], None] = print) -> BuildResult:
    """Move a verified engine to ``trt/<role>.engine``, write its sidecar, then the manifest
    (last: the bundle only names the engine once everything it needs is in place)."""
    root = bundle.root
    final = root / ENGINE_DIR / f"{role}.engine"
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(engine_file, final)
    rel = f"{ENGINE_DIR}/{final.name}"
    entry = file_entry(root, rel, backend="tensorrt", precision=options.precision)
    entry = entry.model_copy(update={"target": facts.engine_target()})
    cache = None
    if timing_cache is not None:
        cache = str(timing_cache.relative_to(root)) if timing_cache.is_relative_to(root) else str(timing_cache)
    build = EngineBuild(opt_level=options.opt_level, workspace_mb=options.workspace_mb, dla_core=options.dla_core,
                        gpu_fallback=options.gpu_fallback, max_batch=options.max_batch,
                        strongly_typed=built.plan.strongly_typed, builder_flags=list(built.plan.builder_flags),
                        timing_cache=cache, timing_cache_reused=built.timing_cache_reused,
                        seconds=round(built.seconds, 2))
    if facts.tensorrt is None or facts.gpu is None or facts.compute_capability is None:
        raise BundleError("cannot register an engine without the device's TensorRT version, GPU and compute capability")
    sidecar = EngineSidecar(
        engine=rel, engine_sha256=entry.sha256, engine_size=entry.size,
        built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), linecam_version=__version__,
        device=EngineDevice(tensorrt=facts.tensorrt, gpu=facts.gpu, compute_capability=facts.compute_capability,
                            platform=facts.platform, l4t=facts.l4t, jetpack=facts.jetpack,
                            cuda_runtime=facts.cuda_runtime, cuda_driver=facts.cuda_driver, driver=facts.driver),
        precision=options.precision,
        source=EngineSource(role=source.role, path=str(source.path.relative_to(root)), sha256=source.sha256,
                            derived_from=source.derived_from),
        inputs={k: InputProfile(min=list(p.min), opt=list(p.opt), max=list(p.max)) for k, p in built.inputs.items()},
        outputs=built.outputs, build=build, placement=built.placement,
        verification=report.to_dict() if report is not None else None)
    side = write_sidecar(final, sidecar)
    files = dict(bundle.manifest.files)
    if source.new_entry is not None:
        files[source.role] = source.new_entry
    files[role] = entry
    write_manifest(root, bundle.manifest.model_copy(update={"files": files}))
    echo(f"added '{role}' to {root / 'manifest.json'} (sidecar {side.name}); run it with model.backend: tensorrt "
         f"(or auto)")
    return BuildResult(role, final, side, built.seconds, report, built.placement,
                       rebuild_command(root, options.precision, build))


def build_bundle_engine(bundle_root: Path | str, options: TrtBuildOptions = TrtBuildOptions(), *,
                        facts: DeviceFacts | None = None, echo: Callable[[str], None] = print) -> BuildResult:
    """Build, verify and register a TensorRT engine for the bundle, on this device."""
    bundle = load_bundle(bundle_root)
    root = bundle.root
    if facts is None:
        facts = probe_device()
    from linecam.runtime.backends.tensorrt import trt_missing_message

    if facts.tensorrt is None:
        raise BackendUnavailable(trt_missing_message(facts.tensorrt_error, "export-engine trt"))
    if facts.gpu is None or facts.compute_capability is None:
        raise BackendUnavailable(f"export-engine trt builds on the device that will run the engine, and this "
                                 f"machine has no usable NVIDIA GPU ({facts.gpu_error or 'none found'}): run it "
                                 f"on the Jetson / GPU PC (with cuda-python installed)")
    build_plan(facts.tensorrt, options.precision, options.dla_core, options.gpu_fallback)  # option errors first
    echo(f"device: {facts.describe()}")
    tol = options.tolerances or DEFAULT_TOLERANCES[options.precision]
    images = verification_set(bundle, options)  # before a long build: fail fast without images

    source = source_onnx(bundle, options.precision, echo)
    role = engine_role(options.precision, facts, options.dla_core)
    tmp = root / ENGINE_DIR / f".{role}.engine.building"
    cache = options.timing_cache or (root / ENGINE_DIR / f"timing-{device_slug(facts)}.cache")
    man = bundle.manifest
    built = build_engine(source.path, tmp, options, timing_cache=cache,
                         input_shapes={man.input.name: man.input.shape}, echo=echo)
    try:
        from linecam.runtime.backends.tensorrt import TensorRTRunner

        runner = TensorRTRunner(tmp, man, role, dla_core=options.dla_core)
        try:
            echo(f"verifying against ONNX Runtime (FP32) on {len(images)} images")
            report = verify_engine(bundle, runner.run, images, options.precision, tol)
        finally:
            runner.close()
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    echo(("verification passed: " if report.passed else "verification FAILED: ") + report.summary())
    if not report.passed:
        bad = root / ENGINE_DIR / f"{role}.verify-failed.json"
        bad.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        tmp.unlink(missing_ok=True)
        raise BundleError(f"the {options.precision} engine disagrees with the bundle's model: {report.failures[0]}; "
                          f"nothing was added to the bundle (report: {bad}); try --precision fp32, or find the first "
                          f"diverging layer with: polygraphy run {source.path} --trt --onnxrt --trt-outputs mark all "
                          f"--onnx-outputs mark all --fail-fast")
    return register_engine(bundle, tmp, role, facts, options, built, source, report, timing_cache=cache, echo=echo)
