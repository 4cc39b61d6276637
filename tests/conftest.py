"""Shared test settings: telemetry off, everything under pytest's temporary folders."""

from __future__ import annotations

import os

for _name, _value in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "GX_ANALYTICS_ENABLED": "false",
    # `fedround run` keeps a local Prefect server and MLflow UI up between runs; tests that
    # do not test that get a temporary server per run, so none outlives its test (the
    # long-lived servers are tested in tests/e2e/test_local_servers.py).
    "FEDROUND_LOCAL_SERVER": "0",
}.items():
    os.environ.setdefault(_name, _value)

# Real local services (S3, MLflow, Prefect on Postgres) as session fixtures: see tests/services.py.
pytest_plugins = ["tests.services", "tests.security_report"]
