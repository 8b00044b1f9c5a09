"""The subscriber side (linecam.events) and the `events` CLI against a real mosquitto."""

from __future__ import annotations

import json
import threading
import time

import paho.mqtt.client as mqtt
import pytest
from click.testing import CliRunner
from paho.mqtt.enums import CallbackAPIVersion

from linecam import messages
from linecam.broker import free_port
from linecam.events import Event, events_command, subscribe
from linecam.config import MqttSettings
from linecam.runtime.publisher import MqttPublisher
from linecam.schemas import validate

MODEL = {"name": "expert", "sha256": "1" * 64}
LAT = {"queue": 0.1, "preprocess": 0.2, "inference": 0.3, "postprocess": 0.1, "total": 0.7}


def verdict_msg(camera: str, i: int, verdict: str) -> dict:
    return messages.verdict(line="L1", camera=camera, frame_id=i, verdict=verdict,
                            score=1.5 if verdict == "NG" else 0.2, score_raw=0.3, threshold=0.2, frame_ts_ns=i,
                            frame_clock="device", frame_mono_ns=i,
                            latency_ms=LAT, model=MODEL, n_regions=1 if verdict == "NG" else 0)


def publisher(broker, camera: str = "cam0", protocol: str = "5") -> MqttPublisher:
    pub = MqttPublisher(MqttSettings(port=broker.port, protocol=protocol), "L1", camera, "0.1.0", MODEL)
    pub.start()
    assert pub.wait_connected(10)
    return pub


def take(events, n: int, pred=lambda e: True) -> list[Event]:
    out = []
    for ev in events:
        if pred(ev):
            out.append(ev)
            if len(out) == n:
                break
    return out


@pytest.mark.timeout(60)
@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_subscribe_yields_validated_events_in_order(broker, protocol):
    pub = publisher(broker)
    pub.publish_status(state="running", camera_state="up")
    assert _wait(lambda: pub.stats().pending == 0)
    with subscribe(broker.host, broker.port, timeout=20, protocol=protocol) as events:
        status = take(events, 1)[0]  # the retained status is there before anything else
        assert (status.type, status.retained, status.payload["state"]) == ("status", True, "running")
        assert status.topic == "linecam/L1/cam0/status"
        for i in range(50):
            pub.publish(pub.topics.verdict, verdict_msg("cam0", i, "NG" if i % 5 == 0 else "OK"))
        got = take(events, 50, lambda e: e.type == "verdict")
    assert [e.payload["frame_id"] for e in got] == list(range(50))
    assert all(e.topic == "linecam/L1/cam0/verdict" and not e.retained for e in got)
    assert all(0 <= e.latency_ms < 10_000 for e in got)  # same host: publish -> receipt
    pub.stop()


@pytest.mark.timeout(60)
def test_ng_only_and_camera_filters(broker):
    a, b = publisher(broker, "cam0"), publisher(broker, "cam1", protocol="3.1.1")
    with subscribe(broker.host, broker.port, ng_only=True, camera="cam1", types=("verdict",), timeout=20) as events:
        for i in range(40):
            for pub, cam in ((a, "cam0"), (b, "cam1")):
                pub.publish(pub.topics.verdict, verdict_msg(cam, i, "NG" if i % 4 == 0 else "OK"))
        got = take(events, 10)
    assert [(e.payload["camera"], e.payload["frame_id"], e.payload["verdict"]) for e in got] == [
        ("cam1", i, "NG") for i in range(0, 40, 4)]
    a.stop()
    b.stop()


@pytest.mark.timeout(60)
def test_invalid_messages_are_reported_and_skipped(broker):
    bad_reports: list[tuple[str, str]] = []
    raw = mqtt.Client(CallbackAPIVersion.VERSION2)
    raw.connect(broker.host, broker.port)
    raw.loop_start()
    broken = verdict_msg("cam0", 1, "OK")
    broken["verdict"] = "MAYBE"
    with subscribe(broker.host, broker.port, types=("verdict",), timeout=10,
                   on_invalid=lambda t, p, why: bad_reports.append((t, why))) as events:
        raw.publish("linecam/L1/cam0/verdict", b"not json", qos=1).wait_for_publish(5)
        raw.publish("linecam/L1/cam0/verdict", json.dumps(broken), qos=1).wait_for_publish(5)
        raw.publish("linecam/L1/cam0/verdict", json.dumps(verdict_msg("cam0", 2, "OK")), qos=1).wait_for_publish(5)
        got = take(events, 1)
        assert got[0].payload["frame_id"] == 2
        assert events.invalid == 2
    assert [t for t, _ in bad_reports] == ["linecam/L1/cam0/verdict"] * 2
    assert "not JSON" in bad_reports[0][1] and "MAYBE" in bad_reports[1][1]
    with subscribe(broker.host, broker.port, types=("verdict",), timeout=10, validate=False) as events:
        raw.publish("linecam/L1/cam0/verdict", json.dumps(broken), qos=1).wait_for_publish(5)
        assert take(events, 1)[0].payload["verdict"] == "MAYBE"
    raw.disconnect()
    raw.loop_stop()


@pytest.mark.timeout(30)
def test_iteration_ends_at_timeout(broker):
    t0 = time.monotonic()
    with subscribe(broker.host, broker.port, timeout=0.5) as events:
        assert list(events) == []
    assert 0.4 < time.monotonic() - t0 < 5


class Feeder:
    """Publishes verdicts (every 4th NG) every 10 ms until stopped: the CLI under test may
    subscribe at any moment and must see a gap-free run from then on."""

    def __init__(self, broker) -> None:
        self.pub = publisher(broker)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        i = 0
        while not self._stop.wait(0.01):
            self.pub.publish(self.pub.topics.verdict, verdict_msg("cam0", i, "NG" if i % 4 == 0 else "OK"))
            i += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.pub.stop()


def _cli(args: list[str]):
    return CliRunner().invoke(events_command, args, catch_exceptions=False)


@pytest.mark.timeout(60)
def test_cli_prints_json_lines_for_n_verdicts(broker):
    feeder = Feeder(broker)
    try:
        res = _cli(["--host", broker.host, "--port", str(broker.port), "--json", "--count", "5", "--timeout", "20"])
    finally:
        feeder.stop()
    assert res.exit_code == 0, res.output
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    verdicts = [m for m in lines if m["type"] == "verdict"]
    assert len(verdicts) == 5
    first = verdicts[0]["frame_id"]
    assert [v["frame_id"] for v in verdicts] == list(range(first, first + 5))
    assert any(m["type"] == "status" for m in lines)  # the retained status
    for m in lines:
        validate(m)


@pytest.mark.timeout(60)
def test_cli_ng_only(broker):
    feeder = Feeder(broker)
    try:
        res = _cli(["--host", broker.host, "--port", str(broker.port), "--json", "--ng-only", "--count", "3",
                    "--timeout", "20", "--prefix", "linecam/L1/+"])
    finally:
        feeder.stop()
    assert res.exit_code == 0, res.output
    verdicts = [m for m in map(json.loads, res.stdout.splitlines()) if m["type"] == "verdict"]
    assert len(verdicts) == 3 and {v["verdict"] for v in verdicts} == {"NG"}
    assert all(v["frame_id"] % 4 == 0 for v in verdicts)
    assert [v["frame_id"] for v in verdicts][1:] == [v["frame_id"] + 4 for v in verdicts][:-1]


@pytest.mark.timeout(60)
def test_cli_table_view(broker):
    feeder = Feeder(broker)
    try:
        res = _cli(["--host", broker.host, "--port", str(broker.port), "--count", "8", "--timeout", "20", "--table"])
    finally:
        feeder.stop()
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert "verdict" in out and "NG" in out and "OK" in out
    assert "L1/cam0: starting, online, camera unknown" in out  # status line from the retained status


@pytest.mark.timeout(30)
def test_cli_errors_are_one_line_with_exit_1(broker):
    res = _cli(["--port", str(broker.port), "--json", "--count", "3", "--timeout", "0.5"])
    assert res.exit_code == 1
    assert "timeout: 0 of 3 verdicts received" in res.stderr
    res = _cli(["--port", str(broker.port), "--prefix", "linecam/#"])
    assert res.exit_code == 1 and "has '#'" in res.stderr
    res = _cli(["--port", str(free_port()), "--json"])
    assert res.exit_code == 1
    assert res.stderr.startswith("error: cannot reach MQTT broker 127.0.0.1:")
    assert len(res.stderr.strip().splitlines()) == 1


def _wait(pred, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_event_table_shows_description_under_its_defect():
    from rich.console import Console

    from linecam.events import Event, EventTable

    def ev(kind, **p):
        return Event(f"linecam/l/c/{kind}", kind, {"line": "l", "camera": "c", **p}, False, 0)

    table = EventTable(rows=5)
    table.add(ev("verdict", event_id="v1", frame_id=7, verdict="NG", score=2.0, latency_ms={"total": 5.0},
                 n_regions=1))
    table.add(ev("verdict", event_id="v2", frame_id=8, verdict="OK", score=0.2, latency_ms={"total": 5.0}))
    table.add(ev("defect", event_id="d1", verdict_event_id="v1", snapshot="/s/7.jpg"))
    table.add(ev("description", defect_event_id="d1", status="ok", text="scratch on the upper edge"))
    table.add(ev("description", defect_event_id="unknown", status="ok", text="belongs to nothing"))
    console = Console(width=200, record=True)
    console.print(table.render())
    out = console.export_text()
    lines = out.splitlines()
    i_ng = next(i for i, ln in enumerate(lines) if " 7 " in ln and "NG" in ln)
    assert "scratch on the upper edge" in lines[i_ng + 1]  # right under its verdict row
    assert "belongs to nothing" not in out
