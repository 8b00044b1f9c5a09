"""MqttPublisher against a real mosquitto, observed by a plain paho subscriber."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pydantic
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from linecam import messages
from linecam.broker import MosquittoBroker
from linecam.errors import ConfigError
from linecam.config import MqttSettings
from linecam.runtime.publisher import MqttPublisher
from linecam.schemas import validate

REPO = Path(__file__).resolve().parents[1]
MODEL = {"name": "expert", "sha256": "0" * 64}
LAT = {"queue": 0.1, "preprocess": 0.2, "inference": 0.3, "postprocess": 0.1, "total": 0.7}


class Collector:
    """A plain paho subscriber (not linecam code) that records every message it gets."""

    def __init__(self, host: str, port: int, topic: str = "#", protocol: int = mqtt.MQTTv5) -> None:
        self.msgs: list[mqtt.MQTTMessage] = []
        self._cond = threading.Condition()
        subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=protocol)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect(host, port)
        self.client.subscribe(topic, qos=1)
        self.client.loop_start()
        assert subscribed.wait(5), "subscription not confirmed"

    def _on_message(self, client, userdata, msg):
        with self._cond:
            self.msgs.append(msg)
            self._cond.notify_all()

    def payloads(self, suffix: str) -> list[dict]:
        with self._cond:
            return [json.loads(m.payload) for m in self.msgs if m.topic.endswith("/" + suffix)]

    def wait_for(self, pred, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not pred():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def retained_status(broker, prefix: str = "linecam/L1/cam0", timeout: float = 5.0) -> tuple[dict, bool] | None:
    """What a *late* subscriber sees on the status topic (payload, retain flag)."""
    c = Collector(broker.host, broker.port, f"{prefix}/status")
    try:
        if not c.wait_for(lambda: len(c.msgs) >= 1, timeout):
            return None
        m = c.msgs[0]
        return json.loads(m.payload), bool(m.retain)
    finally:
        c.close()


def verdict_msg(i: int, verdict: str = "OK") -> dict:
    return messages.verdict(line="L1", camera="cam0", frame_id=i, verdict=verdict, score=0.5, score_raw=0.1,
                            threshold=0.2, frame_ts_ns=i, frame_clock="host_monotonic", frame_mono_ns=i,
                            latency_ms=LAT, model=MODEL)


def make_publisher(port: int, protocol: str = "5", **kw) -> MqttPublisher:
    return MqttPublisher(MqttSettings(port=port, protocol=protocol, **kw), "L1", "cam0", "0.1.0", MODEL)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_verdicts_arrive_in_order_with_qos1_and_stop_drains(broker, protocol):
    col = Collector(broker.host, broker.port)
    pub = make_publisher(broker.port, protocol)
    pub.start()
    assert pub.wait_connected(10)
    n = 300
    for i in range(n):
        pub.publish(pub.topics.verdict, verdict_msg(i, "NG" if i % 7 == 0 else "OK"), qos=1)
    pub.publish(pub.topics.metrics, messages.metrics(
        line="L1", camera="cam0", interval_s=1.0, counters={"frames": n}, fps=30.0, latency_ms={},
        queue_depth={}, process={"rss_mb": 1.0, "cpu_percent": 0.0, "threads": 3, "fds": 5}), qos=0)
    pub.stop()  # must drain: everything published before stop() reaches the broker
    st = pub.stats()
    assert (st.published, st.acked, st.failed, st.pending) == (n + 3, n + 3, 0, 0)  # + 2 status + 1 metrics
    assert col.wait_for(lambda: len(col.payloads("verdict")) >= n and len(col.payloads("status")) >= 2)
    verdicts = col.payloads("verdict")
    assert [v["frame_id"] for v in verdicts] == list(range(n))
    assert sum(v["verdict"] == "NG" for v in verdicts) == len(range(0, n, 7))
    for m in col.msgs:
        validate(json.loads(m.payload))
        expected_qos = 0 if m.topic.endswith("/metrics") else 1
        assert m.qos == expected_qos, m.topic
        assert m.topic.startswith("linecam/L1/cam0/")
    statuses = col.payloads("status")
    assert (statuses[0]["online"], statuses[0]["state"]) == (True, "starting")  # sent on connect
    assert (statuses[-1]["online"], statuses[-1]["state"], statuses[-1]["detail"]) == (False, "stopped", "stopped")
    col.close()


@pytest.mark.timeout(60)
def test_retained_status_is_seen_by_late_subscribers_and_clean_stop_says_offline(broker):
    pub = make_publisher(broker.port, "3.1.1")
    pub.start()
    assert pub.wait_connected(10)
    pub.publish_status(state="running", camera_state="up", fps=29.5, frames=120, ng=4, dropped=1)
    assert _wait(lambda: pub.stats().pending == 0)
    got = retained_status(broker)
    assert got is not None
    status, retained = got
    assert retained is True
    validate(status)
    assert (status["online"], status["state"], status["camera_state"], status["frames"], status["ng"]) == (
        True, "running", "up", 120, 4)
    assert status["version"] == "0.1.0" and status["model"] == MODEL

    pub.stop()
    status, retained = retained_status(broker)
    validate(status)
    assert retained and status["online"] is False and status["state"] == "stopped"
    assert status["detail"] == "stopped"  # the clean stop's own status, not the Will
    assert (status["frames"], status["ng"]) == (120, 4)  # last known counts carried over


@pytest.mark.timeout(60)
def test_statuses_published_before_the_connection_arrive_in_order_and_the_newest_stays_retained(broker):
    """paho counts itself connected before it calls on_connect and flushes its own queue only
    after it: a status another thread publishes in that gap (the camera thread saying "camera down"
    while the main thread's "starting" still waits) must not overtake the older one."""
    col = Collector(broker.host, broker.port, "linecam/L1/cam0/status")
    pub = make_publisher(broker.port)
    pub.publish_status(state="starting", camera_state="up")  # before start(): not connected yet
    connect = pub._client.on_connect

    def on_connect_with_a_racing_status(*args):
        t = threading.Thread(target=pub.publish_status,
                             kwargs=dict(state="degraded", camera_state="down", detail="camera down"))
        t.start()
        t.join(5)
        connect(*args)

    pub._client.on_connect = on_connect_with_a_racing_status
    pub.start()
    assert pub.wait_connected(10)
    pub.publish_status(state="running", camera_state="up", detail="camera reconnected")
    assert col.wait_for(lambda: len(col.payloads("status")) >= 3)
    assert [(s["state"], s["camera_state"]) for s in col.payloads("status")] == [
        ("starting", "up"), ("degraded", "down"), ("running", "up")]
    status, _ = retained_status(broker)
    assert (status["state"], status["detail"]) == ("running", "camera reconnected")
    pub.stop()
    col.close()


_CRASHER = textwrap.dedent("""
    import sys, time
    from linecam.config import MqttSettings
    from linecam.runtime.publisher import MqttPublisher
    pub = MqttPublisher(MqttSettings(port=int(sys.argv[1]), protocol=sys.argv[2]), "L1", "cam0", "0.1.0", None)
    pub.start()
    assert pub.wait_connected(10)
    pub.publish_status(state="running", camera_state="up")
    while pub.stats().pending:
        time.sleep(0.01)
    print("ready", flush=True)
    time.sleep(60)
""")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_last_will_is_retained_offline_status_when_the_process_dies(broker, protocol):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", _CRASHER, str(broker.port), protocol], stdout=subprocess.PIPE,
                            text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "ready"
        status, _ = retained_status(broker)
        assert (status["online"], status["state"]) == (True, "running")
        proc.send_signal(signal.SIGKILL)  # no DISCONNECT packet: the broker must fire the Will
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 10
    while True:
        status, retained = retained_status(broker)
        if status["online"] is False or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    validate(status)
    assert retained is True
    assert (status["online"], status["state"], status["camera_state"], status["detail"]) == (
        False, "stopped", "unknown", "connection lost")


@pytest.mark.timeout(60)
def test_broker_down_at_start_then_up_queued_qos1_messages_arrive(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="linecam.runtime.publisher")
    broker = MosquittoBroker()  # port reserved, not running yet
    try:
        pub = make_publisher(broker.port, "5")
        t0 = time.monotonic()
        pub.start()  # must not raise
        for i in range(20):
            pub.publish(pub.topics.verdict, verdict_msg(i), qos=1)
        pub.publish(pub.topics.metrics, {"type": "metrics"}, qos=0)  # QoS 0 while down: dropped, counted
        assert not pub.connected
        assert pub.stats().failed == 1 and pub.stats().published == 20
        # paho retries at ~0 s, 1 s, 3 s: start the broker between the 2nd and 3rd try so the
        # subscriber below is in place before the publisher gets through.
        time.sleep(max(0.0, 1.6 - (time.monotonic() - t0)))
        assert not pub.wait_connected(0.01)
        unreachable = [r for r in caplog.records if "unreachable, retrying" in r.getMessage()]
        assert len(unreachable) == 1 and unreachable[0].levelno == logging.WARNING  # 2 failures, 1 warning
        broker.start()
        col = Collector(broker.host, broker.port)
        assert pub.wait_connected(15)
        assert any(f"connected to broker 127.0.0.1:{broker.port}" in r.getMessage() for r in caplog.records)
        assert col.wait_for(lambda: len(col.payloads("verdict")) >= 20)
        assert [v["frame_id"] for v in col.payloads("verdict")] == list(range(20))
        pub.stop()
        col.close()
    finally:
        broker.close()


@pytest.mark.timeout(60)
def test_broker_restart_queued_messages_arrive_and_status_is_republished(broker):
    pub = make_publisher(broker.port, "5")
    pub.start()
    assert pub.wait_connected(10)
    pub.publish_status(state="running", camera_state="up", frames=7)
    assert _wait(lambda: pub.stats().pending == 0)
    broker.stop()  # no persistence: the retained status is gone with it
    assert _wait(lambda: not pub.connected)
    for i in range(10):
        pub.publish(pub.topics.verdict, verdict_msg(i), qos=1)
    broker.start()  # paho's first retry comes ~1 s after the drop
    col = Collector(broker.host, broker.port)
    assert pub.wait_connected(15)
    assert col.wait_for(lambda: len(col.payloads("verdict")) >= 10)
    assert [v["frame_id"] for v in col.payloads("verdict")] == list(range(10))
    assert col.wait_for(lambda: len(col.payloads("status")) >= 1)
    status, retained = retained_status(broker)
    assert retained and (status["online"], status["state"], status["frames"]) == (True, "running", 7)
    pub.stop()
    col.close()


def _passwd_broker(tmp_path: Path) -> MosquittoBroker:
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        pytest.skip("mosquitto_passwd not found: apt-get install mosquitto")
    pw = tmp_path / "passwd"
    subprocess.run([tool, "-c", "-b", str(pw), "linecam", "s3cret"], check=True, capture_output=True)
    pw.chmod(0o600)
    return MosquittoBroker(allow_anonymous=False, extra_config=[f"password_file {pw}"])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_bad_password_is_a_fatal_error_good_one_connects(tmp_path, monkeypatch, protocol):
    with _passwd_broker(tmp_path) as broker:
        good = tmp_path / "password"
        good.write_text("s3cret\n")
        ok = make_publisher(broker.port, protocol, username="linecam", password_file=good)
        ok.start()
        assert ok.wait_connected(10) and ok.fatal_error is None
        ok.stop()

        monkeypatch.setenv("LINECAM_TEST_PW", "wrong")
        bad = make_publisher(broker.port, protocol, username="linecam", password_env="LINECAM_TEST_PW")
        bad.start()
        t0 = time.monotonic()
        assert not bad.wait_connected(10)
        assert time.monotonic() - t0 < 5  # returns as soon as the refusal is known
        assert bad.fatal_error is not None
        assert f"127.0.0.1:{broker.port} refused" in bad.fatal_error and "mqtt.username" in bad.fatal_error
        assert "\n" not in bad.fatal_error and "wrong" not in bad.fatal_error
        bad.stop()

        anon = make_publisher(broker.port, protocol)  # no credentials at all: not authorised
        anon.start()
        assert not anon.wait_connected(10) and anon.fatal_error is not None
        anon.stop()


def test_settings_validation_and_secrets(tmp_path, monkeypatch):
    with pytest.raises(pydantic.ValidationError):
        MqttSettings(hots="x")  # typo -> error, not a silent default
    assert MqttSettings.model_validate({"protocol": 5}).protocol == "5"  # YAML `protocol: 5`
    with pytest.raises(pydantic.ValidationError):
        MqttSettings(protocol="4")
    with pytest.raises(pydantic.ValidationError):
        MqttSettings(username="u", password_file=tmp_path / "p", password_env="X")
    with pytest.raises(pydantic.ValidationError):
        MqttSettings(password_env="X")  # a password without a username
    with pytest.raises(pydantic.ValidationError):
        MqttSettings(ca_file=tmp_path / "ca.pem")  # TLS files without tls: true
    monkeypatch.delenv("LINECAM_NOPE", raising=False)
    with pytest.raises(ConfigError, match="LINECAM_NOPE"):
        MqttSettings(username="u", password_env="LINECAM_NOPE").read_password()
    with pytest.raises(ConfigError, match="password_file"):
        MqttSettings(username="u", password_file=tmp_path / "missing").read_password()
    with pytest.raises(ConfigError, match="ca_file"):
        MqttPublisher(MqttSettings(tls=True, ca_file=tmp_path / "missing.pem"), "L1", "cam0", "0.1.0")
    monkeypatch.setenv("LINECAM_PW", "hunter2-secret")
    s = MqttSettings(username="u", password_env="LINECAM_PW")
    pub = MqttPublisher(s, "L1", "cam0", "0.1.0")
    assert s.read_password() == "hunter2-secret"
    assert "hunter2" not in repr(s) + repr(pub) + str(s.model_dump())


def test_unserialisable_message_is_counted_not_raised():
    pub = make_publisher(1, "5")  # never started: nothing goes out anyway
    pub.publish(pub.topics.verdict, verdict_msg(0) | {"score": float("nan")})
    pub.publish(pub.topics.verdict, {"x": object()})
    assert pub.stats().failed == 2 and pub.stats().published == 0


def test_topic_prefix_setting():
    pub = MqttPublisher(MqttSettings(topic_prefix="plant7/L1/cam0"), "L1", "cam0", "0.1.0")
    assert pub.topics.verdict == "plant7/L1/cam0/verdict" and pub.topics.status == "plant7/L1/cam0/status"


def _wait(pred, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
