"""The daemon with a (tiny, random-weight) compact VLM: every NG verdict's defect gets exactly
one description with the right ids, OK frames get none, and verdicts are not delayed by it."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from bundles import make_tiny_bundle  # noqa: E402
from linecam import schemas  # noqa: E402
from linecam.config import parse_config  # noqa: E402
from linecam.runtime.service import run_service  # noqa: E402
from helpers import collect, line_config  # noqa: E402


@pytest.fixture(scope="module")
def vlm_bundle(tmp_path_factory):
    from linecam.export.vlm.export import export_vlm
    from linecam.export.vlm.tiny import build_model_folder

    work = tmp_path_factory.mktemp("vlm")
    model = build_model_folder("qwen2_5_vl", work / "hf", size="tiny")
    export_vlm(model, work / "bundle", quantize=("int8",), agreement_prompts=1, agreement_tokens=4)
    return work / "bundle"


def run_line(broker, tmp_path: Path, vlm_bundle: Path | None):
    # 0.775 splits this line roughly in half (mechanics, not accuracy): both OK and NG frames occur
    bundle = make_tiny_bundle(tmp_path / "expert", size=64, image_threshold=0.775, pixel_threshold=0.5)
    cfg = line_config(bundle, broker.port, tmp_path, camera={"frames": 40, "fps": 20.0})
    if vlm_bundle is not None:
        cfg["vlm"] = {"bundle": str(vlm_bundle), "precision": "fp32", "max_new_tokens": 12, "backlog": 64}
    return collect(broker.port, lambda: run_service(parse_config(cfg, tmp_path / "x.yaml")),
                   types=("verdict", "defect", "description"), settle=2.0)


def test_every_defect_gets_exactly_one_description(broker, tmp_path, vlm_bundle):
    events, summary = run_line(broker, tmp_path / "with", vlm_bundle)
    for ev in events:
        schemas.validate(ev.payload)
    verdicts = [e.payload for e in events if e.type == "verdict"]
    defects = {e.payload["event_id"]: e.payload for e in events if e.type == "defect"}
    descs = [e.payload for e in events if e.type == "description"]
    assert len(verdicts) == 40
    ng = {v["event_id"]: v for v in verdicts if v["verdict"] == "NG"}
    assert ng and len(defects) == len(ng)
    # exactly one description per defect, joined on the defect's event id, for the right frame
    assert sorted(d["defect_event_id"] for d in descs) == sorted(defects)
    for d in descs:
        defect = defects[d["defect_event_id"]]
        assert d["frame_id"] == defect["frame_id"]
        assert d["verdict_event_id"] == defect["verdict_event_id"]
        assert d["status"] == "ok" and isinstance(d["text"], str) and d["n_tokens"] >= 1
    ok_frames = {v["frame_id"] for v in verdicts if v["verdict"] == "OK"}
    assert ok_frames, "the test needs OK frames too"
    assert not ok_frames & {d["frame_id"] for d in descs}
    assert summary.counters.get("ng", 0) == len(ng)


def test_verdict_latency_not_delayed_by_vlm(broker, tmp_path, vlm_bundle):
    """Reported as a ratio (this machine is shared); the bound is loose on purpose."""
    with_vlm, _ = run_line(broker, tmp_path / "with", vlm_bundle)
    without, _ = run_line(broker, tmp_path / "without", None)

    def median_total(events):
        return statistics.median(e.payload["latency_ms"]["total"] for e in events
                                 if e.type == "verdict" and e.payload["verdict"] != "SKIPPED")

    ratio = median_total(with_vlm) / median_total(without)
    n_desc = sum(e.type == "description" for e in with_vlm)
    print(f"\nverdict latency median with VLM busy / without: {ratio:.2f} ({n_desc} descriptions)")
    assert n_desc > 0
    assert ratio < 3.0
