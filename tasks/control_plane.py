"""The production profile: every control-plane link authenticated and encrypted.

``FEDROUND_PROFILE=production`` (set by the shipped compose and Kubernetes manifests)
makes the coordinator and every site refuse to start unless

- Prefect is reached over ``https://`` with a credential (``PREFECT_API_AUTH_STRING`` for
  a self-hosted server started with ``PREFECT_SERVER_API_AUTH_STRING``, or
  ``PREFECT_API_KEY`` for Prefect Cloud);
- MLflow (coordinator only: sites never talk to it) is reached over ``https://`` with a
  credential (``MLFLOW_TRACKING_USERNAME`` + ``MLFLOW_TRACKING_PASSWORD`` for
  fedround's ``fedround-auth`` app, or ``MLFLOW_TRACKING_TOKEN``);
- the S3 store is reached with TLS (``FEDROUND_S3_SECURE=true`` / ``object_store.secure``);
- no client is told to skip certificate checks (``MLFLOW_TRACKING_INSECURE_TLS``,
  ``PREFECT_API_TLS_INSECURE_SKIP_VERIFY``).

Only the insecure dev mode (``FEDROUND_INSECURE_DEV=1``, or ``insecure_dev: true`` in a
site's file) lets such a start through, with a warning at every start that names each gap.
The default profile, ``dev``, is the embedded federation on one machine: no check.

Placeholder values of these credentials are refused by :mod:`.runtime` in any profile.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from fedround.tasks.core.errors import ConfigError

log = logging.getLogger(__name__)

PROFILE_ENV = "FEDROUND_PROFILE"
Profile = Literal["dev", "production"]
PROFILES: tuple[Profile, ...] = ("dev", "production")
TLS_HINT = (
    "certificates: `fedround certs init --out <dir> --host <name>`; the servers' TLS and "
    "authentication settings: deployments/README.md (Authentication and TLS)"
)
_TRUE = {"1", "true", "yes", "on"}


def profile_from_env(env: Mapping[str, str] | None = None) -> Profile:
    """``FEDROUND_PROFILE`` (``dev`` when unset); :class:`ConfigError` for another value."""
    value = (os.environ if env is None else env).get(PROFILE_ENV, "dev").strip().lower() or "dev"
    if value == "dev":
        return "dev"
    if value == "production":
        return "production"
    raise ConfigError(f"{PROFILE_ENV}={value!r} is not a profile: use one of {list(PROFILES)}")


@dataclass(frozen=True)
class Links:
    """What a process will connect to: ``None`` for a link it does not use."""

    prefect_api_url: str | None
    mlflow_tracking_uri: str | None
    s3_secure: bool | None


def _https(url: str) -> bool:
    try:
        return urlsplit(url).scheme == "https"
    except ValueError:
        return False


def _set(env: Mapping[str, str], name: str) -> bool:
    return bool(env.get(name, "").strip())


def link_problems(links: Links, env: Mapping[str, str]) -> list[str]:
    """Each link that is unauthenticated or unencrypted, as a phrase naming the setting."""
    problems: list[str] = []
    if links.prefect_api_url is not None:
        if not links.prefect_api_url:
            problems.append(
                "PREFECT_API_URL is not set (a temporary local Prefect server has no "
                "authentication)"
            )
        elif not _https(links.prefect_api_url):
            problems.append(f"Prefect's API {links.prefect_api_url!r} is not https://")
        if not (_set(env, "PREFECT_API_AUTH_STRING") or _set(env, "PREFECT_API_KEY")):
            problems.append(
                "no Prefect credential: set PREFECT_API_AUTH_STRING (or PREFECT_API_KEY)"
            )
        if env.get("PREFECT_API_TLS_INSECURE_SKIP_VERIFY", "").strip().lower() in _TRUE:
            problems.append("PREFECT_API_TLS_INSECURE_SKIP_VERIFY turns certificate checks off")
    if links.mlflow_tracking_uri is not None:
        if not _https(links.mlflow_tracking_uri):
            problems.append("MLflow's MLFLOW_TRACKING_URI is not https://")
        basic = _set(env, "MLFLOW_TRACKING_USERNAME") and _set(env, "MLFLOW_TRACKING_PASSWORD")
        if not (basic or _set(env, "MLFLOW_TRACKING_TOKEN")):
            problems.append(
                "no MLflow credential: set MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"
            )
        if env.get("MLFLOW_TRACKING_INSECURE_TLS", "").strip().lower() in _TRUE:
            problems.append("MLFLOW_TRACKING_INSECURE_TLS turns certificate checks off")
    if links.s3_secure is False:
        problems.append("the S3 store is reached without TLS: set FEDROUND_S3_SECURE=true")
    return problems


def require_secure_links(
    links: Links,
    *,
    who: str,
    insecure_dev: bool,
    override: str,
    env: Mapping[str, str] | None = None,
) -> Profile:
    """Under the production profile, raise :class:`ConfigError` naming every link without
    authentication or TLS, unless ``insecure_dev`` (then a warning, at every call, naming
    each gap). Returns the profile; the ``dev`` profile checks nothing."""
    source = os.environ if env is None else env
    profile = profile_from_env(source)
    if profile == "dev":
        return profile
    problems = link_problems(links, source)
    if not problems:
        log.info("%s: production profile: every control-plane link is authenticated and TLS", who)
        return profile
    if insecure_dev:
        log.warning(
            "%s: INSECURE DEV MODE (%s) under the production profile: %s. Anyone on the "
            "network can read or drive these links; %s",
            who,
            override,
            "; ".join(problems),
            TLS_HINT,
        )
        return profile
    raise ConfigError(
        f"{who} will not start under the production profile ({PROFILE_ENV}=production) "
        f"without authentication and TLS: {'; '.join(problems)}. To fix it, {TLS_HINT}. "
        f"For a throw-away setup only, {override} lets it start (with a warning)"
    )
