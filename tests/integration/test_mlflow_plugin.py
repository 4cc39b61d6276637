"""The fedround MLflow plugin, loaded by MLflow's own entry-point discovery in a fresh
process: runs started inside a federation context get its tags, without the code that
starts them passing anything; a broken context only warns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from mlflow import MlflowClient

from tests.services import Endpoints


def start_run_in_fresh_process(
    services: Endpoints, code: str, env: dict[str, str] | None = None
) -> tuple[dict[str, str], str]:
    """Run ``code`` (which must start one MLflow run) in a new interpreter; its run's tags."""
    script = textwrap.dedent(code) + textwrap.dedent(
        """
        import json, mlflow
        print("RESULT " + json.dumps({"run_id": run.info.run_id}), flush=True)
        """
    )
    environment = {
        k: v for k, v in os.environ.items() if not k.startswith(("FEDROUND_", "PREFECT__"))
    }
    environment.update(services.env())
    environment.update(env or {})
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run_id = json.loads(done.stdout.split("RESULT ", 1)[1].splitlines()[0])["run_id"]
    client = MlflowClient(tracking_uri=services.mlflow_tracking_uri)
    return dict(client.get_run(run_id).data.tags), done.stderr


def test_plugin_is_registered_through_the_entry_point() -> None:
    from importlib.metadata import entry_points

    found = entry_points(group="mlflow.run_context_provider")
    assert [e.value for e in found if e.name == "fedround"] == [
        "fedround.mlflow_plugins.run_context:FederationRunContext"
    ]


def test_user_code_in_a_federation_context_is_tagged(local_services: Endpoints) -> None:
    """Coordinator side: a context manager, and a Prefect flow run around the user's code."""
    tags, _ = start_run_in_fresh_process(
        local_services,
        """
        import mlflow
        from prefect import flow
        from fedround.tasks.run_context import federation_context

        @flow(name="plugin-probe")
        def probe():
            with federation_context(federation="fed-x", tenant="acme", run_id="r-42",
                                    config_revision="git:abc123 dvc:0f0f"):
                with mlflow.start_run() as started:   # user code: passes no tags
                    return started

        run = probe()
        """,
    )
    assert tags["fedround.federation"] == "fed-x"
    assert tags["fedround.tenant"] == "acme"
    assert tags["fedround.run_id"] == "r-42"
    assert tags["fedround.config_revision"] == "git:abc123 dvc:0f0f"
    assert len(tags["fedround.prefect_flow_run_id"]) == 36  # a UUID from prefect.runtime


def test_site_process_gets_round_and_site_from_the_coordinator(mlflow_service: Endpoints) -> None:
    """Site side: the context arrives with the round spec; environment variables carry it
    on into processes the site's code starts."""
    tags, _ = start_run_in_fresh_process(
        mlflow_service,
        """
        import subprocess, sys, json
        from fedround.tasks import run_context

        run_context.adopt({"federation": "fed-x", "tenant": "acme", "run_id": "r-42",
                           "round": 7, "site": "site-03"})
        child = subprocess.run(
            [sys.executable, "-c",
             "import mlflow; r = mlflow.start_run(); print('RUN', r.info.run_id, flush=True)"],
            capture_output=True, text=True, check=True)
        class run:  # the child's run
            class info:
                run_id = child.stdout.split("RUN ", 1)[1].split()[0]
        """,
    )
    assert {k: v for k, v in tags.items() if k.startswith("fedround.")} == {
        "fedround.federation": "fed-x",
        "fedround.tenant": "acme",
        "fedround.run_id": "r-42",
        "fedround.round": "7",
        "fedround.site": "site-03",
    }


def test_broken_context_warns_and_the_run_goes_on(mlflow_service: Endpoints) -> None:
    tags, stderr = start_run_in_fresh_process(
        mlflow_service,
        """
        import mlflow
        run = mlflow.start_run(tags={"mine": "kept"})
        mlflow.end_run()
        """,
        env={"FEDROUND_FEDERATION": "fed-x", "FEDROUND_ROUND": "seven", "FEDROUND_SITE": "a b!"},
    )
    assert tags["mine"] == "kept"
    assert tags["fedround.federation"] == "fed-x"
    assert "fedround.round" not in tags and "fedround.site" not in tags
    assert "FederationContextWarning" in stderr
    assert "round must be a whole number, got 'seven'" in stderr


def test_outside_a_federation_nothing_is_added(mlflow_service: Endpoints) -> None:
    tags, _ = start_run_in_fresh_process(
        mlflow_service, "import mlflow\nrun = mlflow.start_run()\nmlflow.end_run()\n"
    )
    assert not [k for k in tags if k.startswith("fedround.")]
