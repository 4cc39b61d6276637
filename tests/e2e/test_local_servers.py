"""`fedround run` keeps a local Prefect server (with its UI) and MLflow UI up between runs.

The first run starts both in the background; the next reuses them; the printed URLs open
the run in both UIs; a stale record, a server that died, or a foreign program on the
preferred port are reported in one line and handled; `fedround down` stops them at once,
and an idle period stops them on its own.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from fedround.flows.services.local_ui import PREFERRED, LocalServers
from tests.browser import chromium, screenshot, wait_for
from tests.e2e.helpers import FEDROUND, cli_env, write_array_federation

pytestmark = pytest.mark.slow

CONTRACT = {
    "name": "arrays",
    "expectations": [
        {
            "type": "expect_column_values_to_be_in_set",
            "kwargs": {"column": "label", "value_set": [0, 1]},
        }
    ],
}
CONFIG = """federation: local-ui
tenant: acme
seed: 1
rounds: 2
data: {kind: arrays, source: sites}
model: {factory: logistic_regression, in_features: 8, out_features: 2}
training: {local_epochs: 1, batch_size: 16, learning_rate: 0.1}
evaluation: {holdout: holdout.npz, federated: {final: false}}
selection: {min_sites: 2, deadline_s: 300}
contract: contract.json
sites:
  - {name: a, config: ../sites/a/site.yaml}
  - {name: b, config: ../sites/b/site.yaml}
"""


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("local-ui")
    write_array_federation(
        root, "local-ui", {"a": 60, "b": 60}, "unused", {}, CONTRACT, {"federation.yaml": CONFIG}
    )
    yield root
    LocalServers(root / "state").stop()  # whatever a failed assertion left running


def _run(root: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    env = cli_env(root / "state") | {"FEDROUND_LOCAL_SERVER": "1", **extra}
    return subprocess.run(
        [FEDROUND, "run", str(root / "fed" / "federation.yaml")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def _get(url: str) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Accept": "text/html"})  # as a browser asks
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, response.read()


def _urls(stdout: str) -> tuple[str, str]:
    prefect = re.search(r"Prefect UI\s+(http://\S+/runs/flow-run/(\S+))", stdout)
    mlflow = re.search(r"MLflow UI\s+(http://\S+)/#/experiments/\d+/runs/\w+", stdout)
    assert prefect and mlflow, stdout
    return prefect.group(1), mlflow.group(1)


def test_first_run_starts_the_servers_and_links_the_run_in_both_uis(root: Path) -> None:
    blocker = None
    if _free(PREFERRED["prefect"]):  # a foreign program on the preferred Prefect port
        blocker = socket.socket()
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        blocker.bind(("127.0.0.1", PREFERRED["prefect"]))
        blocker.listen()
    try:
        done = _run(root)
    finally:
        if blocker is not None:
            blocker.close()
    assert done.returncode == 0, done.stderr[-3000:]
    assert "starting the local prefect and mlflow server(s) in the background" in done.stderr
    assert f"port {PREFERRED['prefect']} is taken by a program that is not" in done.stderr
    prefect_url, mlflow_ui = _urls(done.stdout)
    assert f":{PREFERRED['prefect']}/" not in prefect_url
    flow_run_id = prefect_url.rsplit("/", 1)[1]
    api = prefect_url.split("/runs/")[0] + "/api"
    request = urllib.request.Request(f"{api}/flow_runs/{flow_run_id}")
    with urllib.request.urlopen(request, timeout=10) as response:
        flow_run = json.loads(response.read())
    assert flow_run["state_type"] == "COMPLETED" and "local-ui · " in flow_run["name"]
    assert _get(prefect_url)[0] == 200  # the UI page itself is served
    assert _get(f"{mlflow_ui}/health")[0] == 200
    assert set(LocalServers(root / "state").running()) == {"prefect", "mlflow"}


def test_second_run_reuses_them(root: Path) -> None:
    promoted = subprocess.run(
        [FEDROUND, "promote", str(root / "fed" / "federation.yaml")],
        env=cli_env(root / "state"),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert promoted.returncode == 0, promoted.stderr[-3000:]  # version 1 → production
    before = LocalServers(root / "state").running()
    done = _run(root)  # version 2 → candidate
    assert done.returncode == 0, done.stderr[-3000:]
    assert "starting the local" not in done.stderr
    assert LocalServers(root / "state").running() == before
    assert _urls(done.stdout)[0].split("/runs/")[0].endswith(f":{before['prefect']}")


def _prefect_api(root: Path) -> str:
    return f"http://127.0.0.1:{LocalServers(root / 'state').running()['prefect']}/api"


def _artifacts(root: Path) -> tuple[str, list[dict[str, Any]]]:
    """The first run's flow run id and its artifacts, from the Prefect API."""
    api = _prefect_api(root)
    runs = _post(f"{api}/flow_runs/filter", {"sort": "START_TIME_ASC", "limit": 1})
    flow_run = runs[0]["id"]
    found = _post(f"{api}/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run]}}})
    return flow_run, found


def _post(url: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_prefect_ui_shows_the_round_tables_and_the_run_summary(root: Path, tmp_path: Path) -> None:
    flow_run, artifacts = _artifacts(root)
    ui = _prefect_api(root).removesuffix("/api")
    summary = next(a for a in artifacts if a["type"] == "markdown")
    table = next(a for a in artifacts if a["type"] == "table" and "round 1" in a["description"])
    with chromium(tmp_path / "profile") as page:
        page.get(f"{ui}/runs/flow-run/{flow_run}")
        wait_for(page, lambda p: p.find_element("css selector", "li.p-tab#artifacts")).click()
        cards = wait_for(
            page, lambda p: "round 2: 2 trained" in p.find_element("tag name", "body").text
        )
        assert cards
        assert "local-ui-run-summary" in page.find_element("tag name", "body").text
        screenshot(page, "prefect-flow-run-artifacts")
        page.get(f"{ui}/artifacts/artifact/{table['id']}")
        wait_for(page, lambda p: "trained" in p.find_element("tag name", "body").text)
        text = page.find_element("tag name", "body").text
        for column in ("site", "status", "examples", "bytes up", "train_loss"):
            assert column in text, text
        screenshot(page, "prefect-round-table")
        page.get(f"{ui}/artifacts/artifact/{summary['id']}")
        wait_for(page, lambda p: "Final metrics" in p.find_element("tag name", "body").text)
        assert "2 took part, 0 excluded" in page.find_element("tag name", "body").text
        chart = wait_for(
            page,
            lambda p: [
                i
                for i in p.find_elements("css selector", "img[src^='data:image/png']")
                if p.execute_script("return arguments[0].naturalWidth", i) > 100
            ],
        )
        assert chart  # the chart decoded and rendered, not a broken image
        screenshot(page, "prefect-run-summary")


def test_mlflow_ui_shows_the_candidate_and_production_aliases(root: Path, tmp_path: Path) -> None:
    mlflow = f"http://127.0.0.1:{LocalServers(root / 'state').running()['mlflow']}"
    with chromium(tmp_path / "profile") as page:
        page.get(f"{mlflow}/#/models/local-ui-global")

        def both_aliases(p: Any) -> str | None:
            body = str(p.find_element("tag name", "body").text)
            return body if "@ candidate" in body and "@ production" in body else None

        text = wait_for(page, both_aliases)
        assert "Version 2" in text and "Version 1" in text
        screenshot(page, "mlflow-registered-model")


def test_report_renders_its_plots_in_the_browser(root: Path, tmp_path: Path) -> None:
    _, artifacts = _artifacts(root)
    run_id = artifacts[0]["description"].split(" run ")[1].split(" ")[0].rstrip(":")
    out = tmp_path / "report.html"
    done = subprocess.run(
        [FEDROUND, "report", run_id, "--out", str(out)],
        env=cli_env(root / "state"),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with chromium(tmp_path / "profile") as page:
        page.get(out.as_uri())
        wait_for(page, lambda p: run_id in p.find_element("tag name", "body").text)
        sizes = page.execute_script(
            "return [...document.querySelectorAll('svg, img')].map(e => {"
            " const r = e.getBoundingClientRect(); return [e.tagName, r.width, r.height]; })"
        )
        drawn = [s for s in sizes if s[1] > 200 and s[2] > 100]
        assert len(drawn) >= 3, sizes  # metric per round, participation heatmap, time and bytes
        screenshot(page, "report")


def test_a_dead_server_is_reported_and_started_again(root: Path) -> None:
    servers = LocalServers(root / "state")
    record = json.loads((servers.run_dir / "mlflow.json").read_text())
    os.killpg(record["pid"], signal.SIGKILL)
    psutil.wait_procs([psutil.Process(record["pid"])], timeout=10)
    done = _run(root)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "is gone (stale record): starting a new one" in done.stderr
    assert "starting the local mlflow server(s)" in done.stderr
    assert set(servers.running()) == {"prefect", "mlflow"}


def test_down_stops_them_at_once(root: Path) -> None:
    servers = LocalServers(root / "state")
    pids = [
        json.loads((servers.run_dir / f"{n}.json").read_text())["pid"] for n in servers.running()
    ]
    done = subprocess.run(
        [FEDROUND, "down"], env=cli_env(root / "state"), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "local prefect server" in done.stdout and "local mlflow server" in done.stdout
    assert servers.running() == {}
    assert not any(
        psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie" for pid in pids
    )


def test_idle_servers_stop_by_themselves(root: Path) -> None:
    done = _run(root, FEDROUND_LOCAL_IDLE_S="5")
    assert done.returncode == 0, done.stderr[-3000:]
    servers = LocalServers(root / "state")
    deadline = time.monotonic() + 90
    while servers.running() and time.monotonic() < deadline:
        time.sleep(1)
    assert servers.running() == {}
    assert "idle for" in (servers.logs / "watcher.log").read_text()


def _free(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0
