"""Alerts end to end on a real Prefect server (Postgres): the automations ``fedround deploy``
creates, the events a run emits, and the server's own triggers and actions services
posting to a webhook (a local HTTP receiver). Reactive conditions (dropout, plateau,
failed run, failed promotion gate) and the proactive stall: a run that starts and never
commits a round is reported; one that finishes is not."""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from fedround.tasks import alerts
from fedround.tasks.core import alerts as decide
from fedround.tasks.core.config import (
    FederationConfig,
    load_federation_config,
    parse_federation_config,
)
from tests.services import Endpoints

from .helpers import FEDROUND, cli_env, run_in_session

pytestmark = pytest.mark.slow

CONTRACT = Path(__file__).parents[2] / "deployments/examples/contracts/mnist-site-data.json"
WAIT_S = 90.0  # the server evaluates proactive triggers every 5 s; a stall window is 10 s


class Receiver:
    """A webhook on 127.0.0.1 that keeps every JSON body posted to it."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        received = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with received.lock:
                    received.messages.append(json.loads(body or b"{}"))
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def matching(self, *parts: str) -> list[dict[str, Any]]:
        with self.lock:
            return [
                m
                for m in self.messages
                if all(p in f"{m.get('subject')} {m.get('body')}" for p in parts)
            ]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    hook = Receiver()
    try:
        yield hook
    finally:
        hook.close()


@pytest.fixture
def prefect_api(prefect_service: Endpoints, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """This process talks to the fixture's server, from every thread: API calls and the
    events Prefect's events worker sends in the background."""
    from prefect.context import refresh_global_settings_context
    from prefect.events.clients import PrefectEventsClient
    from prefect.events.worker import EventsWorker

    url = prefect_service.prefect_api_url
    monkeypatch.setenv("PREFECT_API_URL", url)
    refresh_global_settings_context()
    EventsWorker.set_client_override(PrefectEventsClient, api_url=url)
    try:
        yield url
    finally:
        EventsWorker.instance().drain()
        EventsWorker.set_client_override(None)
        monkeypatch.undo()
        refresh_global_settings_context()


def flush_events() -> None:
    from prefect.events.worker import EventsWorker

    EventsWorker.instance().drain()  # sent; the next event starts a new worker


def config_for(webhook: str) -> FederationConfig:
    federation = f"alerts-{secrets.token_hex(3)}"
    return parse_federation_config(
        f"federation: {federation}\ntenant: e2e\ncontract: c.json\n"
        "sites: [{name: a}, {name: b}, {name: c}, {name: d}]\n"
        "selection: {deadline_s: 5}\n"
        f"alerts: {{webhook: '{webhook}', stall_after_s: 10, patience_rounds: 2}}\n"
    )


def wait_for(done: Callable[[], bool], again: Callable[[], None], every_s: float = 5.0) -> float:
    """Call ``again`` now and every ``every_s`` until ``done``; the seconds it took."""
    started = time.monotonic()
    last = -every_s
    while not done():
        elapsed = time.monotonic() - started
        assert elapsed < WAIT_S, "no alert arrived in time"
        if elapsed - last >= every_s:
            again()
            flush_events()
            last = elapsed
        time.sleep(0.25)
    return time.monotonic() - started


def test_automations_are_created_idempotently(prefect_api: str, receiver: Receiver) -> None:
    from prefect.client.orchestration import get_client

    config = config_for(receiver.url)
    first = alerts.ensure_automations(config)
    again = alerts.ensure_automations(config)
    assert first == again == [f"fedround {config.federation}: {c}" for c in decide.CONDITIONS]
    with get_client(sync_client=True) as client:
        assert str(client.api_url).rstrip("/") == prefect_api  # the fixture's server
        for name in first:
            found = client.read_automations_by_name(name)
            assert len(found) == 1, name
            assert found[0].actions[0].type == "send-notification"
        stall = client.read_automations_by_name(first[-1])[0].trigger
        assert stall.posture == "Proactive" and stall.for_each == {"prefect.resource.id"}
    off = config.model_copy(update={"alerts": config.alerts.model_copy(update={"enabled": False})})
    assert alerts.ensure_automations(off) == []
    with get_client(sync_client=True) as client:
        assert all(client.read_automations_by_name(name) == [] for name in first)


def test_reactive_and_stall_alerts_reach_the_webhook(prefect_api: str, receiver: Receiver) -> None:
    config = config_for(receiver.url)
    federation = config.federation
    alerts.ensure_automations(config)
    bad, stuck, fine = (f"run-{name}-{secrets.token_hex(2)}" for name in ("bad", "stuck", "fine"))

    # Reactive: one round's dropout and plateau, a failed run, a failed promotion gate.
    def reactive() -> None:
        alerts.round_committed(config, bad, 3, 0.8, 4, 1, [0.9, 0.85, 0.8])
        alerts.run_finished(config, bad, ok=False, reason="QuorumNotReached: round 4")
        alerts.promotion_gate_failed(config, f"{federation}-global", "7", ["quorum: 1 of 4"])

    run = f"fedround.run.{federation}.{bad}"
    expected = {
        "dropout": (f"{federation}: dropout", run, "3 of 4 selected sites did not contribute"),
        "plateau": (f"{federation}: plateau", run, "accuracy: no improvement for 2 rounds"),
        "failed": (f"{federation}: failed", run, "QuorumNotReached: round 4"),
        "gate-failed": (
            f"{federation}: gate-failed",
            f"fedround.model.{federation}-global.7",
            "quorum: 1 of 4",
        ),
    }
    reactive_s = wait_for(lambda: all(receiver.matching(*p) for p in expected.values()), reactive)
    message = receiver.matching(*expected["dropout"])[0]
    assert message["federation"] == federation and message["tenant"] == "e2e"
    assert message["body"] == f"round 3 of {run}: 3 of 4 selected sites did not contribute " + (
        "(75% > 50%)"
    )

    # Proactive: `stuck` starts and never commits; `fine` starts and finishes at once.
    alerts.run_started(config, fine)
    flush_events()
    time.sleep(1)
    alerts.run_finished(config, fine, ok=True, reason=None)
    stall = (f"{federation}: stall", f"fedround.run.{federation}.{stuck}", "stalled")
    stall_s = wait_for(
        lambda: bool(receiver.matching(*stall)), lambda: alerts.run_started(config, stuck)
    )
    body = receiver.matching(*stall)[0]["body"]
    assert "no round committed within 10 s after fedround.run.started" in body
    time.sleep(6)  # past the next proactive evaluation: the finished run stays quiet
    assert receiver.matching("stall", fine) == []
    assert len(receiver.matching(*stall)) == 1  # one alert per stall, not one per evaluation
    print(f"reactive alerts after {reactive_s:.1f} s, the stall alert after {stall_s:.1f} s")


def test_a_training_run_emits_its_events(
    prefect_api: str, receiver: Receiver, tmp_path: Path
) -> None:
    """The real CLI trains a small federation against the fixture's server: the flow emits
    run.started, one round.committed per round and run.finished, on the run's resource."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventResourceFilter

    from fedround.site_workers.demo_sites import provision_demo_sites
    from fedround.tasks.runtime import CoordinatorSettings

    federation = f"alerts-run-{secrets.token_hex(2)}"
    config_path = tmp_path / "federation.yaml"
    config_path.write_text(
        f"federation: {federation}\ntenant: e2e\nseed: 7\nrounds: 2\n"
        "data: {source: mnist, train_size: 400, test_size: 100, "
        "partition: {kind: iid, min_examples_per_site: 50}}\n"
        "selection: {min_sites: 2, deadline_s: 120}\n"
        f"contract: {CONTRACT}\n"
        "sites: [{name: site-a}, {name: site-b}]\n"
        f"alerts: {{webhook: '{receiver.url}', stall_after_s: 300}}\n"
    )
    state_dir = tmp_path / "state"
    env = {**cli_env(state_dir), "PREFECT_API_URL": prefect_api}
    os.environ["FEDROUND_STATE_DIR"] = str(state_dir)
    try:
        config = load_federation_config(config_path)
        provision_demo_sites(config, CoordinatorSettings.from_env())
    finally:
        del os.environ["FEDROUND_STATE_DIR"]
    alerts.ensure_automations(config)
    started = time.monotonic()
    done = run_in_session([FEDROUND, "run", str(config_path), "--json"], env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run_s = time.monotonic() - started
    run_id = done.result["run_id"]
    resource = f"fedround.run.{federation}.{run_id}"
    wanted = [
        "fedround.run.started",
        "fedround.round.committed",
        "fedround.round.committed",
        "fedround.run.finished",
    ]
    deadline = time.monotonic() + 60  # the server persists events in batches
    with get_client(sync_client=True) as client:
        while True:
            page = client.read_events(
                EventFilter(resource=EventResourceFilter(id=[resource])), limit=50
            )
            seen = sorted(page.events, key=lambda e: e.occurred)
            if [e.event for e in seen] == wanted or time.monotonic() > deadline:
                break
            time.sleep(1)
    assert [e.event for e in seen] == wanted
    committed = [e.payload for e in seen if e.event == "fedround.round.committed"]
    assert [(p["round"], p["sites_selected"], p["sites_accepted"]) for p in committed] == [
        (1, 2, 2),
        (2, 2, 2),
    ]
    assert all(p["metric"] == "accuracy" and 0 <= p["value"] <= 1 for p in committed)
    assert seen[-1].payload["ok"] is True
    assert seen[0].resource["fedround.tenant"] == "e2e"
    # The run ran inside its Prefect flow run: Prefect relates the events to it.
    assert any(r.role == "flow-run" for r in seen[0].related)
    assert receiver.matching(federation) == []  # a healthy run raises no alert
    print(f"training run {run_s:.1f} s, its events stored {time.monotonic() - started:.1f} s")
