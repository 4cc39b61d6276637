"""Which flow runs the coordinator's worker accepts (the rule; the real worker refusing
them against a real Prefect server is in tests/integration/test_prefect_tls_auth.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedround.flows.coordinator_worker import SET_WORKING_DIRECTORY, coordinator_run_problem
from fedround.flows.deploy import render_prefect_yaml
from fedround.flows.entrypoints import TRAINING_ENTRYPOINT

pytestmark = pytest.mark.security("control-plane-code")

PROJECT = Path("/srv/fedround")
OWN_PULL = [{SET_WORKING_DIRECTORY: {"directory": str(PROJECT)}}]


def test_fedrounds_own_deployments_are_accepted() -> None:
    for entrypoint in (
        TRAINING_ENTRYPOINT,
        "fedround.flows.promotion:promote_model",
        "fedround.flows.rollback:rollback_model",
    ):
        assert coordinator_run_problem(entrypoint, OWN_PULL, [{}, None], PROJECT) is None
    assert (
        coordinator_run_problem(TRAINING_ENTRYPOINT, None, [{"stream_output": True}], PROJECT)
        is None
    )


@pytest.mark.parametrize(
    ("entrypoint", "pull", "variables", "reason"),
    [
        ("evil.py:run", OWN_PULL, [{}], "is not one of fedround's coordinator flows"),
        (None, OWN_PULL, [{}], "is not one of fedround's coordinator flows"),
        (
            "fedround.site_workers.session:site_session",
            OWN_PULL,
            [{}],
            "is not one of fedround's coordinator flows",
        ),
        (
            TRAINING_ENTRYPOINT,
            [{"prefect.deployments.steps.git_clone": {"repository": "https://x/y"}}],
            [{}],
            "pull step",
        ),
        (
            TRAINING_ENTRYPOINT,
            [*OWN_PULL, {"prefect.deployments.steps.run_shell_script": {"script": "id"}}],
            [{}],
            "pull step",
        ),
        (
            TRAINING_ENTRYPOINT,
            [{SET_WORKING_DIRECTORY: {"directory": "/tmp/elsewhere"}}],
            [{}],
            "not '/srv/fedround'",
        ),
        (TRAINING_ENTRYPOINT, ["not a mapping"], [{}], "pull step"),
        (TRAINING_ENTRYPOINT, OWN_PULL, [{}, {"command": "sh -c id"}], "['command']"),
        (TRAINING_ENTRYPOINT, OWN_PULL, [{"env": {"PYTHONPATH": "/tmp"}}], "['env']"),
        (TRAINING_ENTRYPOINT, OWN_PULL, [{"working_dir": "/tmp"}, None], "['working_dir']"),
    ],
)
def test_anything_else_is_refused_with_the_reason(
    entrypoint: str | None,
    pull: list[object],
    variables: list[dict[str, object] | None],
    reason: str,
) -> None:
    problem = coordinator_run_problem(entrypoint, pull, variables, PROJECT)  # type: ignore[arg-type]
    assert problem is not None and reason in problem


def test_the_rendered_deployments_pass_the_rule(tmp_path: Path) -> None:
    """What `fedround deploy` writes for the coordinator's pool is what the worker accepts."""
    import yaml

    from fedround.tasks.core.config import load_federation_config

    root = Path(__file__).resolve().parents[2]
    config = load_federation_config(root / "deployments/examples/mnist-demo.yaml")
    rendered = yaml.safe_load(render_prefect_yaml(config, "deployments/examples/mnist-demo.yaml"))
    pull = [
        {name: {"directory": str(PROJECT)} for name in step} for step in rendered["pull"]
    ]  # `prefect deploy` fills in {{ $FEDROUND_PROJECT_DIR }}
    coordinator = [
        d for d in rendered["deployments"] if d["work_pool"]["name"] == config.coordinator_pool
    ]
    assert len(coordinator) == 3
    for deployment in coordinator:
        variables = deployment.get("work_pool", {}).get("job_variables", {})
        assert coordinator_run_problem(deployment["entrypoint"], pull, [variables], PROJECT) is None
