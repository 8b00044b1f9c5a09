"""MQTT over TLS against mosquitto with certificates this test generates (a CA, a server
certificate for 127.0.0.1, a client certificate), with a password from a file or the
environment, or a client certificate; secrets never reach the logs. A broker we do not
trust, or one that refuses our certificate, is one line and exit code 5; per-line topic
prefixes let broker ACLs confine each daemon."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bundles import make_tiny_bundle
from linecam import schemas
from linecam.broker import MosquittoBroker
from linecam.config import parse_config
from linecam.events import subscribe
from linecam.runtime.service import run_service

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PASSWORD = "pa55-Wörd-never-logged-7f3a"


def make_pki(out: Path) -> Path:
    """CA, server certificate (SAN 127.0.0.1, localhost) and client certificate 'cam1'."""
    out.mkdir(parents=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def builder(subject, issuer, key):
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=2)))

    def write(stem: str, cert, key) -> None:
        (out / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (out / f"{stem}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                            serialization.NoEncryption()))
        (out / f"{stem}.key").chmod(0o600)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (builder(name("linecam test CA"), name("linecam test CA"), ca_key)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    write("ca", ca, ca_key)
    for cn, server in (("server", True), ("cam1", False)):
        key = ec.generate_private_key(ec.SECP256R1())
        b = (builder(name(cn), ca.subject, key)
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                   else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
        if server:
            b = b.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        write(cn, b.sign(ca_key, hashes.SHA256()), key)
    return out


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    return make_pki(root / "trusted"), make_pki(root / "foreign")


def passwd_file(tmp_path: Path, user: str = "cam1") -> Path:
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        pytest.skip("mosquitto_passwd not found")
    p = tmp_path / "passwd"
    subprocess.run([tool, "-c", "-b", str(p), user, PASSWORD], check=True, capture_output=True)
    return p


def tls_broker(pki_dir: Path, *extra: str, anonymous: bool = False) -> MosquittoBroker:
    return MosquittoBroker(allow_anonymous=anonymous, extra_config=[
        f"cafile {pki_dir / 'ca.pem'}", f"certfile {pki_dir / 'server.pem'}", f"keyfile {pki_dir / 'server.key'}",
        *extra])


def daemon_cfg(tmp_path: Path, port: int, mqtt: dict, frames: int = 30, line: str = "t") -> dict:
    return {
        "line": line, "camera_id": "c0",
        "camera": {"kind": "synthetic", "width": 160, "height": 160, "fps": 60.0, "frames": frames, "seed": 1},
        "model": {"bundle": str(make_tiny_bundle(tmp_path / "bundle", size=64, image_threshold=0.3))},
        "mqtt": {"host": "127.0.0.1", "port": port, "tls": True, **mqtt},
        "runtime": {"metrics_interval_s": 0.3},
        "output": {"snapshots_dir": str(tmp_path / "snaps")},
        "spool": {"path": str(tmp_path / f"spool-{line}.db")},
    }


def drain(sub, settle: float = 1.0) -> list:
    out = []
    while (ev := sub.poll(settle)) is not None:
        out.append(ev)
    return out


@pytest.mark.timeout(60)
@pytest.mark.parametrize("secret_from", ["password_file", "password_env"])
def test_tls_with_password_and_secrets_never_logged(pki, tmp_path, monkeypatch, caplog, secret_from):
    trusted, _ = pki
    pw = passwd_file(tmp_path)
    if secret_from == "password_file":
        (tmp_path / "mqtt-password").write_text(PASSWORD + "\n")
        (tmp_path / "mqtt-password").chmod(0o600)
        secret = {"password_file": str(tmp_path / "mqtt-password")}
    else:
        monkeypatch.setenv("LINECAM_TEST_MQTT_PASSWORD", PASSWORD)
        secret = {"password_env": "LINECAM_TEST_MQTT_PASSWORD"}
    caplog.set_level(logging.DEBUG)  # everything, paho's packet log included
    with tls_broker(trusted, f"password_file {pw}") as broker:
        cfg = parse_config(daemon_cfg(tmp_path, broker.port, {"ca_file": str(trusted / "ca.pem"),
                                                              "username": "cam1", **secret}), tmp_path / "x.yaml")
        with subscribe("127.0.0.1", broker.port, prefix="linecam/t/c0", types=("verdict", "status"),
                       tls=True, ca_file=trusted / "ca.pem", username="cam1", password=PASSWORD) as sub:
            summary = run_service(cfg)
            events = drain(sub)
    verdicts = [e.payload for e in events if e.type == "verdict"]
    for v in verdicts:
        schemas.validate(v)
    assert sorted(v["frame_id"] for v in verdicts) == list(range(30)) and summary.counters["frames"] == 30
    assert any(e.type == "status" and e.payload["state"] == "running" for e in events)
    text = "\n".join(f"{r.name} {r.getMessage()}" for r in caplog.records)
    assert "Sending CONNECT (u1, p1" in text  # the log did see the connect ...
    assert PASSWORD not in text and "pa55" not in text  # ... but never the secret
    assert PASSWORD not in repr(cfg) + cfg.model_dump_json()


@pytest.mark.timeout(60)
def test_tls_client_certificate_through_the_cli(pki, tmp_path):
    trusted, _ = pki
    with tls_broker(trusted, "require_certificate true", "use_identity_as_username true") as broker:
        cfg = daemon_cfg(tmp_path, broker.port, {"ca_file": str(trusted / "ca.pem"),
                                                 "cert_file": str(trusted / "cam1.pem"),
                                                 "key_file": str(trusted / "cam1.key")})
        path = tmp_path / "line.yaml"
        path.write_text(yaml.safe_dump(cfg))
        with subscribe("127.0.0.1", broker.port, prefix="linecam/t/c0", types=("verdict",), tls=True,
                       ca_file=trusted / "ca.pem", cert_file=trusted / "cam1.pem",
                       key_file=trusted / "cam1.key") as sub:
            proc = subprocess.run([sys.executable, "-m", "linecam", "run", "--config", str(path), "--log-level",
                                   "DEBUG"], capture_output=True, text=True, timeout=60, cwd=REPO)
            events = drain(sub)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(e.payload["frame_id"] for e in events) == list(range(30))
    key_body = (trusted / "cam1.key").read_text().splitlines()[1]
    assert key_body not in proc.stderr and "PRIVATE KEY" not in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case, needle", [
    ("untrusted_broker", "certificate not trusted"),
    ("foreign_client_cert", "client certificate refused"),
    ("no_client_cert", "client certificate refused"),
])
def test_tls_trust_failures_are_one_line_exit_5(pki, tmp_path, case, needle):
    trusted, foreign = pki
    mqtt = {"ca_file": str((foreign if case == "untrusted_broker" else trusted) / "ca.pem")}
    if case != "no_client_cert":
        client = foreign if case == "foreign_client_cert" else trusted
        mqtt.update(cert_file=str(client / "cam1.pem"), key_file=str(client / "cam1.key"))
    with tls_broker(trusted, "require_certificate true", "use_identity_as_username true") as broker:
        path = tmp_path / "line.yaml"
        cfg = daemon_cfg(tmp_path, broker.port, mqtt, frames=10_000)
        path.write_text(yaml.safe_dump(cfg))
        proc = subprocess.run([sys.executable, "-m", "linecam", "run", "--config", str(path)], capture_output=True,
                              text=True, timeout=60, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 5, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and needle in errors[0] and "Traceback" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.timeout(60)
def test_topic_prefix_per_line_lets_broker_acls_confine_each_daemon(pki, tmp_path, caplog):
    """cam1 may write under linecam/l1/ only: its own line's verdicts pass; a daemon configured
    for another line is refused by the broker (PUBACK 'Not authorized'), counted, and its
    spool does not re-send refused messages forever."""
    trusted, _ = pki
    pw = passwd_file(tmp_path)
    acl = tmp_path / "acl"
    acl.write_text("user cam1\ntopic write linecam/l1/#\ntopic read linecam/#\n")
    (tmp_path / "mqtt-password").write_text(PASSWORD)
    secret = {"ca_file": str(trusted / "ca.pem"), "username": "cam1", "password_file": str(tmp_path / "mqtt-password")}
    with tls_broker(trusted, f"password_file {pw}", f"acl_file {acl}") as broker:
        with subscribe("127.0.0.1", broker.port, prefix="linecam/+/c0", types=("verdict",), tls=True,
                       ca_file=trusted / "ca.pem", username="cam1", password=PASSWORD) as sub:
            ok = run_service(parse_config(daemon_cfg(tmp_path, broker.port, secret, 20, "l1"), tmp_path / "x.yaml"))
            refused = run_service(parse_config(daemon_cfg(tmp_path, broker.port, secret, 20, "l2"), tmp_path / "x.yaml"))
            events = drain(sub)
    lines = {e.payload["line"] for e in events}
    assert lines == {"l1"} and len(events) == 20
    assert ok.counters["frames"] == refused.counters["frames"] == 20
    assert any("rejected a message (Not authorized)" in r.getMessage() for r in caplog.records)
    import sqlite3

    for line in ("l1", "l2"):  # nothing left to re-send: refused messages are not retried forever
        db = sqlite3.connect(tmp_path / f"spool-{line}.db")
        assert db.execute("SELECT COUNT(*) FROM spool").fetchone()[0] == 0
        db.close()
