"""Region-grounded prompt builder and the description message."""

from __future__ import annotations

import uuid

import jsonschema
import numpy as np
import pytest

from linecam import messages
from linecam.runtime.postprocess import Region
from linecam.runtime.vlm.prompt import PromptConfig, RegionPromptBuilder
from linecam.schemas import validate


def _frame(h=480, w=640):
    return np.full((h, w, 3), 100, np.uint8)


def test_crop_grows_union_of_boxes_by_margin_and_clips():
    b = RegionPromptBuilder(PromptConfig(margin=0.5, min_margin_px=10, overlay="none"))
    regs = [Region((100, 200, 40, 20), 800, (120.0, 210.0), 3.0), Region((160, 210, 20, 30), 600, (170.0, 225.0), 2.0)]
    g = b.build(_frame(), regs, threshold=2.0)
    # union x 100..180, y 200..240 -> larger side 80 -> margin 40
    assert g.crop_box == (60, 160, 160, 120)
    assert g.image.shape == (120, 160, 3) and g.image.dtype == np.uint8
    # Near the border the crop is clipped to the frame.
    g2 = b.build(_frame(), [Region((0, 0, 10, 10), 100, (5.0, 5.0), 1.0)])
    assert g2.crop_box == (0, 0, 20, 20)


def test_text_has_boxes_areas_scores_strongest_first():
    b = RegionPromptBuilder(PromptConfig(margin=0.0, min_margin_px=0))
    regs = [Region((10, 20, 30, 40), 1200, (25.0, 40.0), 1.5), Region((50, 60, 5, 5), 25, (52.0, 62.0), 4.5)]
    g = b.build(_frame(), regs, threshold=1.5)
    p = g.prompt
    assert "2 anomalous region(s)" in p and "crop of a 640x480 camera frame" in p
    # region 1 is the strongest (score 3.00), boxes in frame and crop pixels
    first, second = p.index("Region 1"), p.index("Region 2")
    assert p.index("score 3.00") < second and first < p.index("x=50, y=60 in the frame")
    assert "box x=40, y=40, w=5, h=5 in this crop" in p  # crop origin (10, 20)
    assert "area 1200 px, anomaly score 1.00" in p


def test_overlay_draws_the_box_and_frame_is_not_touched():
    frame = _frame()
    b = RegionPromptBuilder(PromptConfig(margin=0.0, min_margin_px=5))
    g = b.build(frame, [Region((100, 100, 20, 20), 400, (110.0, 110.0), 2.0)])
    assert (g.image[5, 5:25] == (255, 0, 0)).all()  # top edge of the box, crop origin (95, 95)
    assert (frame == 100).all()


def test_defect_message_regions_and_custom_template():
    cfg = PromptConfig(template="{n_regions}|{regions}", region_template="[{x},{y},{w},{h},{area},{score:.1f}]",
                       crop=False)
    g = RegionPromptBuilder(cfg).build(_frame(), [{"bbox": [1, 2, 3, 4], "area": 12, "centroid": [2, 4],
                                                   "max_score": 2.25}])
    assert g.prompt == "1|[1,2,3,4,12,2.2]" and g.crop_box == (0, 0, 640, 480)


def test_mono_16bit_frame_becomes_rgb8():
    img = np.full((64, 64, 1), 4095, np.uint16)
    g = RegionPromptBuilder(PromptConfig(overlay="none")).build(img, [], bit_depth=12)
    assert g.image.shape == (64, 64, 3) and int(g.image.max()) == 255


def test_bad_template_fails_at_construction():
    with pytest.raises(KeyError):
        RegionPromptBuilder(PromptConfig(template="{nope}"))


def test_description_message_validates_and_is_strict():
    did = str(uuid.uuid4())
    ok = messages.description(line="l1", camera="c1", frame_id=7, defect_event_id=did, verdict_event_id=None,
                              status="ok", text="a scratch", n_tokens=3, stop_reason="stop_token", n_regions=1,
                              latency_ms={"queue": 1, "total": 2.5}, model={"name": "m", "sha256": "a" * 64})
    validate(ok)
    assert ok["type"] == "description" and ok["defect_event_id"] == did and ok["schema_version"] == 1
    assert messages.topics("linecam/l1/c1").description == "linecam/l1/c1/description"
    skipped = messages.description(line="l1", camera="c1", frame_id=8, defect_event_id=did,
                                   verdict_event_id=str(uuid.uuid4()), status="skipped", text=None,
                                   reason="backlog_full")
    validate(skipped)
    for bad in ({**ok, "defect_event_id": "x"}, {**ok, "status": "maybe"}, {**ok, "extra": 1}):
        with pytest.raises(jsonschema.ValidationError):
            validate(bad)
