"""Line-scan mode (``linescan.enabled``): frames -> tiles -> web defects in mm.

* :mod:`~linecam.runtime.linescan.tiles` — tile columns, :class:`Tile`, down-web position, web buffer;
* :mod:`~linecam.runtime.linescan.webmap` — the PNG map of the web;
* :mod:`~linecam.runtime.linescan.coverage` — uninspected tiles, reported as they happen;
* :mod:`~linecam.runtime.linescan.session` — :class:`LineScanSession`, the acquisition-side
  adapter that cuts tiles and merges their regions into ``web_defect`` events.
"""

from __future__ import annotations

from linecam.runtime.linescan.session import LineScanSession
from linecam.runtime.linescan.tiles import DownWeb, Tile, WebBuffer, tile_columns, tile_fields
from linecam.runtime.linescan.webmap import WebMap

__all__ = ["DownWeb", "LineScanSession", "Tile", "WebBuffer", "WebMap", "tile_columns", "tile_fields"]
