"""``fedround certs init``: a CA and a server certificate that a real TLS handshake accepts."""

from __future__ import annotations

import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest

from fedround.tasks.certificates import certificate_hosts, make_certificates
from fedround.tasks.core.errors import ConfigError


def _handshake(server_cert: Path, server_key: Path, ca_cert: Path | None, host: str) -> str:
    """Serve one TLS connection on 127.0.0.1 and connect to it checking ``host``."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(server_cert, server_key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"ok")
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client_ctx = ssl.create_default_context(cafile=str(ca_cert) if ca_cert else None)
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            client_ctx.wrap_socket(raw, server_hostname=host) as tls,
        ):
            return tls.recv(2).decode()
    finally:
        thread.join(10)
        listener.close()


def test_a_client_trusting_the_ca_completes_the_handshake(tmp_path: Path) -> None:
    files = make_certificates(tmp_path / "tls", ["coordinator.example.org", "127.0.0.1"])
    assert _handshake(files.cert, files.key, files.ca_cert, "127.0.0.1") == "ok"
    assert certificate_hosts(files.cert) == ["coordinator.example.org", "127.0.0.1"]
    for key in (files.key, files.ca_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_a_client_without_the_ca_or_for_another_host_is_refused(tmp_path: Path) -> None:
    files = make_certificates(tmp_path, ["127.0.0.1"])
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(files.cert, files.key, None, "127.0.0.1")
    with pytest.raises(ssl.SSLCertVerificationError, match=r"mismatch|not valid"):
        _handshake(files.cert, files.key, files.ca_cert, "localhost")


def test_renew_keeps_the_ca_and_never_overwrites_by_accident(tmp_path: Path) -> None:
    first = make_certificates(tmp_path, ["a.example.org"])
    ca = first.ca_cert.read_bytes()
    old = first.cert.read_bytes()
    with pytest.raises(ConfigError, match="--renew"):
        make_certificates(tmp_path, ["b.example.org"])
    assert first.cert.read_bytes() == old
    second = make_certificates(tmp_path, ["127.0.0.1"], renew=True)
    assert second.ca_cert.read_bytes() == ca
    assert _handshake(second.cert, second.key, second.ca_cert, "127.0.0.1") == "ok"


@pytest.mark.parametrize(
    ("hosts", "days", "message"),
    [
        ([], 30, "at least one --host"),
        (["bad host"], 30, "neither a host name"),
        (["a..b"], 30, "neither a host name"),
        (["ok.example.org"], 0, "between 1 and 397"),
        (["ok.example.org"], 800, "between 1 and 397"),
    ],
)
def test_bad_input_is_refused_with_the_reason(
    tmp_path: Path, hosts: list[str], days: int, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        make_certificates(tmp_path, hosts, days)
    assert not (tmp_path / "server.crt").exists()


def test_a_half_present_ca_is_refused(tmp_path: Path) -> None:
    files = make_certificates(tmp_path, ["127.0.0.1"])
    files.ca_key.unlink()
    with pytest.raises(ConfigError, match=r"only one of ca\.crt and ca\.key"):
        make_certificates(tmp_path, ["127.0.0.1"], renew=True)
