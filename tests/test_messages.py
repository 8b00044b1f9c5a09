"""Message builders vs. the JSON Schemas (the published contract)."""

from __future__ import annotations

import json
import re
import time
import uuid
from datetime import datetime, timezone

import jsonschema
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from linecam import messages
from linecam.errors import ConfigError
from linecam.schemas import SCHEMA_NAMES, load_schema, validate

MODEL = {"name": "bottle-expert", "sha256": "ab" * 32, "file": "fp16"}
LAT = {"queue": 0.5, "preprocess": 1.25, "inference": 4.0, "postprocess": 0.75, "total": 6.5}


def make_verdict(**over):
    kw = dict(line="L1", camera="cam0", frame_id=7, verdict="NG", score=1.5, score_raw=0.3, threshold=0.2,
              frame_ts_ns=123_456_789, frame_clock="device", frame_mono_ns=999, latency_ms=LAT, model=MODEL,
              n_regions=2)
    kw.update(over)
    return messages.verdict(**kw)


def make_description(**over):
    kw = dict(line="L1", camera="cam0", frame_id=7, defect_event_id=str(uuid.uuid4()),
              verdict_event_id=str(uuid.uuid4()), status="ok", text="a scratch near the left edge", n_tokens=9,
              stop_reason="stop_token", n_regions=1, prompt="Describe the defect.",
              latency_ms={"queue": 1.0, "ttft": 120.0, "total": 900.0}, model=MODEL)
    kw.update(over)
    return messages.description(**kw)


def make_defect(**over):
    kw = dict(line="L1", camera="cam0", frame_id=7, verdict_event_id=str(uuid.uuid4()), score=1.5,
              image_size=(640, 480),
              regions=[{"bbox": (10, 20, 30, 40), "area": 900, "centroid": (25.0, 40.5), "max_score": 2.0}],
              snapshot="/var/lib/linecam/snapshots/cam0_000000007.jpg", frame_ts_ns=1, frame_clock="host_monotonic",
              model=MODEL)
    kw.update(over)
    return messages.defect(**kw)


def make_status(**over):
    kw = dict(line="L1", camera="cam0", online=True, state="running", camera_state="up", fps=30.0, frames=100,
              ng=3, dropped=0, version="0.1.0", model=MODEL)
    kw.update(over)
    return messages.status(**kw)


def make_metrics(**over):
    kw = dict(line="L1", camera="cam0", interval_s=10.0, counters={"frames": 300, "ng": 2}, fps=30.0,
              latency_ms={"total": {"p50": 5.0, "p90": 7.0, "p99": 9.0, "max": 12.0}},
              queue_depth={"inference": 1, "snapshots": 0},
              process={"rss_mb": 210.5, "cpu_percent": 55.0, "threads": 12, "fds": 40})
    kw.update(over)
    return messages.metrics(**kw)


TILE = {"id": 12, "segment": 0, "row": 2, "col": 0, "bbox_px": [0, 80, 64, 64], "frame_ids": [0, 1],
        "cross_extent_mm": [0.0, 6.4], "down_extent_mm": [16.0, 28.8]}


def make_web_defect(**over):
    kw = dict(line="L1", camera="cam0", defect_id=3, segment=0, cross_mm=12.5, down_mm=1520.25,
              cross_extent_mm=(11.5, 13.5), down_extent_mm=(1519.0, 1521.5), bbox_px=(115, 15190, 20, 25),
              frame_ids=(59, 60), tile_ids=[411, 412, 418], verdict_event_ids=[str(uuid.uuid4())], score=2.5,
              pieces=3, position_source="lines", model=MODEL)
    kw.update(over)
    return messages.web_defect(**kw)


def make_web_gap(**over):
    kw = dict(line="L1", camera="cam0", segment=1, reason="frame_gap", last_frame_id=24, next_frame_id=26,
              missing_frames=1, missing_lines=96, from_mm=480.0, to_mm=499.2, position_source="lines")
    kw.update(over)
    return messages.web_gap(**kw)


BUILDERS = {"verdict": make_verdict, "defect": make_defect, "status": make_status, "metrics": make_metrics,
            "description": make_description, "web_defect": make_web_defect, "web_gap": make_web_gap}
#: Properties a builder emits only when asked (line-scan fields of a verdict).
OPTIONAL = {"verdict": {"tile", "source"}}  # source: replay frames only


# -- valid messages ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", SCHEMA_NAMES)
def test_builders_produce_valid_messages_with_common_fields(kind):
    before_ns, before = time.monotonic_ns(), datetime.now(timezone.utc)
    msg = BUILDERS[kind]()
    after_ns = time.monotonic_ns()
    validate(msg)
    assert msg["schema"] == f"linecam.{kind}" and msg["type"] == kind
    assert msg["schema_version"] == messages.SCHEMA_VERSION == 1
    assert uuid.UUID(msg["event_id"]).version == 4
    assert (msg["line"], msg["camera"]) == ("L1", "cam0")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", msg["sent_at"])
    sent = datetime.fromisoformat(msg["sent_at"].replace("Z", "+00:00"))
    assert abs((sent - before).total_seconds()) < 2
    assert before_ns <= msg["mono_ns"] <= after_ns
    # The builder emits exactly the fields the schema requires: no more, no fewer; the schema
    # declares only those and the optional ones.
    props, required = set(load_schema(kind)["properties"]), set(load_schema(kind)["required"])
    assert set(msg) == required and props - required == OPTIONAL.get(kind, set())


def test_line_scan_verdict_carries_its_tile():
    msg = make_verdict(frame_id=12, tile={**TILE, "id": np.int64(12), "bbox_px": np.array([0, 80, 64, 64])})
    validate(msg)
    assert set(msg) == set(load_schema("verdict")["properties"]) - {"source"}
    back = json.loads(messages.to_json(msg))
    assert back["tile"] == TILE
    validate(back)
    for bad in ({**TILE, "bbox_px": [0, 80, 0, 64]}, {**TILE, "extra": 1},
                {k: v for k, v in TILE.items() if k != "down_extent_mm"}, {**TILE, "frame_ids": [0]}):
        broken = dict(msg, tile=bad)
        with pytest.raises(jsonschema.ValidationError):
            validate(broken)
    assert "tile" not in make_verdict()  # absent, not null, outside line-scan mode


def test_two_messages_get_distinct_event_ids():
    assert make_verdict()["event_id"] != make_verdict()["event_id"]


def test_skipped_verdict_and_last_will_validate():
    v = make_verdict(verdict="SKIPPED", score=None, score_raw=None, latency_ms={"total": 0.2}, reason="queue_full",
                     n_regions=0)
    validate(v)
    w = messages.last_will("L1", "cam0")
    validate(w)
    assert (w["online"], w["state"], w["camera_state"], w["detail"]) == (False, "stopped", "unknown", "connection lost")


def test_numpy_scalars_are_coerced_and_json_is_compact():
    v = make_verdict(frame_id=np.int64(5), score=np.float32(0.5), score_raw=np.float64(0.1), n_regions=np.int32(0),
                     latency_ms={k: np.float32(x) for k, x in LAT.items()}, verdict="OK")
    d = make_defect(regions=[{"bbox": np.array([1, 2, 3, 4]), "area": np.int64(12),
                              "centroid": np.array([2.5, 3.5]), "max_score": np.float32(1.25)}])
    for msg in (v, d):
        raw = messages.to_json(msg)
        assert b", " not in raw and b": " not in raw  # compact separators
        back = json.loads(raw)
        validate(back)
    assert json.loads(messages.to_json(v))["score"] == 0.5
    assert json.loads(messages.to_json(d))["regions"][0] == {"bbox": [1, 2, 3, 4], "area": 12,
                                                             "centroid": [2.5, 3.5], "max_score": 1.25}


def test_metrics_keep_sample_counts_integral():
    total = {"p50": np.float64(5), "p90": 7, "p99": 9.5, "max": 12.0, "n": np.int64(300)}
    m = make_metrics(latency_ms={"total": total})
    validate(m)
    back = json.loads(messages.to_json(m))["latency_ms"]["total"]
    assert back == {"p50": 5.0, "p90": 7, "p99": 9.5, "max": 12.0, "n": 300}
    assert isinstance(back["n"], int) and isinstance(back["p50"], float)


def test_to_json_refuses_nan():
    with pytest.raises(ValueError):
        messages.to_json(make_verdict(score=float("nan")))


@settings(max_examples=60, deadline=None)
@given(
    frame_id=st.integers(0, 2**63 - 1),
    raw=st.floats(0, 1e6, allow_nan=False),
    thr=st.floats(1e-6, 1e6, allow_nan=False),
    lat=st.lists(st.floats(0, 1e5, allow_nan=False), min_size=5, max_size=5),
    verdict=st.sampled_from(["OK", "NG"]),
    clock=st.sampled_from(["device", "host_monotonic", "host_realtime"]),
)
def test_any_finite_verdict_validates_and_round_trips(frame_id, raw, thr, lat, verdict, clock):
    msg = make_verdict(frame_id=frame_id, score=raw / thr, score_raw=raw, threshold=thr, verdict=verdict,
                       frame_clock=clock, latency_ms=dict(zip(LAT, lat, strict=True)))
    back = json.loads(messages.to_json(msg))
    assert back == msg
    validate(back)


# -- invalid messages are rejected ----------------------------------------------------------------
@pytest.mark.parametrize("kind", SCHEMA_NAMES)
def test_every_required_field_is_required(kind):
    msg = BUILDERS[kind]()
    for field in load_schema(kind)["required"]:
        broken = {k: v for k, v in msg.items() if k != field}
        with pytest.raises(jsonschema.ValidationError):
            validate(broken)


@pytest.mark.parametrize("kind", SCHEMA_NAMES)
def test_extra_top_level_field_is_rejected(kind):
    msg = BUILDERS[kind]()
    msg["surprise"] = 1
    with pytest.raises(jsonschema.ValidationError, match="surprise"):
        validate(msg)


@pytest.mark.parametrize(
    "kind, change",
    [
        ("verdict", {"verdict": "MAYBE"}),
        ("verdict", {"frame_clock": "wallclock"}),
        ("verdict", {"score": None}),  # an inspected frame has a score
        ("verdict", {"latency_ms": {k: v for k, v in LAT.items() if k != "inference"}}),
        ("verdict", {"latency_ms": {**LAT, "gpu": 1.0}}),
        ("verdict", {"verdict": "SKIPPED", "reason": None}),  # SKIPPED must say why
        ("verdict", {"frame_id": -1}),
        ("verdict", {"frame_id": 1.5}),
        ("verdict", {"model": {"name": "x", "sha256": "not-hex"}}),
        ("verdict", {"schema_version": 2}),
        ("verdict", {"schema": "linecam.defect"}),
        ("verdict", {"sent_at": "2025-01-01T00:00:00Z"}),  # no milliseconds
        ("verdict", {"event_id": "1234"}),
        ("verdict", {"camera": "a/b"}),  # would break the topic layout
        ("defect", {"image_size": [640]}),
        ("defect", {"regions": [{"bbox": [0, 0, 1, 1], "area": 1, "centroid": [0.5, 0.5], "max_score": 1.0,
                                 "label": "scratch"}]}),
        ("defect", {"regions": [{"bbox": [0, 0, 0, 1], "area": 1, "centroid": [0.5, 0.5], "max_score": 1.0}]}),
        ("status", {"state": "sleeping"}),
        ("status", {"camera_state": "maybe"}),
        ("status", {"online": "yes"}),
        ("metrics", {"process": {"rss_mb": 1.0, "cpu_percent": 1.0, "threads": 1}}),
        ("metrics", {"latency_ms": {"total": {"p50": 1.0}}}),
        ("metrics", {"counters": {"frames": -1}}),
        ("web_defect", {"position_source": "gps"}),
        ("web_defect", {"tile_ids": []}),
        ("web_defect", {"bbox_px": [0, 0, 0, 5]}),
        ("web_defect", {"down_extent_mm": [1.0]}),
        ("web_defect", {"verdict_event_ids": ["x"]}),
        ("web_gap", {"reason": "bored"}),
        ("web_gap", {"segment": 0}),  # a gap always starts a new segment
        ("web_gap", {"missing_frames": -1}),
        ("web_gap", {"next_frame_id": None}),
    ],
)
def test_wrong_values_are_rejected(kind, change):
    msg = BUILDERS[kind]()
    validate(msg)  # valid before the change
    msg.update(change)
    with pytest.raises(jsonschema.ValidationError):
        validate(msg)


def test_unknown_type_is_rejected():
    with pytest.raises(jsonschema.ValidationError, match="unknown message type"):
        validate({"type": "gossip"})
    with pytest.raises(KeyError):
        load_schema("gossip")


# -- schemas and topics ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", SCHEMA_NAMES)
def test_schema_files_are_draft_2020_12_with_ids(kind):
    s = load_schema(kind)
    jsonschema.Draft202012Validator.check_schema(s)
    assert s["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert s["$id"] == f"https://linecam.dev/schemas/{kind}/1.json"
    assert s["additionalProperties"] is False


def test_shared_definitions_do_not_drift_between_schemas():
    defs: dict[str, dict] = {}
    for kind in SCHEMA_NAMES:
        for name, d in load_schema(kind)["$defs"].items():
            assert defs.setdefault(name, d) == d, f"$defs/{name} differs in {kind}.json"
        assert load_schema(kind)["properties"]["sent_at"] == load_schema("verdict")["properties"]["sent_at"]


def test_topics():
    assert messages.default_prefix("L1", "cam0") == "linecam/L1/cam0"
    t = messages.topics("plant/L1/cam0/")
    assert (t.verdict, t.defect, t.status, t.metrics, t.description) == (
        "plant/L1/cam0/verdict", "plant/L1/cam0/defect", "plant/L1/cam0/status", "plant/L1/cam0/metrics",
        "plant/L1/cam0/description")
    assert (t.web_defect, t.web_gap) == ("plant/L1/cam0/web_defect", "plant/L1/cam0/web_gap")
    for bad in ("a/b", "a+", "#", ""):
        with pytest.raises(ConfigError):
            messages.default_prefix("L1", bad)
    with pytest.raises(ConfigError):
        messages.topics("linecam/+/cam0")
