"""GenICam line-scan configuration: which nodes are written in which order (the plan, a pure
function of the nodes a camera has), and the real harvesters + viky.cti virtual camera, which
is an area camera: it lacks every line-scan node, so it shows the one-line message naming
them, and its real frame-id gaps (dropped buffers) become web gaps."""

from __future__ import annotations

import importlib.util
import time

import pytest

from linecam.camera.genicam_linescan import apply_linescan, linescan_setup, plan_linescan
from linecam.config import EncoderSettings, GenICamLineScan, LineScanSettings, parse_config
from linecam.errors import ConfigError
from linecam.runtime.sources import open_source
from linecam.runtime.linescan import LineScanSession

HAVE_GENICAM = all(importlib.util.find_spec(m) is not None for m in ("genicam", "harvesters"))
LINESCAN_NODES = {"Height", "TriggerSelector", "TriggerMode", "TriggerSource", "TriggerActivation",
                  "AcquisitionLineRate", "EncoderSelector", "EncoderSourceA", "EncoderSourceB", "EncoderMode",
                  "EncoderDivider", "EncoderOutputMode", "EncoderReset"}


def test_free_run_line_rate_prefers_sfnc_name_then_basler_abs():
    writes, missing = plan_linescan(GenICamLineScan(line_rate_hz=20000), LINESCAN_NODES.__contains__)
    assert missing == []
    assert writes == [("TriggerSelector", "LineStart"), ("TriggerMode", "Off"), ("AcquisitionLineRate", 20000.0)]
    basler = {"AcquisitionLineRateAbs", "AcquisitionLineRateEnable"}
    writes, missing = plan_linescan(GenICamLineScan(line_rate_hz=5000), basler.__contains__)
    assert writes == [("AcquisitionLineRateEnable", True), ("AcquisitionLineRateAbs", 5000.0)] and missing == []
    writes, missing = plan_linescan(GenICamLineScan(), set().__contains__)  # free run at the camera's own rate
    assert writes == [] and missing == []


def test_encoder_trigger_plan_order_and_defaults():
    ls = GenICamLineScan(trigger="encoder", encoder=EncoderSettings(mode="FourPhase", divider=4,
                                                                    output_mode="PositionUp"))
    writes, missing = plan_linescan(ls, LINESCAN_NODES.__contains__)
    assert missing == []
    assert writes == [
        ("EncoderSelector", "Encoder0"), ("EncoderSourceA", "Line1"), ("EncoderSourceB", "Line2"),
        ("EncoderMode", "FourPhase"), ("EncoderDivider", 4), ("EncoderOutputMode", "PositionUp"),
        ("EncoderReset", None),  # a command: executed
        ("TriggerSelector", "LineStart"), ("TriggerMode", "On"), ("TriggerSource", "Encoder0"),
    ]
    # trigger: encoder alone configures a default encoder
    writes, _ = plan_linescan(GenICamLineScan(trigger="encoder"), LINESCAN_NODES.__contains__)
    assert writes[0] == ("EncoderSelector", "Encoder0") and writes[-1] == ("TriggerSource", "Encoder0")
    writes, _ = plan_linescan(GenICamLineScan(trigger="line", trigger_source="Line3"), LINESCAN_NODES.__contains__)
    assert writes == [("TriggerSelector", "LineStart"), ("TriggerMode", "On"), ("TriggerSource", "Line3"),
                      ("TriggerActivation", "RisingEdge")]


def test_config_refuses_a_line_rate_with_an_external_trigger(tmp_path):
    base = {"model": {"bundle": "b"}}
    with pytest.raises(ConfigError, match="camera.genicam.linescan"):
        parse_config({**base, "camera": {"kind": "genicam", "cti": "viky",
                                         "linescan": {"trigger": "encoder", "line_rate_hz": 1000}}}, tmp_path / "x")
    cfg = parse_config({**base, "camera": {"kind": "genicam", "cti": "viky", "height": 128,
                                           "linescan": {"trigger": "line"}}}, tmp_path / "x")
    src = open_source(cfg.camera)
    assert src.setup is not None and src.height == 128


@pytest.fixture(scope="module")
def cti():
    if not HAVE_GENICAM:
        pytest.skip("needs the genicam extra: pip install 'linecam[genicam]'")
    from linecam.camera.genicam import viky_cti_path

    path = viky_cti_path()
    if not path.is_file():
        pytest.skip("viky.cti not shipped in this genicam wheel")
    return path


def test_viky_lacks_line_scan_nodes_and_says_which(cti):
    from linecam.camera.genicam import GenICamSource
    from linecam.errors import CameraError

    ls = GenICamLineScan(trigger="encoder", encoder=EncoderSettings(divider=2))
    with pytest.raises(CameraError) as e:
        GenICamSource(cti, serial="0", setup=linescan_setup(ls)).open()
    msg = str(e.value)
    assert "\n" not in msg
    for node in ("EncoderSelector", "EncoderSourceA", "EncoderSourceB", "EncoderDivider", "EncoderReset",
                 "TriggerSelector", "TriggerMode", "TriggerSource"):
        assert node in msg
    with pytest.raises(CameraError, match="AcquisitionLineRate or AcquisitionLineRateAbs"):
        GenICamSource(cti, serial="0", setup=linescan_setup(GenICamLineScan(line_rate_hz=5000))).open()
    # the failed opens released the camera: it opens again, free-running with 100 lines per frame
    with GenICamSource(cti, serial="0", height=100, pixel_format="Mono8", setup=linescan_setup(GenICamLineScan()),
                       features={"AcquisitionFrameRate": 100.0}) as src:
        f = src.read(timeout=2.0)
    assert f.image.shape == (100, 400, 1)


def test_real_frame_id_gaps_become_web_gaps(cti):
    """viky as a stand-in line-scan camera (frames of 100 lines); a slow reader with
    NewestOnly loses buffers, exactly as a real camera would: each loss is one web gap, sized
    from the frame ids."""
    from linecam.camera.genicam import GenICamSource

    published = []
    session = LineScanSession(LineScanSettings(enabled=True, overlap_px=16, mm_per_line=0.5), (64, 64), line="l",
                              camera="c", image_threshold=1.0, publish=lambda k, m: published.append((k, m)))
    tiles, frames = [], []
    with GenICamSource(cti, serial="1", height=100, pixel_format="Mono8", buffer_handling="NewestOnly",
                       features={"AcquisitionFrameRate": 200.0}) as src:
        for i in range(6):
            f = src.read(timeout=2.0)
            assert f is not None
            frames.append(f.frame_id)
            tiles += session.push(f)
            if i in (1, 3):
                time.sleep(0.05)  # ~10 frames go by
    tiles += session.finish()
    gaps = [m for k, m in published if k == "web_gap"]
    steps = [b - a for a, b in zip(frames, frames[1:])]
    assert [m["missing_frames"] for m in gaps] == [s - 1 for s in steps if s > 1]
    assert len(gaps) >= 2
    for g in gaps:
        assert g["reason"] == "frame_gap" and g["missing_lines"] == 100 * g["missing_frames"]
        assert g["to_mm"] - g["from_mm"] == pytest.approx(0.5 * g["missing_lines"])
    # tiles never straddle a gap: every tile's frames are consecutive ids that were delivered
    for t in tiles:
        f0, f1 = t.meta["tile"].frames
        assert f0 in frames and f1 in frames and all(i in frames for i in range(f0, f1 + 1))
    for t in tiles:
        session.tile_done(t, [], "00000000-0000-4000-8000-000000000000")


class _Node:
    def __init__(self, value, symbolics=None):
        self.value, self.symbolics = value, symbolics


class _NodeMap:
    """Just enough of a GenApi node map to check apply()'s decisions (the writes themselves go
    through GenICamSource's setter, exercised against viky above)."""

    def __init__(self, nodes):
        self.nodes = nodes

    def has_node(self, name):
        return name in self.nodes

    def get_node(self, name):
        return self.nodes[name]


def test_apply_writes_in_plan_order_and_skips_a_frame_only_trigger():
    written = []
    nm = _NodeMap({"TriggerSelector": _Node("FrameStart", ["FrameStart"]), "TriggerMode": _Node("Off", ["On", "Off"]),
                   "AcquisitionLineRateAbs": _Node(1000.0), "ResultingLineRateAbs": _Node(7999.5)})
    back = apply_linescan(GenICamLineScan(line_rate_hz=8000), nm, lambda n, v: written.append((n, v)))
    assert written == [("AcquisitionLineRateAbs", 8000.0)]  # no LineStart to switch off on this camera
    assert back["ResultingLineRateAbs"] == 7999.5
    written.clear()
    nm.nodes["TriggerSelector"] = _Node("FrameStart", ["FrameStart", "LineStart"])
    apply_linescan(GenICamLineScan(line_rate_hz=8000), nm, lambda n, v: written.append((n, v)))
    assert written == [("TriggerSelector", "LineStart"), ("TriggerMode", "Off"), ("AcquisitionLineRateAbs", 8000.0)]
