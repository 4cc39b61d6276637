"""deployments/prefect.yaml is exactly what `fedround deploy` renders for the demo."""

from __future__ import annotations

from pathlib import Path

import yaml

from fedround.flows.deploy import render_prefect_yaml
from fedround.tasks.core.config import load_federation_config

REPO = Path(__file__).resolve().parents[2]
DEMO = "deployments/examples/mnist-demo.yaml"


def test_committed_prefect_yaml_matches_the_rendering() -> None:
    rendered = render_prefect_yaml(load_federation_config(REPO / DEMO), DEMO)
    assert (REPO / "deployments/prefect.yaml").read_text() == rendered, (
        "deployments/prefect.yaml is stale: run "
        f"`fedround deploy {DEMO} --render-only > deployments/prefect.yaml`"
    )


def test_rendering_places_each_site_in_its_own_pool_with_the_nightly_schedule() -> None:
    config = load_federation_config(REPO / DEMO)
    document = yaml.safe_load(render_prefect_yaml(config, DEMO))
    deployments = document["deployments"]
    coordinator = next(d for d in deployments if d["name"] == "mnist-demo")
    assert coordinator["work_pool"]["name"] == "mnist-demo-coordinator"
    assert coordinator["schedules"] == [
        {"cron": "0 2 * * *", "timezone": "Europe/Berlin", "active": True}
    ]
    assert coordinator["parameters"] == {"config_path": DEMO}
    sessions = [d for d in deployments if d["entrypoint"].endswith(":site_session")]
    assert sorted(d["work_pool"]["name"] for d in sessions) == [
        f"mnist-demo-site-{i:02d}" for i in range(1, 11)
    ]
    assert document["pull"][0]["prefect.deployments.steps.set_working_directory"] == {
        "directory": "{{ $FEDROUND_PROJECT_DIR }}"
    }
