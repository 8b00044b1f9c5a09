"""Line-scan mode end to end: the synthetic web -> the daemon (tiles through the region expert,
ONNX Runtime) -> a real mosquitto -> a subscriber. Every message is validated against its
JSON Schema; every defect placed on the web must come back exactly once, at its true
position, with its full extent, including defects across frame and tile boundaries; a
dropped frame must come back as a web gap."""

from __future__ import annotations

import io
import time
from pathlib import Path

import cv2
import pytest
from rich.console import Console

from bundles import make_tiny_bundle
from linecam import schemas
from linecam.camera.synthetic_web import SyntheticWebSource
from linecam.config import parse_config
from linecam.errors import CameraError
from linecam.events import EventTable, subscribe
from linecam.runtime.linescan import WebMap
from linecam.runtime.service import run_service

W, H, FRAMES, DROP = 256, 96, 40, 25  # web px, lines per frame, frames, the frame the camera loses
MM_X, MM_Y = 0.1, 0.2  # mm per pixel across, mm per line along
TILE, OVERLAP = 64, 24  # the tiny bundle's input size; overlap >= the largest defect (except one)
STRIDE = TILE - OVERLAP

# (cross px, down line) of the centre, (width px, length lines), kind, what it tests
PLACED = [
    ((30, 96), (10, 12), "spot", "frame 0/1 boundary"),
    ((64, 300), (12, 10), "spot", "right edge of tile column 0"),
    ((104, 144), (14, 14), "scratch", "tile column edge and tile row edge at once"),
    ((6, 600), (8, 10), "spot", "web's left edge"),
    ((250, 700), (8, 10), "spot", "web's right edge"),
    ((150, 384), (8, 60), "streak", "longer than the overlap: in no single tile, across frame 3/4"),
    ((200, 1920), (16, 16), "spot", "frame 19/20 boundary"),
    ((90, 2392), (10, 12), "spot", "tail tile of the segment before the gap"),
    ((40, 2505), (10, 10), "spot", "first lines after the gap"),
    ((120, 2880), (12, 10), "spot", "frame 29/30 boundary, second segment"),
    ((180, 3700), (20, 22), "scratch", "second segment, big"),
]
STRADDLERS = {0, 1, 2, 5, 6, 9}  # seen in part by more than one tile: must be merged


def _defects() -> list[dict]:
    return [{"cross_mm": x * MM_X, "down_mm": y * MM_Y, "width_mm": w * MM_X, "length_mm": h * MM_Y, "kind": k}
            for (x, y), (w, h), k, _ in PLACED]


def _config(bundle: Path, port: int, tmp: Path) -> dict:
    return {
        "line": "t", "camera_id": "c0",
        "camera": {"kind": "synthetic_web", "width": W, "lines_per_frame": H, "line_rate_hz": 40000.0,
                   "frames": FRAMES, "mm_per_px_cross": MM_X, "mm_per_line": MM_Y, "defects": _defects(),
                   "drop_frames": [DROP], "seed": 5},
        "model": {"bundle": str(bundle)},
        "mqtt": {"host": "127.0.0.1", "port": port},
        "runtime": {"queue_size": 1024, "metrics_interval_s": 0.5},
        "output": {"snapshots_dir": str(tmp / "snaps"), "snapshots_max_files": 20},
        "spool": {"path": str(tmp / "spool.db")},
        "linescan": {"enabled": True, "overlap_px": OVERLAP, "mm_per_px_cross": MM_X, "mm_per_line": MM_Y,
                     "web_map": {"dir": str(tmp / "maps")}},
    }


def _expected_tiles() -> list[tuple[int, int, int]]:
    """(x, line, valid lines) of every tile, worked out by hand from the geometry: columns
    every STRIDE px plus one flush right; rows every STRIDE lines in each segment plus one
    flush with the segment's end when rows leave lines over."""
    xs = list(range(0, W - TILE + 1, STRIDE))
    if xs[-1] != W - TILE:
        xs.append(W - TILE)
    out = []
    for start, end in ((0, DROP * H), ((DROP + 1) * H, FRAMES * H)):
        rows = list(range(start, end - TILE + 1, STRIDE))
        if rows[-1] + TILE < end:
            rows.append(end - TILE)
        out += [(x, y, TILE) for y in rows for x in xs]
    return out


def _collect(port: int, run, settle: float = 1.5):
    events = []
    with subscribe("127.0.0.1", port, prefix="linecam/t/c0", validate=False,
                   types=("verdict", "defect", "status", "web_defect", "web_gap")) as sub:
        result = run()
        deadline = time.monotonic() + settle
        while time.monotonic() < deadline:
            ev = sub.poll(timeout=0.2)
            if ev is not None:
                events.append(ev)
                deadline = time.monotonic() + settle
    return events, result


@pytest.fixture
def tiny_bundle(tmp_path):
    return make_tiny_bundle(tmp_path / "bundle", size=TILE, image_threshold=0.3, pixel_threshold=0.5)


@pytest.mark.timeout(120)
def test_every_web_defect_once_at_its_position_and_a_dropped_frame_is_a_gap(broker, tiny_bundle, tmp_path):
    cfg = parse_config(_config(tiny_bundle, broker.port, tmp_path), tmp_path / "x.yaml")
    events, summary = _collect(broker.port, lambda: run_service(cfg))
    for ev in events:
        schemas.validate(ev.payload)  # raises on any invalid message

    # -- exactly one verdict per tile, and the tiles cover the web ------------------------------
    verdicts = [e.payload for e in events if e.type == "verdict"]
    expected = _expected_tiles()
    assert sorted(v["frame_id"] for v in verdicts) == list(range(len(expected)))
    assert all(v["tile"]["id"] == v["frame_id"] for v in verdicts)
    assert all(v["verdict"] in ("OK", "NG") for v in verdicts), "nothing may be dropped at this queue size"
    got = sorted((v["tile"]["bbox_px"][0], v["tile"]["bbox_px"][1], v["tile"]["bbox_px"][3]) for v in verdicts)
    assert got == sorted(expected)
    for v in verdicts:
        x, y, w, h = v["tile"]["bbox_px"]
        assert v["tile"]["cross_extent_mm"] == pytest.approx([x * MM_X, (x + w) * MM_X])
        assert v["tile"]["down_extent_mm"] == pytest.approx([y * MM_Y, (y + h) * MM_Y])
        assert v["tile"]["frame_ids"] == [y // H, (y + h - 1) // H]
        assert v["tile"]["segment"] == (0 if y < DROP * H else 1)
    assert summary.counters["frames"] == len(expected) and summary.counters["tiles"] == len(expected)
    assert summary.counters["web_lines"] == (FRAMES - 1) * H

    # -- every placed defect exactly once, where it is, whole -----------------------------------
    web = [e.payload for e in events if e.type == "web_defect"]
    assert len(web) == len(PLACED), [(d["cross_mm"], d["down_mm"]) for d in web]
    ng_ids = {v["event_id"] for v in verdicts if v["verdict"] == "NG"}
    tile_of = {v["frame_id"]: v for v in verdicts}
    for i, ((x, y), (w, h), kind, why) in enumerate(PLACED):
        near = [d for d in web if abs(d["down_mm"] - y * MM_Y) <= STRIDE * MM_Y
                and abs(d["cross_mm"] - x * MM_X) <= STRIDE * MM_X]
        assert len(near) == 1, f"defect {i} ({why}): {len(near)} reports near it"
        d = near[0]
        # its full extent, not the piece one tile saw (a pixel or two of anti-aliasing either side)
        assert d["cross_extent_mm"] == pytest.approx([(x - w / 2) * MM_X, (x + w / 2) * MM_X], abs=2.5 * MM_X), why
        assert d["down_extent_mm"] == pytest.approx([(y - h / 2) * MM_Y, (y + h / 2) * MM_Y], abs=2.5 * MM_Y), why
        assert d["segment"] == (0 if y < DROP * H else 1)
        assert d["frame_ids"] == [int(y - h / 2) // H, int(y + h / 2 - 1) // H], why
        assert set(d["verdict_event_ids"]) <= ng_ids
        for t in d["tile_ids"]:  # every tile it names did see it
            tx, ty, tw, th = tile_of[t]["tile"]["bbox_px"]
            assert tx < x + w / 2 and x - w / 2 < tx + tw and ty < y + h / 2 and y - h / 2 < ty + th
        if i in STRADDLERS:
            assert len(d["tile_ids"]) >= 2 and d["pieces"] >= 2, f"defect {i} ({why}) was seen by one tile only"
    # NG tiles are explained by placed defects: no false alarms from the web texture
    assert sum(v["verdict"] == "NG" for v in verdicts) == len({t for d in web for t in d["tile_ids"]})

    # -- the dropped frame is a web gap, never stitched across ---------------------------------
    gaps = [e.payload for e in events if e.type == "web_gap"]
    assert len(gaps) == 1
    g = gaps[0]
    assert (g["reason"], g["last_frame_id"], g["next_frame_id"], g["missing_frames"], g["missing_lines"],
            g["segment"]) == ("frame_gap", DROP - 1, DROP + 1, 1, H, 1)
    assert (g["from_mm"], g["to_mm"]) == pytest.approx((DROP * H * MM_Y, (DROP + 1) * H * MM_Y))
    assert not any(v["tile"]["bbox_px"][1] < (DROP + 1) * H and v["tile"]["bbox_px"][1] + TILE > DROP * H
                   for v in verdicts), "a tile overlaps the lost frame"
    status = [e.payload for e in events if e.type == "status"]
    assert any("web gap" in (s.get("detail") or "") for s in status)
    assert summary.counters["web_gaps"] == 1 and summary.counters["web_defects"] == len(PLACED)

    # -- the web map: a PNG of the whole run with a red box at every defect, the gap in yellow ---
    maps = list((tmp_path / "maps").glob("webmap_t_c0_*.png"))
    assert len(maps) == 1
    img = cv2.imread(str(maps[0]))
    legend = img[-WebMap.LEGEND_ROWS:]
    assert (legend == 255).mean() > 0.5 and (legend < 128).any()  # the legend band: mm scale and colours
    img = img[:-WebMap.LEGEND_ROWS]
    gap_rows = 6  # WebMap.GAP_ROWS; here one map pixel = one web pixel (0.1 mm / 0.2 mm -> 1 line)
    assert img.shape == ((FRAMES - 1) * H + gap_rows, W, 3)
    red = (img[:, :, 2] == 255) & (img[:, :, 1] == 0) & (img[:, :, 0] == 0)
    for (x, y), (w, h), _, why in PLACED:
        row = y if y < DROP * H else y - H + gap_rows
        x0, x1 = int(x - w / 2) - 6, int(x + w / 2) + 6
        assert red[max(row - h // 2 - 6, 0):row + h // 2 + 6, max(x0, 0):x1].any(), f"no box on the map: {why}"
    yellow = (img[:, :, 2] == 255) & (img[:, :, 1] == 220) & (img[:, :, 0] == 0)
    band = slice(DROP * H, DROP * H + gap_rows)  # (a box edge may cross it)
    assert yellow[band].mean() > 0.9 and yellow.sum() == yellow[band].sum()

    # -- `linecam events` shows the web defects and the gap with their positions in mm -------------
    table = EventTable(rows=50)
    for ev in events:
        table.add(ev)
    console = Console(record=True, width=240, file=io.StringIO())
    console.print(table.render())
    text = console.export_text()
    for d in web:
        assert f"{d['down_mm']:.1f}" in text and f"{d['cross_mm']:.1f}" in text
    assert "GAP" in text and f"{DROP * H * MM_Y:.1f} - {(DROP + 1) * H * MM_Y:.1f}" in text
    assert "tile " in text and " mm" in text  # verdict rows: tile id @ its down-web extent


class UnpluggedOnce(SyntheticWebSource):
    """The synthetic web, whose "cable" is pulled once at frame ``at``: read raises
    CameraError; after the daemon's reopen the web goes on (the camera's ids continue, as
    GenICamSource keeps them across reopens), so only the reconnect says where the web broke."""

    def __init__(self, at: int, **kw) -> None:
        super().__init__(**kw)
        self.at, self.faulted, self.opens = at, False, 0

    def open(self) -> None:
        self.opens += 1
        if self.opens == 1:
            super().open()

    def close(self) -> None:
        pass

    def read(self, timeout: float):
        if self._next == self.at and not self.faulted:
            self.faulted = True
            raise CameraError("camera stopped delivering (test): check cable/power")
        return super().read(timeout)


@pytest.mark.timeout(120)
def test_a_camera_reconnect_is_a_web_gap_of_unknown_length(broker, tiny_bundle, tmp_path, monkeypatch):
    import linecam.runtime.service as service

    src = UnpluggedOnce(at=6, width=W, lines_per_frame=H, line_rate_hz=None, frames=12, mm_per_px_cross=MM_X,
                        mm_per_line=MM_Y, defects=[])
    monkeypatch.setattr(service, "open_source", lambda _cfg: src)
    raw = _config(tiny_bundle, broker.port, tmp_path)
    raw["runtime"]["reconnect_delay_s"] = [0.05, 0.1]
    cfg = parse_config(raw, tmp_path / "x.yaml")
    events, summary = _collect(broker.port, lambda: run_service(cfg), settle=1.0)
    for ev in events:
        schemas.validate(ev.payload)
    gaps = [e.payload for e in events if e.type == "web_gap"]
    assert [(g["reason"], g["last_frame_id"], g["next_frame_id"], g["missing_frames"], g["segment"]) for g in gaps] \
        == [("camera_reconnect", 5, 6, None, 1)]
    assert gaps[0]["from_mm"] == gaps[0]["to_mm"] == pytest.approx(6 * H * MM_Y)
    verdicts = [e.payload for e in events if e.type == "verdict"]
    assert sorted(v["frame_id"] for v in verdicts) == list(range(summary.counters["tiles"]))
    for v in verdicts:  # no tile spans the break
        y = v["tile"]["bbox_px"][1]
        assert (y + v["tile"]["bbox_px"][3] <= 6 * H) or y >= 6 * H
    assert not [e for e in events if e.type == "web_defect"]  # a plain web: no false alarms
