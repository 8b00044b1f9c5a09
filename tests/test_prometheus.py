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
from helpers import line_config  # noqa: E402


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
                                                               s=d.outbox.snapshot_sink))
    assert seen == {"p": None, "s": None} and "snapshots_published" not in summary.counters


def test_collector_reads_the_vlm_worker_and_public_accessors():
    """A daemon with a VLM: its backlog (a property of the worker) and outcomes are exported."""
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry, generate_latest

    from linecam.runtime.prometheus import BUCKETS, STAGES, DaemonCollector
    from linecam.runtime.stats import Counters, LatencyStats

    stats = LatencyStats(stages=STAGES)
    stats.track_histogram([b * 1e3 for b in BUCKETS])
    stats.add_all(STAGES, (0.1, 0.2, 3.0, 0.4, 4.0))
    describer = SimpleNamespace(backlog_depth=3, counters={"published": 2, "skipped": 1})
    fake = SimpleNamespace(counters=Counters(), stats=stats, outbox=SimpleNamespace(camera_state="down"),
                           queue_depths=lambda: {"inference": 5, "snapshots": 1},
                           publisher=SimpleNamespace(connected=False, spool_stats=lambda: None), describer=describer)
    reg = CollectorRegistry()
    reg.register(DaemonCollector(fake, {"line": "t", "camera": "c0"}))
    fams: dict[str, list] = {}
    for fam in text_string_to_metric_families(generate_latest(reg).decode()):
        fams.setdefault(fam.name, []).extend(fam.samples)
    assert value(fams["linecam_vlm_backlog"], "linecam_vlm_backlog") == 3
    assert value(fams["linecam_vlm_descriptions"], "linecam_vlm_descriptions_total", outcome="published") == 2
    assert value(fams["linecam_queue_depth"], "linecam_queue_depth", queue="inference") == 5
    assert value(fams["linecam_camera_up"], "linecam_camera_up") == 0.0
    assert value(fams["linecam_broker_connected"], "linecam_broker_connected") == 0.0
    hist = fams["linecam_stage_latency_seconds"]
    assert value(hist, "linecam_stage_latency_seconds_bucket", stage="inference", le="0.0025") == 0
    assert value(hist, "linecam_stage_latency_seconds_bucket", stage="inference", le="0.005") == 1
    assert value(hist, "linecam_stage_latency_seconds_sum", stage="total") == pytest.approx(0.004)


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_publish_bytes_carries_user_properties_over_mqtt5_only(broker, protocol):
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from linecam.config import MqttSettings
    from linecam.runtime.publisher import MqttPublisher

    got: list = []
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    sub.on_message = lambda c, u, m: got.append(m)
    sub.connect("127.0.0.1", broker.port)
    sub.subscribe("raw/#", qos=0)
    sub.loop_start()
    pub = MqttPublisher(MqttSettings(host="127.0.0.1", port=broker.port, protocol=protocol), "t", "c0", "0")
    pub.start()
    try:
        assert pub.wait_connected(10)
        time.sleep(0.3)  # the subscription is in place
        sent = pub.publish_bytes("raw/snapshot", b"\xff\xd8jpeg", content_type="image/jpeg",
                                 user_properties=[("frame_id", 7)])
        assert sent is (protocol == "5")
        deadline = time.monotonic() + 5
        while protocol == "5" and not got and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
    finally:
        pub.stop()
        sub.loop_stop()
        sub.disconnect()
    if protocol == "5":
        (m,) = got
        assert m.payload == b"\xff\xd8jpeg" and m.qos == 0 and not m.retain
        assert m.properties.ContentType == "image/jpeg" and m.properties.UserProperty == [("frame_id", "7")]
    else:
        assert got == []


def test_bench_prometheus_subcommand(tmp_path):
    import json

    from click.testing import CliRunner

    from linecam.cli import cli

    out = tmp_path / "cost.json"
    r = CliRunner().invoke(cli, ["bench", "prometheus", "--frames", "2000", "--out", str(out),
                                 "--bench-results", str(tmp_path / "absent.json")])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["command"] == "linecam bench prometheus" and res["scrape_cpu_ms"] > 0
    assert res["stats_add_5_stages_with_prometheus_us"] > 0 and res["share_of_daemon_cpu_per_frame"] is None
