"""``linecam tiles``: cut a line-scan camera's web into the tiles ``linecam run`` would inspect
and save them as PNGs, to train a web expert on (``export-engine fit --images <out>``).

The camera and the tile geometry come from the line config (``camera:``, ``linescan:``); the
tile size from ``--tile``, else ``linescan.tile_size``, else 256. Point it at good web (no
defects, or few: ``fit``'s threshold is set on a held-out share of these tiles); ``--every N``
keeps one tile row in N so the set spans a longer stretch of web.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2

from linecam.camera.base import SourceExhausted
from linecam.config import LinecamConfig
from linecam.errors import ConfigError
from linecam.runtime.linescan.session import LineScanSession
from linecam.runtime.linescan.tiles import Tile
from linecam.runtime.sources import open_source

logger = logging.getLogger(__name__)


def collect_tiles(cfg: LinecamConfig, out: Path, *, count: int, tile: int | None = None, every: int = 1,
                  timeout_s: float = 5.0) -> int:
    """Write up to ``count`` tiles to ``out``; return how many were written."""
    ls = cfg.linescan
    size = (tile, tile) if tile else (ls.tile_size or (256, 256))
    if every < 1:
        raise ConfigError("--every must be at least 1")
    session = LineScanSession(ls, size, line=cfg.line, camera=cfg.camera_id, image_threshold=1.0,
                              publish=lambda kind, msg: None, map_dir=None)
    out.mkdir(parents=True, exist_ok=True)
    src = open_source(cfg.camera)
    src.open()
    written = 0
    try:
        while written < count:
            try:
                frame = src.read(timeout=timeout_s)
            except SourceExhausted:
                break
            if frame is None:
                logger.warning("no frame from %s for %.0f s: is the web moving?", src.name, timeout_s)
                continue
            for t in session.push(frame):
                tl = t.meta["tile"]
                assert isinstance(tl, Tile)
                session.tile_done(t, [], "", inspected=True)
                if tl.row % every or tl.valid_height < tl.height or written >= count:
                    continue
                img = t.image if t.image.shape[2] == 1 else cv2.cvtColor(t.image, cv2.COLOR_RGB2BGR)
                cv2.imwrite(str(out / f"tile_{tl.segment:03d}_{tl.line:09d}_{tl.x:05d}.png"), img)
                written += 1
    finally:
        src.close()
    return written
