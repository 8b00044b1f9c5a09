"""The daemon's Prometheus /metrics (scraped over HTTP during a run, parsed with
prometheus-client's own parser) and the annotated JPEG on …/snapshot, stored by the recorder."""

from __future__ import annotations

import threading
import time
import urllib.request

import pytest

pytest.importorskip("prometheus_client")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from bundles import make_tiny_bundle  # noqa: E402
from linecam.config import parse_config  # noqa: E402
from linecam.runtime.service import run_service  # noqa: E402
from linecam.station.recorder import Recorder, RecorderSettings  # noqa: E402
from linecam.station.store import open_store  # noqa: E402
from test_daemon_e2e import line_config  # noqa: E402


def scrape(port: int) -> dict[str, list]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        out.setdefault(fam.name, []).extend(fam.samples)
    return out


def value(samples: list, name: str, **labels) -> float:
    vals = [s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert vals, f"no sample {name} {labels}"
    return vals[0]


@pytest.mark.timeout(120)
def test_metrics_scraped_and_snapshots_recorded(broker, tmp_path):
    bundle = make_tiny_bundle(tmp_path / "expert", size=64, image_threshold=0.5, pixel_threshold=0.5)
    cfg = line_config(bundle, broker.port, tmp_path, camera={"frames": 80, "fps": 40.0},
                      metrics={"prometheus_port": 0, "prometheus_bind": "127.0.0.1"},
                      output={"publish_snapshots": True, "snapshot_max_kb": 512})
    store = open_store(str(tmp_path / "rec.db"))
    rec = Recorder(store, RecorderSettings(port=broker.port, client_id="rec-prom", group=None)).start()
    scrapes: list[dict] = []

    def scraper(daemon):
        def run():
            while daemon.counters.get("frames") < 20:
                time.sleep(0.01)
            scrapes.append(scrape(daemon.prometheus.port))
            while daemon.counters.get("frames") < 60:
                time.sleep(0.01)
            scrapes.append(scrape(daemon.prometheus.port))
        threading.Thread(target=run, daemon=True).start()

    summary = run_service(parse_config(cfg, tmp_path / "x.yaml"), on_daemon=scraper)
    assert len(scrapes) == 2, "scraped twice during the run"
    first, second = scrapes
    f1 = value(first["linecam_frames"], "linecam_frames_total", line="t", camera="c0")
    f2 = value(second["linecam_frames"], "linecam_frames_total", line="t", camera="c0")
    assert 20 <= f1 < f2
    kinds = {s.labels["verdict"]: s.value for s in second["linecam_verdicts"] if s.name == "linecam_verdicts_total"}
    assert set(kinds) == {"OK", "NG", "SKIPPED"} and sum(kinds.values()) >= 60
    hist = second["linecam_stage_latency_seconds"]
    for stage in ("queue", "preprocess", "inference", "postprocess", "total"):
        n = value(hist, "linecam_stage_latency_seconds_count", stage=stage)
        inf = value(hist, "linecam_stage_latency_seconds_bucket", stage=stage, le="+Inf")
        assert n == inf > 0
    assert {s.labels["queue"] for s in second["linecam_queue_depth"]} == {"inference", "snapshots"}
    assert value(second["linecam_spool_depth"], "linecam_spool_depth") >= 0
    assert value(second["linecam_broker_connected"], "linecam_broker_connected") == 1.0
    assert value(second["linecam_camera_up"], "linecam_camera_up") == 1.0

    # the Grafana dashboard only queries metrics the daemon exports (the VLM's: not in this run)
    import json
    import re
    from pathlib import Path

    dash = json.loads((Path(__file__).parents[1] / "grafana" / "linecam-dashboard.json").read_text())
    wanted = {m for p in dash["panels"] for t in p["targets"] for m in re.findall(r"linecam_\w+", t["expr"])}
    exported = {smp.name for samples in second.values() for smp in samples}
    assert wanted - exported == {"linecam_vlm_backlog"}, wanted - exported

    # …/snapshot: every defect's JPEG went out and the recorder stored it from MQTT
    ng = summary.counters.get("ng", 0)
    assert ng > 0 and summary.counters.get("snapshots_published", 0) == ng
    deadline = time.monotonic() + 20
    while store.count("defect") < ng and time.monotonic() < deadline:
        time.sleep(0.1)
    assert rec.wait_idle(quiet_s=1.0)
    rec.stop()
    defects = store.query(types=["defect"])
    assert len(defects) == ng
    jpegs = [store.snapshot(d.event_id) for d in defects]
    assert all(j is not None and j[:2] == b"\xff\xd8" for j in jpegs)
    with store.engine.connect() as conn:
        import sqlalchemy as sa

        sources = {r[0] for r in conn.execute(sa.text("SELECT source FROM snapshots"))}
    assert sources == {"mqtt"}
    store.close()


def test_off_by_default(broker, tmp_path):
    bundle = make_tiny_bundle(tmp_path / "expert", size=64, image_threshold=0.5, pixel_threshold=0.5)
    cfg = parse_config(line_config(bundle, broker.port, tmp_path, camera={"frames": 10}), tmp_path / "x.yaml")
    assert cfg.metrics.prometheus_port is None and cfg.output.publish_snapshots is False
    seen = {}
    summary = run_service(cfg, on_daemon=lambda d: seen.update(p=getattr(d, "prometheus", None),
                                                               s=d.snapshot_publisher))
    assert seen == {"p": None, "s": None} and "snapshots_published" not in summary.counters
