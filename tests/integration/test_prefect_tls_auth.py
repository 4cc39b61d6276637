"""Prefect behind authentication and TLS, as the production manifests run it, with a real
site worker under the production profile.

The server is the one the manifests start: Prefect's API app under uvicorn with the
certificate from ``fedround certs init`` and ``PREFECT_SERVER_API_AUTH_STRING``.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedround.flows.entrypoints import TRAINING_ENTRYPOINT
from fedround.site_workers.settings import SiteSettings, write_site_settings
from fedround.tasks.certificates import TLSFiles, make_certificates
from fedround.tasks.object_store import ObjectStoreSettings

pytestmark = pytest.mark.security("control-plane-auth-tls", "control-plane-code")

BIN = Path(sys.executable).parent
QUIET = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_UI_ENABLED": "false",
}


@dataclass(frozen=True)
class TLSPrefect:
    api_url: str
    auth: str
    tls: TLSFiles

    def client_env(self, *, ca: bool = True, auth: str | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env |= QUIET | {"PREFECT_API_URL": self.api_url}
        env["PREFECT_API_AUTH_STRING"] = self.auth if auth is None else auth
        if ca:
            env["PREFECT_API_SSL_CERT_FILE"] = str(self.tls.ca_cert)
        return env

    def request(self, path: str, body: object, auth: str | None) -> tuple[int, Any]:
        """POST ``body`` (GET for ``None``) to the API over TLS, trusting the CA, with basic
        auth when given."""
        request = urllib.request.Request(
            f"{self.api_url}{path}",
            data=None if body is None else json.dumps(body).encode(),
            headers={"content-type": "application/json"},
        )
        if auth is not None:
            request.add_header("authorization", "Basic " + base64.b64encode(auth.encode()).decode())
        context = ssl.create_default_context(cafile=str(self.tls.ca_cert))
        try:
            with urllib.request.urlopen(request, context=context, timeout=10) as answer:
                return answer.status, json.loads(answer.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, None
        except urllib.error.URLError:
            return 0, None  # not listening (yet)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def tls_prefect(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSPrefect]:
    root = tmp_path_factory.mktemp("tls-prefect")
    tls = make_certificates(root / "tls", ["127.0.0.1"])
    auth = f"fedround:{secrets.token_urlsafe(18)}"
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= QUIET | {"PREFECT_HOME": str(root / "home"), "PREFECT_SERVER_API_AUTH_STRING": auth}
    log = (root / "server.log").open("wb")
    server = subprocess.Popen(
        [
            str(BIN / "python"),
            "-m",
            "uvicorn",
            "--factory",
            "prefect.server.api.server:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--ssl-certfile",
            str(tls.cert),
            "--ssl-keyfile",
            str(tls.key),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    stack = TLSPrefect(f"https://127.0.0.1:{port}/api", auth, tls)
    try:
        deadline = time.monotonic() + 120
        while stack.request("/work_pools/filter", {}, auth)[0] != 200:
            assert server.poll() is None, (root / "server.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "Prefect over TLS never answered"
            time.sleep(0.5)
        yield stack
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()


def test_the_api_refuses_a_request_without_the_credential(tls_prefect: TLSPrefect) -> None:
    assert tls_prefect.request("/work_pools/filter", {}, None)[0] == 401
    assert tls_prefect.request("/work_pools/filter", {}, "fedround:guessed")[0] == 401
    status, pools = tls_prefect.request("/work_pools/filter", {}, tls_prefect.auth)
    assert status == 200 and isinstance(pools, list)


def _prefect(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "prefect"), *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_the_cli_needs_both_the_ca_and_the_credential(tls_prefect: TLSPrefect) -> None:
    env = tls_prefect.client_env()
    made = _prefect(env, "work-pool", "create", "tls-probe", "--type", "process")
    assert made.returncode == 0, made.stdout + made.stderr
    no_ca = _prefect(tls_prefect.client_env(ca=False), "work-pool", "ls")
    assert no_ca.returncode != 0
    assert "CERTIFICATE_VERIFY_FAILED" in no_ca.stdout + no_ca.stderr
    wrong = _prefect(tls_prefect.client_env(auth="fedround:guessed"), "work-pool", "ls")
    assert wrong.returncode != 0
    assert "401" in wrong.stdout + wrong.stderr or "Unauthorized" in wrong.stdout + wrong.stderr
    status, pools = tls_prefect.request("/work_pools/filter", {}, tls_prefect.auth)
    assert status == 200 and [p["name"] for p in pools] == ["tls-probe"]  # type: ignore[union-attr]


def _site_config(folder: Path, api_url: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "train.npz", x=np.zeros((4, 2), np.float32), y=np.zeros(4, np.int64))
    path = folder / "site.yaml"
    write_site_settings(
        path,
        SiteSettings(
            site="site-a",
            federation="tlsfed",
            data_dir=folder,
            object_store=ObjectStoreSettings(kind="local", root=folder / "objects"),
            prefect_api_url=api_url,
        ),
    )
    return path


def test_a_site_worker_serves_its_pool_through_tls_and_auth(
    tls_prefect: TLSPrefect, tmp_path: Path
) -> None:
    env = tls_prefect.client_env() | {"FEDROUND_PROFILE": "production"}
    plain = _site_config(tmp_path / "plain", tls_prefect.api_url.replace("https", "http"))
    refused = subprocess.run(
        [str(BIN / "fedround"), "site", "start", "--config", str(plain)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode != 0
    assert "production profile" in refused.stderr and "is not https://" in refused.stderr
    assert "Traceback" not in refused.stderr

    config = _site_config(tmp_path / "secure", tls_prefect.api_url)
    worker = subprocess.Popen(
        [str(BIN / "fedround"), "site", "start", "--config", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        pool = "tlsfed-site-a"
        while True:
            status, workers = tls_prefect.request(
                f"/work_pools/{pool}/workers/filter", {}, tls_prefect.auth
            )
            if status == 200 and workers:
                break
            assert worker.poll() is None, "the site worker exited"
            assert time.monotonic() < deadline, f"no worker registered in {pool} ({status})"
            time.sleep(0.5)
        assert [w["name"].split("@")[0] for w in workers] == ["site-a"]  # type: ignore[union-attr]
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=30)


def test_the_coordinator_worker_refuses_code_put_into_its_pool(
    tls_prefect: TLSPrefect, tmp_path: Path
) -> None:
    """Anyone holding the shared Prefect credential (a site, say) puts a deployment into
    the coordinator's pool that names fedround's training flow but adds a pull step that
    runs a shell script, and another that overrides the worker's command: the worker marks
    both runs crashed with the reason, and neither command runs."""
    pool = "tlsfed-coordinator"
    auth = tls_prefect.auth
    assert tls_prefect.request("/work_pools/", {"name": pool, "type": "process"}, auth)[0] == 201
    worker = subprocess.Popen(
        [str(BIN / "python"), "-m", "fedround.flows.coordinator_worker", "--pool", pool],
        env=tls_prefect.client_env() | {"FEDROUND_PROJECT_DIR": str(tmp_path)},
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    shell = tmp_path / "shell-ran"
    command = tmp_path / "command-ran"
    attempts = {
        "pull step": {
            "pull_steps": [
                {"prefect.deployments.steps.run_shell_script": {"script": f"touch {shell}"}}
            ]
        },
        "job variables ['command']": {"job_variables": {"command": f"touch {command}"}},
    }
    try:
        status, flow = tls_prefect.request("/flows/", {"name": "foreign-code"}, auth)
        assert status in (200, 201)
        runs = {}
        for name, extra in attempts.items():
            body = {
                "name": name.replace(" ", "-").strip("[]'"),
                "flow_id": flow["id"],
                "work_pool_name": pool,
                "entrypoint": TRAINING_ENTRYPOINT,
                "parameters": {},
                **extra,
            }
            status, deployment = tls_prefect.request("/deployments/", body, auth)
            assert status in (200, 201), deployment
            status, run = tls_prefect.request(
                f"/deployments/{deployment['id']}/create_flow_run", {}, auth
            )
            assert status in (200, 201), run
            runs[name] = run["id"]
        deadline = time.monotonic() + 120
        states: dict[str, Any] = {}
        while len(states) < len(runs):
            assert worker.poll() is None, "the coordinator's worker exited"
            assert time.monotonic() < deadline, f"runs never settled: {states}"
            for name, run_id in runs.items():
                state = tls_prefect.request(f"/flow_runs/{run_id}", None, auth)[1]["state"]
                if state and state["type"] in ("CRASHED", "COMPLETED", "FAILED"):
                    states[name] = state
            time.sleep(0.5)
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=30)
    for name, state in states.items():
        assert state["type"] == "CRASHED", (name, state)
        assert "refused by the coordinator's worker" in state["message"]
        assert name in state["message"]
    assert not shell.exists() and not command.exists()
