"""fedround's S3 client over TLS (``FEDROUND_S3_SECURE=true`` / ``object_store.secure``),
against the project's real S3 server serving the certificate of ``fedround certs init``."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedround.flows.services.s3 import GRPC_OFFSET, weed_binary
from fedround.tasks.certificates import TLSFiles, make_certificates
from fedround.tasks.core.errors import ObjectStoreError
from fedround.tasks.object_store import ObjectStore, ObjectStoreSettings, open_store

pytestmark = pytest.mark.security("control-plane-auth-tls")

ACCESS = "tls-admin"
SECRET = secrets.token_urlsafe(24)


def _free_ports(count: int) -> list[int]:
    """Ports that are free, each with its gRPC twin (+10000) free too."""
    found: list[int] = []
    while len(found) < count:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port + GRPC_OFFSET > 65535 or port in found:
            continue
        with socket.socket() as twin:
            try:
                twin.bind(("127.0.0.1", port + GRPC_OFFSET))
            except OSError:
                continue
        found.append(port)
    return found


@pytest.fixture(scope="module")
def tls_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, TLSFiles]]:
    root = tmp_path_factory.mktemp("tls-s3")
    tls = make_certificates(root / "tls", ["127.0.0.1"])
    identities = root / "identities.json"
    identities.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "admin",
                        "credentials": [{"accessKey": ACCESS, "secretKey": SECRET}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    s3, master, volume, filer, admin = _free_ports(5)
    (root / "data").mkdir()
    command = [
        str(weed_binary()), "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1", f"-s3.config={identities}", "-webdav=false", "-admin.ui=false",
        "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
        f"-s3.cert.file={tls.cert}", f"-s3.key.file={tls.key}",
    ]  # fmt: skip
    for name, port in {"s3": s3, "master": master, "volume": volume, "filer": filer,
                       "admin": admin}.items():  # fmt: skip
        command += [f"-{name}.port={port}", f"-{name}.port.grpc={port + GRPC_OFFSET}"]
    log = (root / "weed.log").open("wb")
    server = subprocess.Popen(
        command, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    endpoint = f"127.0.0.1:{s3}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                _store(endpoint, secure=True, ca=tls.ca_cert).put("probe", b"up")
                break
            except ObjectStoreError:
                assert server.poll() is None, (root / "weed.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "the S3 server never answered over TLS"
                time.sleep(0.5)
        yield endpoint, tls
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()


def _store(endpoint: str, *, secure: bool, ca: Path | None) -> ObjectStore:
    """fedround's S3 store; the MinIO SDK reads ``SSL_CERT_FILE`` when the client is made."""
    settings = ObjectStoreSettings(
        kind="s3",
        endpoint=endpoint,
        bucket="fedround",
        secure=secure,
        region="us-east-1",
        access_key=ACCESS,
        secret_key=SECRET,  # type: ignore[arg-type]
    )
    before = os.environ.pop("SSL_CERT_FILE", None)
    try:
        if ca is not None:
            os.environ["SSL_CERT_FILE"] = str(ca)
        return open_store(settings)
    finally:
        os.environ.pop("SSL_CERT_FILE", None)
        if before is not None:
            os.environ["SSL_CERT_FILE"] = before


def test_a_client_trusting_the_ca_reads_and_writes_over_tls(tls_s3: tuple[str, TLSFiles]) -> None:
    endpoint, tls = tls_s3
    store = _store(endpoint, secure=True, ca=tls.ca_cert)
    store.put("fed/global/run/model.bin", b"weights")
    assert store.get("fed/global/run/model.bin") == b"weights"


def test_a_client_without_the_ca_or_in_clear_gets_nothing(tls_s3: tuple[str, TLSFiles]) -> None:
    endpoint, _ = tls_s3
    with pytest.raises(ObjectStoreError, match="CERTIFICATE_VERIFY_FAILED"):
        _store(endpoint, secure=True, ca=None).get("probe")
    with pytest.raises(ObjectStoreError):
        _store(endpoint, secure=False, ca=None).get("probe")
