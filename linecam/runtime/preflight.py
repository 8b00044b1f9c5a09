"""``linecam check``: every check ``linecam run`` makes before its first frame, without
starting anything (no broker connection, no camera grabbed, no file written).

Each check raises the error ``run`` would raise, so ``check`` exits with the same code:
the model bundle (hashes, versions) and a runner for ``model.backend`` / ``model.precision``
(exit 3); ``mqtt.password_file`` / ``password_env`` and the TLS files (2); the camera:
a replay path or a synthetic source is opened and closed, a GenICam producer file must exist
(the camera itself is not opened: a running daemon may hold it) (4); line-scan geometry:
tile vs ``overlap_px`` and, where the config gives it, the web width (2); ``vlm.bundle`` and
the files ``vlm.precision`` needs (3); the state, spool and snapshot folders writable (2).
"""

from __future__ import annotations

import os
from pathlib import Path

from linecam.bundle import load_bundle
from linecam.config import LinecamConfig
from linecam.config.linescan import SyntheticWebCamera
from linecam.errors import CameraError, ConfigError


def _writable(path: Path, setting: str) -> None:
    """``path`` is (or can be created as) a writable folder."""
    p = path.absolute()
    probe = p
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{setting} {p} cannot be written ({probe} is not a writable folder): "
                          "fix the path or its permissions")


def preflight(cfg: LinecamConfig) -> list[str]:
    """Run the checks (see the module docstring); return one line per part checked."""
    from linecam.runtime.backends import make_runner

    out: list[str] = []
    bundle = load_bundle(cfg.model.bundle)
    m = bundle.manifest
    runner = make_runner(bundle, cfg.model.backend, cfg.model.precision, cfg.model.intra_op_threads, workers=1)
    try:
        role = runner.role
    finally:
        runner.close()
    out.append(f"bundle ok: {m.name}, input {m.input.shape}, runs {role} on {cfg.model.backend}, image threshold "
               f"{m.thresholds.image:.4g} ({m.thresholds.method}, n_good={m.thresholds.n_good})")

    s = cfg.mqtt
    if s.username:
        s.read_password()
    if s.tls:
        for key in ("ca_file", "cert_file", "key_file"):
            p = getattr(s, key)
            if p is not None and not p.is_file():
                raise ConfigError(f"mqtt.{key} {p} does not exist: fix the path")
    out.append(f"mqtt ok: {s.host}:{s.port}{' TLS' if s.tls else ''}"
               f"{', user ' + s.username + ' (password readable)' if s.username else ''} (not connected)")

    cam = cfg.camera
    if cam.kind == "genicam":
        cti = getattr(cam, "cti", "viky")
        if cti != "viky" and not Path(cti).is_file():
            raise CameraError(f"camera.cti {cti} does not exist: give the GenTL producer (.cti) file")
        out.append(f"camera ok: genicam producer {cti} (the camera is not opened by check)")
    else:
        from linecam.runtime.sources import open_source

        src = open_source(cam)
        src.open()
        src.close()
        out.append(f"camera ok: {cam.kind} {getattr(cam, 'path', '')}".rstrip())

    ls = cfg.linescan
    if ls.enabled:
        from linecam.runtime.linescan.tiles import check_geometry, tile_size_for

        pre = m.preprocess
        tile = tile_size_for(ls.tile_size, pre.input_size, pre.crop)
        width = cam.width if isinstance(cam, SyntheticWebCamera) else getattr(cam, "width", None)
        check_geometry(tile, ls.overlap_px, width)
        out.append(f"linescan ok: tiles {tile[0]}x{tile[1]}, overlap {ls.overlap_px} px, web "
                   f"{f'{width} px' if width else 'width from the camera (checked at its first frame)'}")

    v = cfg.vlm
    if v.bundle is not None:
        from linecam.runtime.vlm.bundle import load_vlm_bundle

        vb = load_vlm_bundle(v.bundle)
        for role in (f"decoder_{v.precision}", "vision_fp32", "embedding_fp32", "tokenizer"):
            if role.endswith("_fp32") and any(vb.has(r) for r in (role, role.replace("fp32", "fp16"))):
                continue
            vb.path(role)  # raises naming the missing file
        out.append(f"vlm ok: {vb.manifest.name}, decoder {v.precision}")

    spool = cfg.spool_settings()
    if spool.enabled and spool.path is not None:
        _writable(Path(spool.path).parent, "spool.path's folder")
    if cfg.output.snapshots:
        _writable(cfg.snapshots_dir(), "output.snapshots_dir")
    if cfg.linescan.enabled and cfg.linescan.web_map.enabled and cfg.linescan.web_map.dir is not None:
        _writable(cfg.linescan.web_map.dir, "linescan.web_map.dir")
    out.append(f"state ok: spool {Path(spool.path).absolute() if spool.enabled and spool.path else 'off'}, snapshots "
               f"{cfg.snapshots_dir().absolute() if cfg.output.snapshots else 'off'}")
    return out
