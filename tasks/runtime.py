"""Where the coordinator keeps its state, read from the environment with working defaults.

The embedded default needs nothing set: everything lives under ``./.fedround``
(Prefect's database, MLflow's sqlite store and artifacts, the local object store, the
demo sites and run results).

Services refuse to start on placeholder credentials (``REPLACE_ME`` from
``deployments/k8s/secrets.yaml``, ``changeme``, MinIO's ``minioadmin`` ...) or on S3 keys
that are missing where S3 is used: see :func:`refuse_placeholder_credentials`. Only
``FEDROUND_INSECURE_DEV=1`` lets them through, with a warning at every start.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict

from fedround.tasks.control_plane import Links, require_secure_links
from fedround.tasks.core.errors import ConfigError
from fedround.tasks.object_store import ObjectStoreSettings

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = Path(".fedround")
S3_ACCESS_KEY_ENV = "FEDROUND_S3_ACCESS_KEY"
S3_SECRET_KEY_ENV = "FEDROUND_S3_SECRET_KEY"
INSECURE_DEV_ENV = "FEDROUND_INSECURE_DEV"
# Credentials the clients in a fedround process use when they are set (MLflow's basic auth
# and token, Prefect Cloud's key): refused if set to a placeholder, fine when unset.
OPTIONAL_CLIENT_CREDENTIALS_ENV = (
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "PREFECT_API_KEY",
    "PREFECT_API_AUTH_STRING",
)
# Compared lower-cased and without whitespace, as deployments/docker-entrypoint.sh does.
# Values that merely contain "replace_me" or "changeme", template markers (<...>) and
# unexpanded variables (${...}, $(...)) are placeholders too.
PLACEHOLDER_CREDENTIALS = frozenset(
    {
        "replace_me",
        "replaceme",
        "replace-me",
        "changeme",
        "change_me",
        "change-me",
        "changeit",
        "password",
        "secret",
        "minioadmin",  # MinIO's default root user and password
        "akiaiosfodnn7example",  # the AWS documentation's example key pair
        "wjalrxutnfemi/k7mdeng/bpxrficyexamplekey",
    }
)
PLACEHOLDER_PARTS = ("replace_me", "changeme")
PROVISION_HINT = (
    "provision real secrets: deployments/make-secrets.sh for deployments/compose.yaml, your "
    "secret manager (or a filled-in deployments/k8s/secrets.yaml) for Kubernetes; see "
    "deployments/README.md"
)


def insecure_dev_from_env() -> bool:
    """Whether ``FEDROUND_INSECURE_DEV`` asks to accept placeholder credentials (1/true/yes/on)."""
    return os.environ.get(INSECURE_DEV_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def is_placeholder_credential(value: str) -> bool:
    """True for a well-known placeholder or default credential, never for a generated one."""
    normal = "".join(value.split()).lower()
    return (
        normal in PLACEHOLDER_CREDENTIALS
        or any(part in normal for part in PLACEHOLDER_PARTS)
        or (normal.startswith("<") and normal.endswith(">"))
        or normal.startswith(("${", "$("))
    )


@dataclass(frozen=True)
class Credential:
    """One credential to vet: ``name`` is what the messages say (never the value)."""

    name: str
    value: str | None
    required: bool = True


def credential_problem(credential: Credential) -> str | None:
    """What is wrong with a credential, as a phrase naming it; ``None`` when it may be used.

    A required one must be set and non-empty; any one that is set must not be a placeholder.
    """
    value = credential.value
    if value is None or not value.strip():
        if not credential.required:
            return None
        return f"{credential.name} is {'not set' if value is None else 'empty'}"
    if is_placeholder_credential(value):
        return f"{credential.name} is a placeholder or default value"
    return None


def url_password(url: str | None) -> str | None:
    """The password embedded in a URL (``scheme://user:password@host/...``), if any."""
    if not url:
        return None
    try:
        return urlsplit(url).password
    except ValueError:  # a malformed URL is its user's problem, reported where it is used
        return None


def optional_client_credentials(env: Mapping[str, str] | None = None) -> list[Credential]:
    """The client credentials of :data:`OPTIONAL_CLIENT_CREDENTIALS_ENV` that are set."""
    source = os.environ if env is None else env
    return [
        Credential(name, source[name], required=False)
        for name in OPTIONAL_CLIENT_CREDENTIALS_ENV
        if name in source
    ]


def refuse_placeholder_credentials(
    credentials: list[Credential], *, who: str, insecure_dev: bool, override: str
) -> None:
    """Raise :class:`ConfigError` naming every missing or placeholder credential (never its
    value), unless ``insecure_dev``: then log a warning, at every call, that says so.

    ``who`` starts the messages (``"the coordinator"``, a site config's path); ``override``
    tells how the insecure mode is switched on for ``who``.
    """
    problems = [p for p in map(credential_problem, credentials) if p is not None]
    if insecure_dev:
        found = f": {'; '.join(problems)}" if problems else " (none found now)"
        log.warning(
            "%s: INSECURE DEV MODE (%s): placeholder and missing credentials are accepted%s. "
            "Never run it like this outside a throw-away local setup: %s",
            who,
            override,
            found,
            PROVISION_HINT,
        )
        return
    if problems:
        raise ConfigError(
            f"{who} will not start with placeholder or missing credentials: "
            f"{'; '.join(problems)}. To fix it, {PROVISION_HINT}. For a throw-away local "
            f"setup only, {override} accepts them (with a warning)"
        )


def state_dir_from_env() -> Path:
    return Path(os.environ.get("FEDROUND_STATE_DIR", DEFAULT_STATE_DIR)).resolve()


class CoordinatorSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    state_dir: Path
    object_store: ObjectStoreSettings
    tracking_uri: str
    site_processes: int

    @property
    def runs_dir(self) -> Path:
        return self.state_dir / "runs"

    def federation_dir(self, federation: str) -> Path:
        return self.state_dir / "federations" / federation

    def holdout_file(self, federation: str) -> Path:
        return self.federation_dir(federation) / "holdout.npz"

    def site_config_file(self, federation: str, site: str) -> Path:
        return self.federation_dir(federation) / "sites" / site / "site.yaml"

    @classmethod
    def from_env(cls) -> CoordinatorSettings:
        """Read ``FEDROUND_*`` and ``MLFLOW_TRACKING_URI``; defaults give the embedded setup.

        With ``FEDROUND_OBJECT_STORE=s3``, ``FEDROUND_S3_ACCESS_KEY`` and
        ``FEDROUND_S3_SECRET_KEY`` must be set to real keys; placeholder credentials are
        refused (:class:`ConfigError`) unless ``FEDROUND_INSECURE_DEV=1``.
        """
        state = state_dir_from_env()
        credentials: list[Credential] = []
        if os.environ.get("FEDROUND_OBJECT_STORE", "local") == "s3":
            credentials += [
                Credential(S3_ACCESS_KEY_ENV, os.environ.get(S3_ACCESS_KEY_ENV)),
                Credential(S3_SECRET_KEY_ENV, os.environ.get(S3_SECRET_KEY_ENV)),
            ]
            store = ObjectStoreSettings(
                kind="s3",
                endpoint=os.environ.get("FEDROUND_S3_ENDPOINT"),
                bucket=os.environ.get("FEDROUND_S3_BUCKET", "fedround"),
                secure=os.environ.get("FEDROUND_S3_SECURE", "false") == "true",
                region=os.environ.get("FEDROUND_S3_REGION"),
            )
        else:
            store = ObjectStoreSettings(kind="local", root=state / "objects")
        tracking = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{state / 'mlflow.db'}"
        credentials.append(
            Credential("the password in MLFLOW_TRACKING_URI", url_password(tracking), False)
        )
        refuse_placeholder_credentials(
            credentials + optional_client_credentials(),
            who="the coordinator",
            insecure_dev=insecure_dev_from_env(),
            override=f"{INSECURE_DEV_ENV}=1",
        )
        require_secure_links(
            Links(
                prefect_api_url=os.environ.get("PREFECT_API_URL", ""),
                mlflow_tracking_uri=tracking,
                s3_secure=store.secure if store.kind == "s3" else None,
            ),
            who="the coordinator",
            insecure_dev=insecure_dev_from_env(),
            override=f"{INSECURE_DEV_ENV}=1",
        )
        processes = int(os.environ.get("FEDROUND_SITE_PROCESSES", min(os.cpu_count() or 1, 4)))
        return cls(
            state_dir=state, object_store=store, tracking_uri=tracking, site_processes=processes
        )
