"""The durable spool: SQLite storage on its own, then MqttPublisher + spool against a real
mosquitto, observed by a plain paho subscriber with a persistent session."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from linecam import messages
from linecam.broker import MosquittoBroker
from linecam.errors import ConfigError
from linecam.runtime.spool import Spool

from helpers import DurableSubscriber, persistent_broker, spool_rows, spooled_publisher, verdict_msg, wait

MODEL = {"name": "expert", "sha256": "0" * 64}
LAT = {"total": 0.7}


# -- storage -----------------------------------------------------------------------------------
def test_storage_append_read_delete_and_reopen(tmp_path):
    path = tmp_path / "s.db"
    s = Spool(path, max_rows=100, max_bytes=10**6)
    ids, dropped = s.append([("a/verdict", b"x" * 10, 1), ("a/defect", b"y" * 20, 1)])
    assert dropped == [] and ids == sorted(ids) and len(ids) == 2
    assert (s.rows, s.bytes) == (2, len("a/verdict") + 10 + len("a/defect") + 20)
    rows = s.read_after(0, 10)
    assert [(r.topic, r.payload, r.qos) for r in rows] == [("a/verdict", b"x" * 10, 1), ("a/defect", b"y" * 20, 1)]
    assert [r.id for r in s.read_after(ids[0], 10)] == [ids[1]]
    s.delete([ids[0], 999_999])  # an unknown id is ignored
    assert (s.rows, s.bytes) == (1, len("a/defect") + 20)
    s.close()
    s2 = Spool(path)  # a restart sees the leftover, with its id
    assert (s2.rows, s2.leftover, s2.leftover_last_id) == (1, 1, ids[1])
    ids2, _ = s2.append([("a/verdict", b"z", 1)])
    assert ids2[0] > ids[1]  # AUTOINCREMENT: ids are never reused, so order survives restarts
    s2.close()


def test_storage_caps_drop_the_oldest(tmp_path):
    s = Spool(tmp_path / "s.db", max_rows=10, max_bytes=10**6)
    ids, _ = s.append([("t", bytes([i]), 1) for i in range(8)])
    ids2, dropped = s.append([("t", bytes([100 + i]), 1) for i in range(5)])
    assert dropped == ids[:3] and s.rows == 10
    assert [r.payload for r in s.read_after(0, 100)] == [bytes([i]) for i in range(3, 8)] + \
        [bytes([100 + i]) for i in range(5)]
    s.close()
    b = Spool(tmp_path / "b.db", max_rows=1000, max_bytes=1000)
    for _ in range(5):
        b.append([("t", b"p" * 299, 1)])  # 300 bytes each: 3 fit
    assert b.rows == 3 and b.bytes == 900
    b.close()


def test_corrupt_spool_is_one_clear_line(tmp_path):
    p = tmp_path / "s.db"
    p.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ConfigError) as e:
        Spool(p)
    assert "spool" in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "file").write_text("x")  # a file where the spool's folder should be
    with pytest.raises(ConfigError, match="spool.path"):
        Spool(tmp_path / "file" / "sub" / "s.db")


def test_spool_files_are_0600_whatever_the_umask(tmp_path):
    import os
    import stat

    old = os.umask(0o000)
    try:
        sp = Spool(tmp_path / "s.db")
        sp.append([("t/verdict", b"x" * 10, 1)])
    finally:
        os.umask(old)
    files = [p for p in tmp_path.iterdir() if p.name.startswith("s.db")]
    assert files and {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o600}, files
    sp.close()


# -- with a broker ---------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_broker_down_spool_is_the_buffer_then_everything_arrives_in_order(tmp_path):
    broker = persistent_broker(tmp_path)
    try:
        pub = spooled_publisher(broker.port, tmp_path / "s.db", window=5)
        pub.start()
        n = 300
        for i in range(n):
            pub.publish(pub.topics.verdict, verdict_msg(i), qos=1)
        assert wait(lambda: pub.spool_stats().rows == n)
        # nothing handed to paho while disconnected: its memory holds no verdicts
        assert len(pub._client._out_messages) == 0
        assert [r["frame_id"] for r in spool_rows(tmp_path / "s.db")] == list(range(n))
        broker.start()
        sub = DurableSubscriber(broker.port, "linecam/L1/cam0/verdict")
        assert sub.wait_for(lambda: len(sub.payloads("verdict")) >= n)
        assert [v["frame_id"] for v in sub.payloads("verdict")] == list(range(n))
        assert wait(lambda: pub.spool_stats().rows == 0)
        st = pub.stats()
        assert st.published == st.acked and (st.failed, st.spooled) == (0, 0)
        assert (pub.spool_stats().inserted, pub.spool_stats().acked) == (n, n)
        pub.stop()
        assert spool_rows(tmp_path / "s.db") == []
        sub.close()
    finally:
        broker.close()


@pytest.mark.timeout(60)
def test_leftovers_are_resent_at_start_with_their_event_ids(tmp_path):
    broker = MosquittoBroker()  # not running yet
    try:
        a = spooled_publisher(broker.port, tmp_path / "s.db")
        a.start()
        sent = [verdict_msg(i) for i in range(50)]
        for m in sent:
            a.publish(a.topics.verdict, m, qos=1)
        a.stop(drain_timeout=0.3)  # broker down: they stay on disk
        left = spool_rows(tmp_path / "s.db")
        assert [r["event_id"] for r in left] == [m["event_id"] for m in sent]

        broker.start()
        sub = DurableSubscriber(broker.port, "linecam/L1/cam0/verdict")
        b = spooled_publisher(broker.port, tmp_path / "s.db")
        b.start()
        b.publish(b.topics.verdict, verdict_msg(50), qos=1)
        assert sub.wait_for(lambda: len(sub.payloads("verdict")) >= 51)
        got = sub.payloads("verdict")
        # byte for byte the same messages, first, in order; then the new one
        assert [v["event_id"] for v in got[:50]] == [m["event_id"] for m in sent]
        assert got[:50] == [json.loads(messages.to_json(m)) for m in sent]
        assert got[50]["frame_id"] == 50
        assert wait(lambda: b.spool_stats().rows == 0)
        st = b.spool_stats()
        assert (st.leftover_at_start, st.resent, st.inserted, st.acked) == (50, 50, 1, 51)
        b.stop()
        sub.close()
    finally:
        broker.close()


@pytest.mark.timeout(60)
def test_full_spool_drops_oldest_counts_and_says_so(tmp_path):
    broker = MosquittoBroker()
    try:
        pub = spooled_publisher(broker.port, tmp_path / "s.db", max_rows=10)
        drops: list[tuple[int, int]] = []
        pub.on_spool_drop = lambda n, total: drops.append((n, total))
        pub.start()
        for i in range(25):
            pub.publish(pub.topics.verdict, verdict_msg(i), qos=1)
        assert wait(lambda: pub.spool_stats().inserted == 25)
        st = pub.spool_stats()
        assert (st.rows, st.dropped) == (10, 15)
        assert sum(n for n, _ in drops) == 15 and drops[-1][1] == 15
        assert pub.stats().failed == 15
        broker.start()
        sub = DurableSubscriber(broker.port, "linecam/L1/cam0/verdict")
        assert sub.wait_for(lambda: len(sub.payloads("verdict")) >= 10)
        time.sleep(0.3)
        assert [v["frame_id"] for v in sub.payloads("verdict")] == list(range(15, 25))  # the newest kept
        pub.stop()
        sub.close()
    finally:
        broker.close()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_broker_restart_with_messages_in_flight_no_loss(tmp_path, protocol):
    """paho re-sends its in-flight messages after the reconnect under the same mids (whatever
    the clean-start flag): the mid -> row map must stay right, and every row must be deleted."""
    broker = persistent_broker(tmp_path)
    broker.start()
    try:
        sub = DurableSubscriber(broker.port, "linecam/L1/cam0/verdict")
        pub = spooled_publisher(broker.port, tmp_path / "s.db", protocol=protocol, window=50)
        pub.start()
        assert pub.wait_connected(10)
        n = 3000
        stop_at = 1000
        for i in range(n):
            pub.publish(pub.topics.verdict, verdict_msg(i), qos=1)
            if i == stop_at:
                os.kill(broker._proc.pid, signal.SIGSTOP)  # freeze: handed messages stay unacked
                assert wait(lambda: len(pub._forwarder._inflight) > 0, 5)
                os.kill(broker._proc.pid, signal.SIGCONT)
                broker.stop()  # then a (clean, session-saving) broker restart
                broker.start()
        assert sub.wait_for(lambda: len({v["event_id"] for v in sub.payloads("verdict")}) >= n, 60), \
            len(sub.payloads("verdict"))
        ids = {v["frame_id"] for v in sub.payloads("verdict")}
        assert ids == set(range(n))
        assert wait(lambda: pub.spool_stats().rows == 0, 20), pub.spool_stats()
        st = pub.stats()
        assert st.pending == 0 and st.failed == 0
        pub.stop()
        sub.close()
    finally:
        broker.close()


@pytest.mark.timeout(60)
def test_messages_a_client_forgot_are_resent_from_the_spool(tmp_path):
    """Defensive path: if in-flight messages vanish from paho (a clean start in another client
    library, a broker that lost them), the spool re-sends them after resend_after_s."""
    broker = MosquittoBroker()
    broker.start()
    try:
        pub = spooled_publisher(broker.port, tmp_path / "s.db", window=20, resend_after_s=1.0)
        pub.start()
        assert pub.wait_connected(10)
        os.kill(broker._proc.pid, signal.SIGSTOP)
        for i in range(20):
            pub.publish(pub.topics.verdict, verdict_msg(i), qos=1)
        assert wait(lambda: len(pub._forwarder._inflight) == 20, 5)
        forgotten = pub._client.drop_out_messages()  # paho forgets them ...
        assert sum(m.topic.endswith("/verdict") for m in forgotten) == 20
        broker.stop(kill=True)  # ... and so does the broker (never delivered)
        broker.start()
        sub = DurableSubscriber(broker.port, "linecam/L1/cam0/verdict")
        assert sub.wait_for(lambda: len({v["event_id"] for v in sub.payloads("verdict")}) >= 20, 30)
        assert wait(lambda: pub.spool_stats().rows == 0)
        got = sub.payloads("verdict")
        # QoS 1 is at least once: on a loaded machine the 1 s re-send can fire before the
        # restarted broker acknowledges, and a message arrives twice, as the same event (its
        # event_id): what a subscriber de-duplicates on. Every frame, and nothing else.
        by_id = {v["event_id"]: v["frame_id"] for v in got}
        assert sorted(by_id.values()) == list(range(20)), "every frame once, by event_id"
        assert len(got) <= 40, f"{len(got)} deliveries of 20 messages: more than one re-send each"
        st = pub.spool_stats()
        assert st.resent >= 20 and st.acked == 20 and st.dropped == 0
        pub.stop()
        sub.close()
    finally:
        broker.close()
