"""The production profile refuses a control-plane link without authentication or TLS."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from fedround.site_workers.settings import SiteSettings, load_site_settings, write_site_settings
from fedround.tasks.control_plane import Links, link_problems, profile_from_env
from fedround.tasks.core.errors import ConfigError
from fedround.tasks.object_store import ObjectStoreSettings
from fedround.tasks.runtime import CoordinatorSettings

pytestmark = pytest.mark.security("control-plane-auth-tls")

SECURE_ENV = {
    "FEDROUND_PROFILE": "production",
    "PREFECT_API_URL": "https://coordinator.example.org/api",
    "PREFECT_API_AUTH_STRING": "fedround:Zk3v9TqL2mWp8s",
    "MLFLOW_TRACKING_URI": "https://coordinator.example.org:5000",
    "MLFLOW_TRACKING_USERNAME": "coordinator",
    "MLFLOW_TRACKING_PASSWORD": "Qm7rT2xWv9LpA4",
    "FEDROUND_OBJECT_STORE": "s3",
    "FEDROUND_S3_ENDPOINT": "minio.example.org:9000",
    "FEDROUND_S3_SECURE": "true",
    "FEDROUND_S3_ACCESS_KEY": "coordinator-Vb8nM2qR",
    "FEDROUND_S3_SECRET_KEY": "Hx4kP9sD2wLz7cQf",
}
PLAIN = Links("http://coordinator:4200/api", "http://coordinator:5000", s3_secure=False)


def test_every_gap_is_named() -> None:
    problems = link_problems(PLAIN, {})
    assert len(problems) == 5
    text = "; ".join(problems)
    for name in (
        "is not https://",
        "PREFECT_API_AUTH_STRING",
        "MLFLOW_TRACKING_URI",
        "MLFLOW_TRACKING_PASSWORD",
        "FEDROUND_S3_SECURE=true",
    ):
        assert name in text


def test_skip_verify_settings_are_gaps_too() -> None:
    env = {k: v for k, v in SECURE_ENV.items()} | {
        "MLFLOW_TRACKING_INSECURE_TLS": "true",
        "PREFECT_API_TLS_INSECURE_SKIP_VERIFY": "1",
    }
    links = Links(env["PREFECT_API_URL"], env["MLFLOW_TRACKING_URI"], s3_secure=True)
    problems = link_problems(links, env)
    assert [p.split()[0] for p in problems] == [
        "PREFECT_API_TLS_INSECURE_SKIP_VERIFY",
        "MLFLOW_TRACKING_INSECURE_TLS",
    ]


def test_unused_links_are_not_checked() -> None:
    assert link_problems(Links(None, None, None), {}) == []


def test_an_unknown_profile_is_a_config_error() -> None:
    assert profile_from_env({}) == "dev"
    with pytest.raises(ConfigError, match="'prod' is not a profile"):
        profile_from_env({"FEDROUND_PROFILE": "prod"})


def _env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: dict[str, str]) -> None:
    for name in [*SECURE_ENV, "FEDROUND_INSECURE_DEV", "MLFLOW_TRACKING_TOKEN", "PREFECT_API_KEY"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FEDROUND_STATE_DIR", str(tmp_path))
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def test_the_coordinator_starts_with_every_link_secured(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _env(monkeypatch, tmp_path, SECURE_ENV)
    settings = CoordinatorSettings.from_env()
    assert settings.object_store.secure is True


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"PREFECT_API_URL": "http://coordinator.example.org/api"}, "is not https://"),
        ({"PREFECT_API_AUTH_STRING": ""}, "no Prefect credential"),
        ({"MLFLOW_TRACKING_URI": "http://coordinator.example.org:5000"}, "MLFLOW_TRACKING_URI"),
        ({"MLFLOW_TRACKING_PASSWORD": ""}, "no MLflow credential"),
        ({"FEDROUND_S3_SECURE": "false"}, "FEDROUND_S3_SECURE=true"),
        ({"PREFECT_API_URL": ""}, "PREFECT_API_URL is not set"),
    ],
)
def test_the_coordinator_refuses_an_insecure_link(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, change: dict[str, str], named: str
) -> None:
    _env(monkeypatch, tmp_path, SECURE_ENV | change)
    with pytest.raises(ConfigError, match="production profile") as caught:
        CoordinatorSettings.from_env()
    assert named in str(caught.value)
    assert "fedround certs init" in str(caught.value)
    assert "FEDROUND_INSECURE_DEV=1" in str(caught.value)
    assert "Qm7rT2xWv9LpA4" not in str(caught.value)


def test_insecure_dev_starts_with_a_warning_at_every_start(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _env(
        monkeypatch,
        tmp_path,
        SECURE_ENV | {"FEDROUND_S3_SECURE": "false", "FEDROUND_INSECURE_DEV": "1"},
    )
    with caplog.at_level(logging.WARNING, logger="fedround.tasks.control_plane"):
        CoordinatorSettings.from_env()
        CoordinatorSettings.from_env()
    warnings = [r.getMessage() for r in caplog.records if "production profile" in r.getMessage()]
    assert len(warnings) == 2
    assert all("INSECURE DEV MODE" in w and "FEDROUND_S3_SECURE" in w for w in warnings)


def test_the_dev_profile_checks_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _env(monkeypatch, tmp_path, {})
    assert CoordinatorSettings.from_env().tracking_uri.startswith("sqlite:///")


def _site(tmp_path: Path, api_url: str, secure: bool) -> Path:
    store = ObjectStoreSettings(
        kind="s3",
        endpoint="minio.example.org:9000",
        bucket="fedround",
        secure=secure,
        access_key="site-a-Vb8nM2qR",
        secret_key="Hx4kP9sD2wLz7cQf",  # type: ignore[arg-type]
    )
    path = tmp_path / "site.yaml"
    write_site_settings(
        path,
        SiteSettings(
            site="a",
            federation="f",
            data_dir=tmp_path,
            object_store=store,
            prefect_api_url=api_url,
        ),
    )
    return path


def test_a_site_refuses_plain_links_under_the_production_profile(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _env(
        monkeypatch,
        tmp_path,
        {"FEDROUND_PROFILE": "production", "PREFECT_API_AUTH_STRING": "fedround:Zk3v9TqL2mWp8s"},
    )
    with pytest.raises(ConfigError, match="site a") as caught:
        load_site_settings(_site(tmp_path, "http://coordinator:4200/api", secure=False))
    message = str(caught.value)
    assert "is not https://" in message and "FEDROUND_S3_SECURE" in message
    assert "MLflow" not in message  # sites never talk to MLflow
    secure = load_site_settings(_site(tmp_path, "https://coordinator/api", secure=True))
    assert secure.site == "a"
