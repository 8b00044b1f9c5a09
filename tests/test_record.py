"""``linecam record`` / ``linecam history`` against a real mosquitto and a real PostgreSQL
(Debian package, started here on a free port) and SQLite: a line runs through a broker
outage (the daemon's spool re-sends), two recorders share one MQTT 5 shared subscription
(one of them a ``linecam record`` process), and every message is stored exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from bundles import make_tiny_bundle
from linecam.cli import cli
from linecam.config import parse_config
from linecam.runtime.service import run_service
from linecam.station.recorder import Recorder, RecorderSettings
from linecam.station.store import event_row, open_store
from pgserver import PgServer, find_pg_bin
from helpers import DurableSubscriber, line_cfg, persistent_broker

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pg():
    if find_pg_bin() is None:
        pytest.skip("PostgreSQL not installed (apt-get install postgresql)")
    with PgServer() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "record.db")
    return request.getfixturevalue("pg").url(f"rec_{os.getpid()}_{time.monotonic_ns() % 10**9}")


def start_recorder_process(db: str, port: int, client_id: str, log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "linecam", "record", "--db", db, "--port", str(port),
                             "--client-id", client_id, "--copy-snapshots"],
                            stdout=subprocess.DEVNULL, stderr=open(log, "ab"), env=env)


def wait_for(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")
        time.sleep(0.1)


@pytest.mark.timeout(240)
def test_every_message_stored_once_across_outage_with_two_recorders(tmp_path, db_url):
    n, fps = 120, 40.0
    bundle = make_tiny_bundle(tmp_path / "bundle", size=64, image_threshold=0.3, pixel_threshold=0.5)
    broker = persistent_broker(tmp_path)
    broker.start()
    log = tmp_path / "recorder.log"
    proc = None
    try:
        open_store(db_url).close()  # schema created once before two recorders race for it
        proc = start_recorder_process(db_url, broker.port, "rec-a", log)
        store = open_store(db_url)
        rec_b = Recorder(store, RecorderSettings(port=broker.port, client_id="rec-b", copy_snapshots=True)).start()
        witness = DurableSubscriber(broker.port, "linecam/t/c0/#")  # what the broker delivered, plain paho
        wait_for(lambda: "recording" in log.read_text(errors="replace"), 30, "the recorder process to subscribe")
        cfg = parse_config(line_cfg(bundle, broker.port, tmp_path, n, fps), tmp_path / "x.yaml")
        seen = {"stop": -1, "start": -1, "spooled": 0}

        def outage(daemon):
            def run():
                while daemon.counters.get("frames") < 30:
                    time.sleep(0.01)
                broker.stop()
                seen["stop"] = daemon.counters.get("frames")
                t_end = time.monotonic() + 1.5
                while time.monotonic() < t_end:
                    seen["spooled"] = max(seen["spooled"], daemon.publisher.spool_stats().rows)
                    time.sleep(0.02)
                broker.start()
                seen["start"] = daemon.counters.get("frames")
            threading.Thread(target=run, daemon=True).start()

        summary = run_service(cfg, on_daemon=outage)
        assert summary.counters["frames"] == n
        assert 30 <= seen["stop"] < seen["start"] < n and seen["spooled"] >= 20, seen
        assert witness.wait_for(lambda: len({p["frame_id"] for p in witness.payloads("verdict")}) >= n, 30)
        ng = summary.counters.get("ng", 0)
        assert ng > 0

        def stored(kind):
            return store.count(kind)

        wait_for(lambda: stored("verdict") >= n and stored("defect") >= ng, 60,
                 lambda: f"every verdict and defect stored: {stored('verdict')}/{n} verdicts, {stored('defect')}/{ng} "
                         f"defects; recorder B {rec_b.stats}; recorder A log: {log.read_text()[-1500:]}")
        assert rec_b.wait_idle(quiet_s=1.5)
        time.sleep(1.0)
        verdicts = store.query(types=["verdict"])
        assert sorted(e.payload["frame_id"] for e in verdicts) == list(range(n)), "each frame's verdict once"
        delivered = {p["event_id"] for p in witness.payloads("verdict")}
        assert {e.event_id for e in verdicts} == delivered
        defects = store.query(types=["defect"])
        assert len(defects) == ng
        assert {d.payload["verdict_event_id"] for d in defects} == {
            e.event_id for e in verdicts if e.payload["verdict"] == "NG"}
        statuses = store.query(types=["status"])
        assert {s.payload["event_id"] for s in statuses} == {p["event_id"] for p in witness.payloads("status")}
        assert statuses[-1].payload["online"] is False
        # snapshots copied from the files the defects name (this machine sees them)
        with_file = [d for d in defects if d.payload.get("snapshot")]
        assert with_file and all((store.snapshot(d.event_id) or b"")[:2] == b"\xff\xd8" for d in with_file)

        # both recorders did part of the work (shared subscription), neither stored anything twice
        assert rec_b.stats.stored > 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        text = log.read_text()
        line = [ln for ln in text.splitlines() if ln.startswith("recorded ")][-1]
        stored_a = int(line.split()[1])
        assert stored_a > 0, text[-2000:]
        recorded_types = {"verdict", "defect", "status"}
        total = sum(store.count(k) for k in recorded_types)
        assert stored_a + rec_b.stats.stored == total, (stored_a, rec_b.stats.stored, total)
        print(f"\nrecorder A stored {stored_a}, recorder B {rec_b.stats.stored} "
              f"(+{rec_b.stats.duplicates} duplicates ignored); spool held up to {seen['spooled']}")
        rec_b.stop()
        witness.client.disconnect()

        # history answers from the same database
        runner = CliRunner()
        r = runner.invoke(cli, ["history", "--db", db_url, "--since", "1h", "--ng", "--camera", "c0",
                                "--type", "verdict", "--format", "json"])
        assert r.exit_code == 0, r.output
        lines = [json.loads(x) for x in r.output.splitlines()]
        assert len(lines) == ng and all(x["verdict"] == "NG" for x in lines)
        r = runner.invoke(cli, ["history", "--db", db_url, "--since", "1h", "--rate", "--format", "csv"])
        assert r.exit_code == 0, r.output
        rows = r.output.splitlines()
        assert rows[0] == "hour,camera,verdicts,ng,skipped,ng_rate"
        assert sum(int(x.split(",")[2]) for x in rows[1:]) == n
        assert sum(int(x.split(",")[3]) for x in rows[1:]) == ng
        r = runner.invoke(cli, ["history", "--db", db_url, "--since", "1h", "--format", "csv", "--camera", "nope"])
        assert r.exit_code == 0 and len(r.output.splitlines()) == 1
        r = runner.invoke(cli, ["history", "--db", db_url, "--since", "2026-01-01T00:00", "--limit", "5"])
        assert r.exit_code == 0 and "verdict" in r.output
        store.close()
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        broker.close()


def test_idempotent_insert_and_schema_version(db_url):
    store = open_store(db_url)
    msg = {"schema": "linecam.verdict", "type": "verdict", "event_id": "e-1", "line": "l", "camera": "c",
           "sent_at": "2026-12-02T10:15:00.000Z", "frame_id": 7, "verdict": "NG", "score": 2.0}
    assert store.add_events([event_row("linecam/l/c/verdict", msg)]) == 1
    assert store.add_events([event_row("linecam/l/c/verdict", msg), event_row("linecam/l/c/verdict", msg)]) == 0
    assert store.count() == 1
    store.close()
    store = open_store(db_url)  # reopening an up-to-date database migrates nothing
    assert store.count() == 1
    import sqlalchemy as sa

    with store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE linecam_schema SET version = 99"))
    store.close()
    from linecam.errors import LinecamError

    with pytest.raises(LinecamError, match="newer than this linecam"):
        open_store(db_url)


def test_bad_urls_are_one_line():
    runner = CliRunner()
    r = runner.invoke(cli, ["history", "--db", "mysql://x@y/z"])
    assert r.exit_code == 1 and "not supported" in r.output and "\n" == r.output[-1] and r.output.count("\n") == 1
    r = runner.invoke(cli, ["history", "--db", "/nonexistent/dir/record.db"])
    assert r.exit_code == 1 and "run `linecam record" in r.output
    r = runner.invoke(cli, ["history", "--db", "postgresql://postgres@127.0.0.1:1/none"])
    assert r.exit_code == 1 and "is the server running" in r.output, r.output


def test_broker_down_at_start_is_one_line(tmp_path):
    from linecam.broker import free_port

    r = CliRunner().invoke(cli, ["record", "--db", str(tmp_path / "r.db"), "--port", str(free_port())])
    assert r.exit_code != 0 and "cannot reach MQTT broker" in r.output and "--host / --port" in r.output, r.output


@pytest.mark.timeout(120)
def test_database_down_then_back_nothing_lost(pg, tmp_path):
    """PostgreSQL stops while messages arrive: they stay unacknowledged, are retried, and land."""
    from linecam import messages
    from linecam.runtime.publisher import MqttPublisher, MqttSettings

    url = pg.url(f"down_{os.getpid()}")
    broker = persistent_broker(tmp_path)
    broker.start()
    store = open_store(url)
    rec = Recorder(store, RecorderSettings(port=broker.port, client_id="rec-down", group=None)).start()
    model = {"name": "m", "sha256": "0" * 64, "file": "onnx_fp32"}
    pub = MqttPublisher(MqttSettings(host="127.0.0.1", port=broker.port), "t", "c0", "test", model)
    pub.start()
    try:
        topics = messages.topics("linecam/t/c0")

        def send(first: int, k: int) -> None:
            for i in range(first, first + k):
                m = messages.verdict(line="t", camera="c0", frame_id=i, verdict="OK", score=0.1, score_raw=0.1,
                                     threshold=1.0, frame_ts_ns=1, frame_clock="host_monotonic", frame_mono_ns=1,
                                     latency_ms=dict.fromkeys(("queue", "preprocess", "inference", "postprocess",
                                                               "total"), 1.0), model=model, n_regions=0)
                pub.publish(topics.verdict, m, qos=1)

        send(0, 20)
        wait_for(lambda: store.count("verdict") == 20, 20, "the first 20")
        pg.stop()
        send(20, 30)
        wait_for(lambda: rec.stats.db_errors > 0, 20, "the recorder to notice the database is down")
        pg.start()
        wait_for(lambda: store.count("verdict") == 50, 60, "all 50 after the database came back")
        assert sorted(e.payload["frame_id"] for e in store.query(types=["verdict"])) == list(range(50))
    finally:
        pub.stop()
        rec.stop()
        store.close()
        broker.close()
