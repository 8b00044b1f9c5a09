"""Why a TLS session with the broker cannot work: a one-line diagnosis from a handshake of our own.

paho does not say why a connection failed; the publisher asks this now and then, so that an
untrusted broker certificate or a refused client certificate is a fatal configuration error
(exit 5), not an endless retry.
"""

from __future__ import annotations

from linecam.config import MqttSettings

#: TLS alerts by which a broker refuses our client certificate.
_CLIENT_CERT_REFUSED = frozenset({
    "TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE", "TLSV13_ALERT_CERTIFICATE_REQUIRED",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED", "SSLV3_ALERT_CERTIFICATE_REVOKED", "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE", "TLSV1_ALERT_ACCESS_DENIED",
})


def tls_problem(s: MqttSettings, timeout: float = 3.0) -> str | None:
    """One line saying why a TLS session with the broker cannot work (it does not present a
    certificate we trust, or it refuses ours), or None (fine, or merely unreachable)."""
    import socket
    import ssl

    try:
        ctx = ssl.create_default_context(cafile=str(s.ca_file) if s.ca_file else None)
        if s.cert_file is not None:
            ctx.load_cert_chain(str(s.cert_file), str(s.key_file) if s.key_file else None)
    except (OSError, ValueError) as e:
        return f"files cannot be loaded ({e}): check mqtt.ca_file / cert_file / key_file"
    try:
        with socket.create_connection((s.host, s.port), timeout=timeout) as raw:
            with ctx.wrap_socket(raw, server_hostname=s.host) as tls:
                tls.settimeout(0.5)
                try:
                    tls.recv(1)  # TLS 1.3: a refused client certificate arrives as an alert here
                except (socket.timeout, TimeoutError):
                    pass
    except ssl.SSLCertVerificationError as e:
        return (f"certificate not trusted ({e.verify_message}): check mqtt.ca_file, and that the broker's "
                f"certificate names {s.host}")
    except ssl.SSLError as e:
        if e.reason in _CLIENT_CERT_REFUSED:
            return (f"client certificate refused by the broker ({e.reason}): check mqtt.cert_file / key_file "
                    "against the CA the broker trusts")
        return None
    except OSError:
        return None
    return None
