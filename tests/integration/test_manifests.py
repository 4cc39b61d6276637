"""Production manifests (deployments/compose.yaml, deployments/k8s/): no Docker engine or
cluster runs here, so they are parsed, cross-checked and (k8s) validated against the
Kubernetes JSON schemas shipped in the ``kubernetes-validate`` wheel, offline."""

from __future__ import annotations

import base64
import configparser
import importlib.util
import json
import os
import re
import shlex
import ssl
import subprocess
import sys
import threading
import tomllib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from mlflow.environment_variables import (
    MLFLOW_AUTH_ADMIN_PASSWORD,
    MLFLOW_AUTH_ADMIN_USERNAME,
    MLFLOW_AUTH_CONFIG_PATH,
    MLFLOW_FLASK_SERVER_SECRET_KEY,
)

from fedround.site_workers.settings import SiteSettings
from fedround.tasks.certificates import certificate_hosts, make_certificates, tls_files
from fedround.tasks.control_plane import Links, link_problems, profile_from_env
from fedround.tasks.core.config import load_federation_config
from fedround.tasks.runtime import is_placeholder_credential

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deployments"
K8S = DEPLOY / "k8s"
K8S_VERSION = "1.31"
KNOWN_KINDS = {
    "Namespace",
    "Secret",
    "ConfigMap",
    "Service",
    "Deployment",
    "StatefulSet",
    "Job",
    "PersistentVolumeClaim",
    "NetworkPolicy",
}
WORKLOADS = {"Deployment", "StatefulSet", "Job"}
FEDROUND_IMAGE = re.compile(r"(^|/)fedround:")
# What the coordinator must be given to use S3 (tasks/runtime.py, tasks/object_store.py).
COORDINATOR_S3_ENV = {
    "FEDROUND_OBJECT_STORE",
    "FEDROUND_S3_ENDPOINT",
    "FEDROUND_S3_BUCKET",
    "FEDROUND_S3_ACCESS_KEY",
    "FEDROUND_S3_SECRET_KEY",
}
# TLS: what `fedround certs init --out deployments/tls` writes (compose mounts ./tls/<file>;
# Kubernetes gets the Secret fedround-tls from ca.crt, server.crt and server.key).
TLS = tls_files(DEPLOY / "tls")
TLS_NAMES = {TLS.ca_cert.name, TLS.ca_key.name, TLS.cert.name, TLS.key.name}
TLS_SECRET = "fedround-tls"
TLS_SECRET_KEYS = {TLS.ca_cert.name, TLS.cert.name, TLS.key.name}
SERVERS = {"prefect-server", "mlflow", "minio"}
# Every variable that names a control-plane endpoint.
URL_ENV = (
    "PREFECT_API_URL",
    "PREFECT_UI_API_URL",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_S3_ENDPOINT_URL",
    "MINIO_URL",
)
PREFECT_APP = ["python", "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app"]
CREATE_USERS = DEPLOY / "mlflow" / "create-users.py"
AUTH_INI = DEPLOY / "mlflow" / "basic_auth.ini"


def _env_names_fedround_reads() -> set[str]:
    """Every FEDROUND_* name in the package's source (the service supervisor, which only
    writes client environments, left out)."""
    names: set[str] = set()
    for package in ("flows", "tasks", "site_workers", "mlflow_plugins"):
        for path in (ROOT / package).rglob("*.py"):
            if not path.name.startswith("services"):
                names |= set(re.findall(r"\"(FEDROUND_[A-Z0-9_]+)\"", path.read_text()))
    return names


def _pinned(image: str) -> bool:
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag not in {"", "latest"}


def _fedround_env(names: set[str]) -> set[str]:
    return {n.removesuffix("_FILE") for n in names if n.startswith("FEDROUND_")}


def _option(args: list[str], name: str) -> str | None:
    """The value of ``name`` in a command line (``--name value`` or ``--name=value``)."""
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(f"{name}="):
            return arg.removeprefix(f"{name}=")
    return None


def _dummy(name: str) -> str:
    """A stand-in for a secret's value, shaped like a real one (never a placeholder)."""
    value = f"{name}-Zq8xT4vN2pLk"
    assert not is_placeholder_credential(value)
    return value


def _command(spec: dict[str, Any]) -> list[str]:
    """What a compose service or a k8s container runs (the image's entrypoint left out)."""
    return [str(a) for a in (spec.get("command") or []) + (spec.get("args") or [])]


def _load_create_users() -> ModuleType:
    loaded = importlib.util.spec_from_file_location("create_users", CREATE_USERS)
    assert loaded is not None and loaded.loader is not None
    module = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(module)
    return module


def _ini(text: str) -> configparser.SectionProxy:
    parser = configparser.ConfigParser()
    parser.read_string(text)
    return parser["mlflow"]


def _readme_cert_hosts() -> list[set[str]]:
    """The --host sets of each `fedround certs init` command in deployments/README.md's
    code blocks."""
    text = (DEPLOY / "README.md").read_text()
    code = "\n".join(re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M))
    return [
        set(re.findall(r"--host\s+(\S+)", line))
        for line in code.replace("\\\n", " ").splitlines()
        if "fedround certs init" in line
    ]


def _assert_production_links(
    who: str,
    coordinator: dict[str, str],
    site: dict[str, str],
    site_settings: SiteSettings,
    trusts_ca: Callable[[str, str], bool],
) -> None:
    """The coordinator's and the site's environments pass the production profile's check
    (fedround.tasks.control_plane), and each TLS client trusts the mounted CA."""
    for name, env in (("coordinator", coordinator), ("site", site)):
        assert profile_from_env(env) == "production", f"{who} {name}"
    coordinator_links = Links(
        prefect_api_url=coordinator.get("PREFECT_API_URL", ""),
        mlflow_tracking_uri=coordinator.get("MLFLOW_TRACKING_URI") or "sqlite:///state/mlflow.db",
        s3_secure=coordinator.get("FEDROUND_S3_SECURE", "false") == "true",
    )
    assert link_problems(coordinator_links, coordinator) == [], f"{who} coordinator"
    store = site_settings.object_store
    site_links = Links(
        prefect_api_url=site_settings.prefect_api_url or site.get("PREFECT_API_URL", ""),
        mlflow_tracking_uri=None,
        s3_secure=store.secure if store.kind == "s3" else None,
    )
    assert link_problems(site_links, site) == [], f"{who} site"
    # The check itself is live: without the auth string the same environment fails it.
    without = {k: v for k, v in site.items() if k != "PREFECT_API_AUTH_STRING"}
    assert link_problems(site_links, without), f"{who}: the profile check found nothing"
    for name in ("PREFECT_API_SSL_CERT_FILE", "MLFLOW_TRACKING_SERVER_CERT_PATH", "SSL_CERT_FILE"):
        assert trusts_ca("coordinator", coordinator[name]), f"{who} coordinator {name}"
    for name in ("PREFECT_API_SSL_CERT_FILE", "SSL_CERT_FILE"):
        assert trusts_ca("site", site[name]), f"{who} site {name}"


# --- compose ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return data


def _compose_mounts(service: dict[str, Any]) -> dict[str, str]:
    """Target -> source of a service's volumes (short syntax; a source may be ``${...}``)."""
    mounts = {}
    for volume in service.get("volumes", []):
        if volume.startswith("${"):
            end = volume.index("}") + 1
            source, rest = volume[:end], volume[end + 1 :]
        else:
            source, _, rest = volume.partition(":")
        mounts[rest.split(":")[0]] = source
    return mounts


def _compose_file(service: dict[str, Any], path: str) -> str | None:
    """The host path (relative to deployments/) a container path of ``service`` shows."""
    for target, source in _compose_mounts(service).items():
        if path == target:
            return source
        if path.startswith(target.rstrip("/") + "/"):
            return source.rstrip("/") + "/" + path.removeprefix(target.rstrip("/") + "/")
    return None


def _compose_tls_file(service: dict[str, Any], path: str) -> str | None:
    """Which file of ./tls/ (ca.crt, server.key, ...) a container path shows, if any."""
    source = _compose_file(service, path)
    if source is None or not source.startswith("./tls/"):
        return None
    return source.removeprefix("./tls/")


def _compose_tls_mounted(service: dict[str, Any]) -> set[str]:
    """The files of ./tls/ a service gets (all of them for the folder itself)."""
    mounted: set[str] = set()
    for source in _compose_mounts(service).values():
        if source.rstrip("/") in {"./tls", "tls"}:
            mounted |= TLS_NAMES
        elif source.startswith("./tls/"):
            mounted.add(source.removeprefix("./tls/"))
    return mounted


def _compose_env(service: dict[str, Any]) -> dict[str, str]:
    """The environment the service's process sees: each ``NAME_FILE=/run/secrets/s`` of a
    granted secret becomes ``NAME`` (docker-entrypoint.sh), with a dummy value."""
    env = {}
    for name, value in service.get("environment", {}).items():
        if name.endswith("_FILE") and str(value).startswith("/run/secrets/"):
            secret = str(value).removeprefix("/run/secrets/")
            if secret in service.get("secrets", []):
                env[name.removesuffix("_FILE")] = _dummy(secret)
        else:
            env[name] = str(value)
    return env


def _compose_secret_of(service: dict[str, Any], name: str) -> str | None:
    """The secret ``NAME`` comes from (``NAME_FILE=/run/secrets/<secret>``), if granted."""
    value = str(service.get("environment", {}).get(f"{name}_FILE", ""))
    secret = value.removeprefix("/run/secrets/")
    granted = value.startswith("/run/secrets/") and secret in service.get("secrets", [])
    return secret if granted else None


def test_compose_services_and_references(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {
        "postgres",
        "prefect-server",
        "minio",
        "s3-init",
        "mlflow",
        "coordinator-worker",
        "site-01-worker",
    } <= set(services)
    for name, service in services.items():
        image = service["image"]
        assert _pinned(image), f"{name}: image {image} must be pinned to a tag"
        if FEDROUND_IMAGE.search(image):
            assert (ROOT / service["build"]["dockerfile"]).exists()
        assert "minio/minio" not in image or name == "minio"
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
        for network in service.get("networks", []):
            assert network in compose["networks"], f"{name}: unknown network {network}"
        for secret in service.get("secrets", []):
            assert secret in compose["secrets"], f"{name}: unknown secret {secret}"
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./tls/"):  # written by `fedround certs init`, not committed
                assert source.removeprefix("./tls/") in TLS_NAMES, f"{name} mounts {source}"
            elif source.startswith("./"):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
            elif not source.startswith("${"):
                assert source in compose["volumes"], f"{name}: unknown volume {source}"
        environment = service.get("environment", {})
        for variable, value in environment.items():
            if variable.endswith("_FILE") and str(value).startswith("/run/secrets/"):
                secret = str(value).removeprefix("/run/secrets/")
                assert secret in service.get("secrets", []), f"{name}: {variable} not granted"
            elif variable.startswith("MINIO_ROOT_") and variable.endswith("_FILE"):
                assert value in service.get("secrets", [])


def test_compose_env_names_match_what_fedround_reads(compose: dict[str, Any]) -> None:
    known = _env_names_fedround_reads()
    services = compose["services"]
    for name, service in services.items():
        used = _fedround_env(set(service.get("environment", {})))
        assert used <= known, f"{name} sets variables fedround never reads: {used - known}"
    coordinator = services["coordinator-worker"]["environment"]
    assert _fedround_env(set(coordinator)) >= COORDINATOR_S3_ENV
    assert known >= COORDINATOR_S3_ENV
    assert coordinator["PREFECT_API_URL"] == "https://prefect-server:4200/api"
    assert coordinator["MLFLOW_TRACKING_URI"] == "https://mlflow:5000"
    assert coordinator["FEDROUND_S3_ENDPOINT"] == "minio:9000"
    assert (ROOT / services["coordinator-worker"]["command"][-1]).exists()


def test_compose_sites_reach_only_prefect_and_minio(compose: dict[str, Any]) -> None:
    services = compose["services"]
    on_sites = {n for n, s in services.items() if "sites" in s.get("networks", [])}
    assert on_sites == {"prefect-server", "minio", "site-01-worker"}
    site = services["site-01-worker"]
    assert site["networks"] == ["sites"]
    assert site["command"] == ["fedround", "site", "start", "--config", "/site/site.yaml"]
    # Settings, data and the CA read-only; only its own state volume (used dispatch seals,
    # strategy state) is writable, and site.yaml points its state_dir there.
    writable = [mount for mount in site["volumes"] if not mount.endswith(":ro")]
    assert writable == ["site-01-state:/site/state"]
    settings = yaml.safe_load((DEPLOY / "sites" / "site-01" / "site.yaml").read_text())
    assert settings["state_dir"] == "/site/state"
    # Its own S3 keys and the Prefect auth string (Prefect OSS has one credential), nothing
    # of the coordinator's or MLflow's.
    assert set(site["secrets"]) == {
        "prefect_auth_string",
        "site_site-01_s3_access_key",
        "site_site-01_s3_secret_key",
    }
    init_sites = services["s3-init"]["environment"]["SITES"].split()
    for site_name in init_sites:
        for kind in ("access", "secret"):
            assert f"site_{site_name}_s3_{kind}_key" in services["s3-init"]["secrets"]


@pytest.mark.security("secrets-in-image")
def test_compose_secrets_stay_out_of_git(compose: dict[str, Any]) -> None:
    for secret in compose["secrets"].values():
        assert secret["file"].startswith("./secrets/")
    ignore = (DEPLOY / "secrets" / ".gitignore").read_text().split()
    assert ignore[ignore.index("*") :] == ["*", "!.gitignore", "!README.md"]
    tracked = subprocess.run(
        ["git", "ls-files", "deployments/secrets"], cwd=ROOT, capture_output=True, text=True
    ).stdout.split()
    assert set(tracked) <= {"deployments/secrets/.gitignore", "deployments/secrets/README.md"}


def test_example_site_settings_are_valid() -> None:
    federation = load_federation_config(DEPLOY / "examples" / "mnist-demo.yaml")
    texts = [(DEPLOY / "sites" / "site-01" / "site.yaml").read_text()]
    texts += [
        doc["data"]["site.yaml"]
        for doc in _k8s_docs()
        if doc["kind"] == "ConfigMap" and "site.yaml" in doc.get("data", {})
    ]
    for text in texts:
        settings = SiteSettings.model_validate(yaml.safe_load(text))
        assert settings.federation == federation.federation
        assert settings.site in {s.name for s in federation.sites}
        assert settings.object_store.kind == "s3"
        assert settings.object_store.region == "us-east-1"
        assert settings.object_store.access_key is None  # keys come from the site's secrets


def test_dockerfile_copies_what_exists() -> None:
    lines = (DEPLOY / "Dockerfile").read_text().splitlines()
    base = next(line.split()[1] for line in lines if line.startswith("FROM "))
    assert _pinned(base)
    for line in lines:
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                if "*" not in source:
                    assert (ROOT / source).exists(), f"Dockerfile copies missing {source}"


def test_dockerfile_copies_every_installed_package() -> None:
    import tomllib

    package_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"
    ].values()
    copied = {
        line.split()[1]
        for line in (DEPLOY / "Dockerfile").read_text().splitlines()
        if line.startswith("COPY ")
    }
    assert set(package_dirs) <= copied, f"not copied into the image: {set(package_dirs) - copied}"


# --- kubernetes -------------------------------------------------------------------------


def _k8s_docs() -> Iterator[dict[str, Any]]:
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                doc.setdefault("_file", path.name)
                yield doc


@pytest.fixture(scope="module")
def k8s() -> list[dict[str, Any]]:
    return [d for d in _k8s_docs() if d["kind"] != "Kustomization"]


def _templates(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d["spec"]["template"] for d in docs if d["kind"] in WORKLOADS}


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _k8s_containers(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any], Any]]:
    """(workload, pod spec, container) for every container and init container."""
    for name, template in _templates(docs).items():
        spec = template["spec"]
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            yield name, spec, container


def _k8s_env(container: dict[str, Any]) -> dict[str, str]:
    """A container's environment, each value from a Secret a dummy one."""
    env = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        elif ref := item.get("valueFrom", {}).get("secretKeyRef"):
            env[item["name"]] = _dummy(f"{ref['name']}.{ref['key']}")
    return env


def _k8s_secret_ref(container: dict[str, Any], name: str) -> tuple[str, str] | None:
    """(Secret, key) a variable of the container comes from, if it does."""
    for item in container.get("env", []):
        ref = item.get("valueFrom", {}).get("secretKeyRef")
        if item["name"] == name and ref:
            return ref["name"], ref["key"]
    return None


def _k8s_source(
    spec: dict[str, Any], container: dict[str, Any], path: str
) -> tuple[str, str, str] | None:
    """What a container path shows: (secret|configMap, its name, the key), or
    (persistentVolumeClaim|emptyDir, the claim or volume, the path inside it)."""
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        target = mount["mountPath"].rstrip("/")
        if path == target:
            relative = mount.get("subPath", "")
        elif path.startswith(target + "/"):
            relative = "/".join(p for p in (mount.get("subPath", ""), path[len(target) + 1 :]) if p)
        else:
            continue
        volume = volumes[mount["name"]]
        for kind, name_field in (("secret", "secretName"), ("configMap", "name")):
            if kind in volume:
                source = volume[kind]
                if "items" not in source:
                    return kind, source[name_field], relative
                items = {item["path"]: item["key"] for item in source["items"]}
                return (kind, source[name_field], items[relative]) if relative in items else None
        if "persistentVolumeClaim" in volume:
            claim = volume["persistentVolumeClaim"]["claimName"]
            return "persistentVolumeClaim", claim, relative
        if "emptyDir" in volume:
            return "emptyDir", mount["name"], relative
    return None


def _k8s_tls_file(spec: dict[str, Any], container: dict[str, Any], path: str) -> str | None:
    """Which key of the Secret fedround-tls a container path shows, if any."""
    source = _k8s_source(spec, container, path)
    return source[2] if source and source[:2] == ("secret", TLS_SECRET) else None


def _k8s_tls_in_pod(spec: dict[str, Any]) -> set[str]:
    """The keys of fedround-tls that a pod's volumes hold (all of them without ``items``)."""
    held: set[str] = set()
    for volume in spec.get("volumes", []):
        sources = [volume["secret"]] if "secret" in volume else []
        sources += [s["secret"] for s in volume.get("projected", {}).get("sources", [])]
        for source in sources:
            if source.get("secretName", source.get("name")) == TLS_SECRET:
                items = source.get("items")
                held |= {item["key"] for item in items} if items else TLS_SECRET_KEYS
    return held


def test_k8s_documents_are_well_formed_and_validate(k8s: list[dict[str, Any]]) -> None:
    import kubernetes_validate

    for doc in k8s:
        where = f"{doc['_file']}: {doc.get('kind')}"
        assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"].get("name"), where
        assert doc["kind"] in KNOWN_KINDS, where
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "fedround", where
        body = {k: v for k, v in doc.items() if k != "_file"}
        kubernetes_validate.validate(body, K8S_VERSION, strict=True)


def test_kustomization_lists_every_file() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    assert kustomization["namespace"] == "fedround"


def test_k8s_references_resolve(k8s: list[dict[str, Any]]) -> None:
    by_kind: dict[str, dict[str, dict[str, Any]]] = {}
    for doc in k8s:
        by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
    secrets = {name: set(doc.get("stringData", {})) for name, doc in by_kind["Secret"].items()}
    templates = _templates(k8s)
    for name, workload in (by_kind.get("Deployment", {}) | by_kind.get("StatefulSet", {})).items():
        selector = workload["spec"]["selector"]["matchLabels"]
        assert _matches(selector, workload["spec"]["template"]["metadata"]["labels"]), name
    for name, service in by_kind["Service"].items():
        selector = service["spec"]["selector"]
        assert any(_matches(selector, t["metadata"]["labels"]) for t in templates.values()), name
    for name, template in templates.items():
        spec = template["spec"]
        for container in spec["containers"]:
            image = container["image"]
            assert _pinned(image), f"{name}: image {image} must be pinned to a tag"
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets.get(ref["name"], set()), f"{name}: {ref}"
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in by_kind["ConfigMap"], name
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                assert claim in by_kind["PersistentVolumeClaim"], name
            for source in volume.get("projected", {}).get("sources", []):
                assert source["secret"]["name"] in secrets, name
            if "secret" in volume:
                # fedround-tls is created from the certificate files (README), not secrets.yaml.
                secret = volume["secret"]["secretName"]
                keys = TLS_SECRET_KEYS if secret == TLS_SECRET else secrets.get(secret)
                assert keys is not None, f"{name}: unknown Secret {secret}"
                for item in volume["secret"].get("items", []):
                    assert item["key"] in keys, f"{name}: {secret} has no key {item['key']}"


@pytest.mark.security("secrets-in-image")
def test_k8s_secrets_are_placeholders(k8s: list[dict[str, Any]]) -> None:
    for doc in k8s:
        if doc["kind"] == "Secret":
            assert "data" not in doc
            assert set(doc["stringData"].values()) == {"REPLACE_ME"}, doc["metadata"]["name"]


def test_k8s_env_names_match_what_fedround_reads(k8s: list[dict[str, Any]]) -> None:
    known = _env_names_fedround_reads()
    templates = _templates(k8s)
    for name, template in templates.items():
        for container in template["spec"]["containers"]:
            used = _fedround_env({env["name"] for env in container.get("env", [])})
            assert used <= known, f"{name} sets variables fedround never reads: {used - known}"
    coordinator = templates["coordinator-worker"]["spec"]["containers"][0]
    assert _fedround_env({e["name"] for e in coordinator["env"]}) >= COORDINATOR_S3_ENV
    site = templates["site-01-worker"]["spec"]["containers"][0]
    refs = [e["valueFrom"]["secretKeyRef"]["name"] for e in site["env"] if "valueFrom" in e]
    # Its own keys and the Prefect auth string (Prefect OSS has one), nothing of the
    # coordinator's or MLflow's.
    assert refs and set(refs) == {"site-01-s3", "prefect-auth"}


def test_k8s_site_workers_reach_only_prefect_and_minio(k8s: list[dict[str, Any]]) -> None:
    templates = _templates(k8s)
    policy = next(
        d for d in k8s if d["kind"] == "NetworkPolicy" and d["metadata"]["name"].startswith("site")
    )
    spec = policy["spec"]
    assert set(spec["policyTypes"]) == {"Ingress", "Egress"} and spec["ingress"] == []
    selected = {
        n
        for n, t in templates.items()
        if _matches(spec["podSelector"]["matchLabels"], t["metadata"]["labels"])
    }
    assert selected == {"site-01-worker"}
    reachable: dict[str, set[int]] = {}
    for rule in spec["egress"]:
        ports = {p["port"] for p in rule["ports"]}
        for peer in rule["to"]:
            if "namespaceSelector" in peer:  # cluster DNS only
                assert ports == {53}
                continue
            for name, template in templates.items():
                if _matches(peer["podSelector"]["matchLabels"], template["metadata"]["labels"]):
                    reachable.setdefault(name, set()).update(ports)
    assert reachable == {"prefect-server": {4200}, "minio": {9000}}


def test_k8s_minio_init_matches_the_canonical_scripts(k8s: list[dict[str, Any]]) -> None:
    config = next(
        d for d in k8s if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "minio-init"
    )
    assert config["data"]["init.sh"] == (DEPLOY / "minio" / "init.sh").read_text()
    policies = {p.name for p in (DEPLOY / "minio" / "policies").glob("*.json")}
    assert policies == {"coordinator.json", "mlflow.json", "site.json"}
    assert set(config["data"]) == {"init.sh", *policies}
    for policy in sorted(policies):
        assert config["data"][policy] == (DEPLOY / "minio" / "policies" / policy).read_text()


S3_SECRETS = {
    "coordinator": ("coordinator_s3_access_key", "coordinator_s3_secret_key"),
    "mlflow": ("mlflow_s3_access_key", "mlflow_s3_secret_key"),
}


@pytest.mark.security("tenant-isolation")
def test_the_s3_init_step_scopes_the_example_federations_tenant(
    compose: dict[str, Any], k8s: list[dict[str, Any]]
) -> None:
    """s3-init / minio-init create the coordinator's identity for the tenant and the
    federation the coordinator runs (deployments/examples/mnist-demo.yaml), so its policy
    (<federation>/* and _tenants/<tenant>/*) covers what that coordinator uses."""
    services = compose["services"]
    command = _command(services["coordinator-worker"])
    config = load_federation_config(ROOT / command[-1])
    job = next(d for d in k8s if d["kind"] == "Job" and d["metadata"]["name"] == "minio-init")
    container = job["spec"]["template"]["spec"]["containers"][0]
    worker = _templates(k8s)["coordinator-worker"]["spec"]["containers"][0]
    assert (ROOT / _command(worker)[-1]).resolve() == (ROOT / command[-1]).resolve()
    for where, env in (
        ("compose s3-init", services["s3-init"]["environment"]),
        ("k8s minio-init", _k8s_env(container)),
    ):
        assert env["TENANT"] == config.tenant, where
        assert env["FEDERATION"] == config.federation, where
    script = (DEPLOY / "minio" / "init.sh").read_text()
    assert 'TENANT="${TENANT:?set TENANT}"' in script
    assert '-e "s|@TENANT@|$TENANT|g"' in script
    assert 'user "fedround-coordinator-$TENANT"' in script


@pytest.mark.security("site-credential-scope")
def test_the_mlflow_server_has_its_own_s3_identity(
    compose: dict[str, Any], k8s: list[dict[str, Any]]
) -> None:
    """The MLflow server's artifact proxy uses its own S3 key pair (policy mlflow.json:
    mlflow/artifacts/* only), never the coordinator's; each pair is held by its one user and
    by the init step that creates it."""
    services = compose["services"]
    mlflow, coordinator = services["mlflow"], services["coordinator-worker"]
    assert _compose_secret_of(mlflow, "AWS_ACCESS_KEY_ID") == S3_SECRETS["mlflow"][0]
    assert _compose_secret_of(mlflow, "AWS_SECRET_ACCESS_KEY") == S3_SECRETS["mlflow"][1]
    assert _compose_secret_of(coordinator, "FEDROUND_S3_ACCESS_KEY") == S3_SECRETS["coordinator"][0]
    assert _compose_secret_of(coordinator, "FEDROUND_S3_SECRET_KEY") == S3_SECRETS["coordinator"][1]
    for who, pair in S3_SECRETS.items():
        for secret in pair:
            assert compose["secrets"][secret]["file"] == f"./secrets/{secret}"
            holders = {n for n, s in services.items() if secret in s.get("secrets", [])}
            assert holders == {"s3-init", "mlflow" if who == "mlflow" else "coordinator-worker"}
    destination = _option(_command(mlflow), "--artifacts-destination")
    assert destination == "s3://mlflow/artifacts"

    templates = _templates(k8s)
    server = templates["mlflow"]["spec"]["containers"][0]
    assert _k8s_secret_ref(server, "AWS_ACCESS_KEY_ID") == ("mlflow-s3", S3_SECRETS["mlflow"][0])
    assert _k8s_secret_ref(server, "AWS_SECRET_ACCESS_KEY") == (
        "mlflow-s3",
        S3_SECRETS["mlflow"][1],
    )
    assert _option(_command(server), "--artifacts-destination") == destination
    worker = templates["coordinator-worker"]["spec"]["containers"][0]
    assert _k8s_secret_ref(worker, "FEDROUND_S3_ACCESS_KEY") == (
        "coordinator-s3",
        S3_SECRETS["coordinator"][0],
    )
    secrets = {d["metadata"]["name"]: d for d in k8s if d["kind"] == "Secret"}
    assert set(secrets["mlflow-s3"]["stringData"]) == set(S3_SECRETS["mlflow"])
    for name, holder in (("mlflow-s3", "mlflow"), ("coordinator-s3", "coordinator-worker")):
        users = {
            workload
            for workload, _, c in _k8s_containers(k8s)
            if any(
                e.get("valueFrom", {}).get("secretKeyRef", {}).get("name") == name
                for e in c.get("env", [])
            )
        }
        assert users == {holder}, name
    job = next(d for d in k8s if d["kind"] == "Job" and d["metadata"]["name"] == "minio-init")
    projected = next(
        v["projected"]["sources"]
        for v in job["spec"]["template"]["spec"]["volumes"]
        if "projected" in v
    )
    assert {"mlflow-s3", "coordinator-s3"} <= {source["secret"]["name"] for source in projected}


# --- authentication and TLS -------------------------------------------------------------
# Every control-plane link TLS and authenticated (deployments/README.md, "Authentication
# and TLS"); the coordinator and the sites under FEDROUND_PROFILE=production.


def _environments(
    compose: dict[str, Any], k8s: list[dict[str, Any]]
) -> Iterator[tuple[str, dict[str, str]]]:
    for name, service in compose["services"].items():
        yield f"compose {name}", _compose_env(service)
    for name, _, container in _k8s_containers(k8s):
        yield f"k8s {name}/{container['name']}", _k8s_env(container)


def _k8s_site_settings(k8s: list[dict[str, Any]]) -> SiteSettings:
    config = next(d for d in k8s if d["kind"] == "ConfigMap" and "site.yaml" in d.get("data", {}))
    return SiteSettings.model_validate(yaml.safe_load(config["data"]["site.yaml"]))


def _compose_site_settings() -> SiteSettings:
    text = (DEPLOY / "sites" / "site-01" / "site.yaml").read_text()
    return SiteSettings.model_validate(yaml.safe_load(text))


@pytest.mark.security("control-plane-auth-tls")
def test_every_control_plane_url_is_https(
    compose: dict[str, Any], k8s: list[dict[str, Any]]
) -> None:
    seen = set()
    for where, env in _environments(compose, k8s):
        for name, value in env.items():
            assert not value.startswith("http://"), f"{where}: {name}={value} is plain HTTP"
            if name in URL_ENV:
                assert value.startswith("https://"), f"{where}: {name}={value}"
                seen.add(name)
    assert seen == set(URL_ENV)  # each of them is set somewhere: the test looked at them
    for settings in (_compose_site_settings(), _k8s_site_settings(k8s)):
        assert settings.prefect_api_url is None or settings.prefect_api_url.startswith("https://")
        assert settings.object_store.secure is True


@pytest.mark.security("control-plane-auth-tls")
def test_prefect_server_serves_tls_and_needs_the_auth_string(
    compose: dict[str, Any], k8s: list[dict[str, Any]]
) -> None:
    services = compose["services"]
    server = services["prefect-server"]
    command = _command(server)
    assert command[: len(PREFECT_APP)] == PREFECT_APP, command
    assert _compose_tls_file(server, _option(command, "--ssl-certfile") or "") == TLS.cert.name
    assert _compose_tls_file(server, _option(command, "--ssl-keyfile") or "") == TLS.key.name
    secret = _compose_secret_of(server, "PREFECT_SERVER_API_AUTH_STRING")
    assert secret == "prefect_auth_string"
    assert compose["secrets"][secret]["file"] == f"./secrets/{secret}"
    for client in ("coordinator-worker", "site-01-worker"):  # the same credential
        assert _compose_secret_of(services[client], "PREFECT_API_AUTH_STRING") == secret, client
    check = " ".join(server["healthcheck"]["test"])
    ca = re.search(r"cafile='([^']+)'", check)
    assert "https://" in check and ca and _compose_tls_file(server, ca[1]) == TLS.ca_cert.name

    templates = _templates(k8s)
    spec = templates["prefect-server"]["spec"]
    container = spec["containers"][0]
    command = _command(container)
    assert command[: len(PREFECT_APP)] == PREFECT_APP, command
    assert _k8s_tls_file(spec, container, _option(command, "--ssl-certfile") or "") == TLS.cert.name
    assert _k8s_tls_file(spec, container, _option(command, "--ssl-keyfile") or "") == TLS.key.name
    ref = _k8s_secret_ref(container, "PREFECT_SERVER_API_AUTH_STRING")
    assert ref == ("prefect-auth", "prefect_auth_string")
    for client in ("coordinator-worker", "site-01-worker"):
        worker = templates[client]["spec"]["containers"][0]
        assert _k8s_secret_ref(worker, "PREFECT_API_AUTH_STRING") == ref, client


@pytest.mark.security("control-plane-auth-tls")
def test_mlflow_runs_fedround_auth_over_tls(
    compose: dict[str, Any], k8s: list[dict[str, Any]]
) -> None:
    # The app is the one fedround registers with MLflow.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["mlflow.app"]["fedround-auth"] == (
        "fedround.mlflow_plugins.auth_app:create_app"
    )
    canonical = _ini(AUTH_INI.read_text())
    assert canonical["default_permission"] == "NO_PERMISSIONS"  # tenants see only their own
    assert canonical["authorization_function"].endswith(":authenticate_request_basic_auth")
    assert "admin_password" not in canonical  # from the secret, never in the file
    auth_db = canonical["database_uri"].removeprefix("sqlite:///")
    assert canonical["database_uri"].startswith("sqlite:////")

    def check(
        command: list[str], env: dict[str, str], tls_file: Callable[[str], str | None]
    ) -> None:
        assert command[:2] == ["mlflow", "server"]
        assert _option(command, "--app-name") == "fedround-auth"
        uvicorn = shlex.split(_option(command, "--uvicorn-opts") or "")
        assert tls_file(_option(uvicorn, "--ssl-certfile") or "") == TLS.cert.name
        assert tls_file(_option(uvicorn, "--ssl-keyfile") or "") == TLS.key.name
        assert env[MLFLOW_AUTH_ADMIN_USERNAME.name] == canonical["admin_username"]
        assert "FEDROUND_MLFLOW_PROMOTERS" in env  # empty: admins promote
        assert tls_file(env["AWS_CA_BUNDLE"]) == TLS.ca_cert.name

    services = compose["services"]
    mlflow = services["mlflow"]
    check(_command(mlflow), _compose_env(mlflow), lambda p: _compose_tls_file(mlflow, p))
    for name in (MLFLOW_AUTH_ADMIN_PASSWORD.name, MLFLOW_FLASK_SERVER_SECRET_KEY.name):
        assert _compose_secret_of(mlflow, name), f"compose mlflow: {name} not from a secret"
        assert name not in mlflow["environment"]
    config = mlflow["environment"][MLFLOW_AUTH_CONFIG_PATH.name]
    assert _compose_file(mlflow, config) == "./mlflow/basic_auth.ini"
    store = _compose_file(mlflow, auth_db)
    assert store and store.split("/")[0] in compose["volumes"], "the user store is not kept"

    spec = _templates(k8s)["mlflow"]["spec"]
    container = spec["containers"][0]
    env = _k8s_env(container)
    check(_command(container), env, lambda p: _k8s_tls_file(spec, container, p))
    assert _k8s_secret_ref(container, MLFLOW_AUTH_ADMIN_PASSWORD.name) == (
        "mlflow-admin",
        "mlflow_admin_password",
    )
    assert _k8s_secret_ref(container, MLFLOW_FLASK_SERVER_SECRET_KEY.name) == (
        "mlflow-flask",
        "mlflow_flask_secret_key",
    )
    config_map = _k8s_source(spec, container, env[MLFLOW_AUTH_CONFIG_PATH.name])
    assert config_map == ("configMap", "mlflow-auth", "basic_auth.ini")
    store_source = _k8s_source(spec, container, auth_db)
    assert store_source and store_source[0] == "persistentVolumeClaim"
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["scheme"] == "HTTPS"


@pytest.mark.security("control-plane-auth-tls")
def test_minio_serves_tls_from_a_certs_dir(
    compose: dict[str, Any], k8s: list[dict[str, Any]]
) -> None:
    expected = {
        "public.crt": TLS.cert.name,
        "private.key": TLS.key.name,
        "CAs/ca.crt": TLS.ca_cert.name,
    }
    minio = compose["services"]["minio"]
    certs = _option(_command(minio), "--certs-dir")
    assert certs
    for name, tls_name in expected.items():
        assert _compose_tls_file(minio, f"{certs}/{name}") == tls_name, name
    assert minio["environment"]["MINIO_BROWSER_REDIRECT_URL"].startswith("https://")
    check = " ".join(minio["healthcheck"]["test"])
    assert "https://localhost:9000" in check and "certs/CAs" in check, check

    spec = _templates(k8s)["minio"]["spec"]
    container = spec["containers"][0]
    certs = _option(_command(container), "--certs-dir")
    assert certs
    for name, tls_name in expected.items():
        assert _k8s_tls_file(spec, container, f"{certs}/{name}") == tls_name, name


def test_k8s_http_probes_use_https(k8s: list[dict[str, Any]]) -> None:
    probed = set()
    for name, _, container in _k8s_containers(k8s):
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            if "httpGet" in container.get(probe, {}):
                assert container[probe]["httpGet"].get("scheme") == "HTTPS", f"{name} {probe}"
                probed.add(name)
    assert probed == SERVERS


@pytest.mark.security("control-plane-auth-tls")
def test_fedround_runs_under_the_production_profile(
    compose: dict[str, Any], k8s: list[dict[str, Any]]
) -> None:
    found = set()
    for name, service in compose["services"].items():
        if _command(service)[:1] == ["fedround"]:
            env = _compose_env(service)
            assert profile_from_env(env) == "production", f"compose {name}"
            assert env["FEDROUND_PROFILE"] == "production"
            found.add(f"compose {name}")
    for name, _, container in _k8s_containers(k8s):
        if _command(container)[:1] == ["fedround"]:
            env = _k8s_env(container)
            assert profile_from_env(env) == "production", f"k8s {name}"
            assert env["FEDROUND_PROFILE"] == "production"
            found.add(f"k8s {name}")
    assert found >= {
        "compose coordinator-worker",
        "compose site-01-worker",
        "k8s coordinator-worker",
        "k8s site-01-worker",
    }
    for where, env in _environments(compose, k8s):
        assert env.get("FEDROUND_INSECURE_DEV", "") == "", f"{where} turns the checks off"
        for name in ("MLFLOW_TRACKING_INSECURE_TLS", "PREFECT_API_TLS_INSECURE_SKIP_VERIFY"):
            assert name not in env, f"{where} sets {name}"


@pytest.mark.security("control-plane-auth-tls")
def test_the_server_key_reaches_only_the_servers(
    compose: dict[str, Any], k8s: list[dict[str, Any]]
) -> None:
    for name, service in compose["services"].items():
        mounted = _compose_tls_mounted(service)
        assert TLS.ca_key.name not in mounted, f"compose {name} gets the CA's key"
        if name in SERVERS:
            assert {TLS.cert.name, TLS.key.name} <= mounted, f"compose {name}"
        else:
            assert mounted <= {TLS.ca_cert.name}, f"compose {name} gets {mounted}"
    pods = {name: _k8s_tls_in_pod(template["spec"]) for name, template in _templates(k8s).items()}
    for name, held in pods.items():
        if name in SERVERS:
            assert {TLS.cert.name, TLS.key.name} <= held, f"k8s {name}"
        else:
            assert held <= {TLS.ca_cert.name}, f"k8s {name} gets {held}"


@pytest.mark.security("control-plane-auth-tls")
def test_compose_coordinator_and_site_pass_the_production_check(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    coordinator, site = services["coordinator-worker"], services["site-01-worker"]
    assert _compose_file(site, "/site/site.yaml") == "./sites/site-01/site.yaml"
    parties = {"coordinator": coordinator, "site": site}
    _assert_production_links(
        "compose",
        _compose_env(coordinator),
        _compose_env(site),
        _compose_site_settings(),
        lambda who, path: _compose_tls_file(parties[who], path) == TLS.ca_cert.name,
    )


@pytest.mark.security("control-plane-auth-tls")
def test_k8s_coordinator_and_site_pass_the_production_check(k8s: list[dict[str, Any]]) -> None:
    templates = _templates(k8s)
    parties = {
        who: (templates[name]["spec"], templates[name]["spec"]["containers"][0])
        for who, name in (("coordinator", "coordinator-worker"), ("site", "site-01-worker"))
    }
    site_spec, site_container = parties["site"]
    config = _k8s_source(site_spec, site_container, "/site/site.yaml")
    assert config == ("configMap", "site-01-settings", "site.yaml")
    _assert_production_links(
        "k8s",
        _k8s_env(parties["coordinator"][1]),
        _k8s_env(site_container),
        _k8s_site_settings(k8s),
        lambda who, path: _k8s_tls_file(*parties[who], path) == TLS.ca_cert.name,
    )


def test_the_certificates_cover_every_host_clients_use(
    compose: dict[str, Any], k8s: list[dict[str, Any]], tmp_path: Path
) -> None:
    """The `fedround certs init` commands of the README, run: their certificates name every
    host a client or health check of the manifests connects to."""

    def hosts(env: dict[str, str], extra: list[str]) -> set[str]:
        found = {urlsplit(v).hostname for v in env.values() if v.startswith("https://")}
        endpoints = [env.get("FEDROUND_S3_ENDPOINT", ""), *extra]
        found |= {urlsplit(f"//{e}").hostname for e in endpoints if e}
        return {h for h in found if h}

    compose_hosts: set[str] = set()
    for service in compose["services"].values():
        check = " ".join(service.get("healthcheck", {}).get("test", []))
        compose_hosts |= hosts(_compose_env(service), re.findall(r"https://([^/']+)", check))
    compose_hosts |= hosts({}, [_compose_site_settings().object_store.endpoint or ""])
    k8s_hosts: set[str] = set()
    for _, _, container in _k8s_containers(k8s):
        k8s_hosts |= hosts(_k8s_env(container), [])
    k8s_hosts |= hosts({}, [_k8s_site_settings(k8s).object_store.endpoint or ""])
    assert {"prefect-server", "mlflow", "minio"} <= compose_hosts & k8s_hosts

    commands = _readme_cert_hosts()
    assert len(commands) >= 2
    covered = []
    for i, names in enumerate(commands):
        files = make_certificates(tmp_path / str(i), sorted(names))
        covered.append(set(certificate_hosts(files.cert)))
    assert any(compose_hosts <= c for c in covered), f"no README certificate covers {compose_hosts}"
    assert any(k8s_hosts <= c and any(".svc" in h for h in c) for c in covered), k8s_hosts
    header = (DEPLOY / "compose.yaml").read_text().split("\nname:")[0].replace("\\\n#", " ")
    header_hosts = set(re.findall(r"--host\s+(\S+)", header))
    assert compose_hosts <= header_hosts, "compose.yaml's own certs command misses hosts"


@pytest.mark.security("control-plane-auth-tls")
def test_mlflow_users_creates_the_coordinators_identity(
    compose: dict[str, Any], k8s: list[dict[str, Any]]
) -> None:
    """The coordinator's MLflow user is created by the mlflow-users step, as the admin the
    server creates, with the password the coordinator holds; nobody else gets the admin's."""
    create_users = _load_create_users()
    services = compose["services"]
    users, mlflow, coordinator = (
        services["mlflow-users"],
        services["mlflow"],
        services["coordinator-worker"],
    )
    command = _command(users)
    assert command[0] == "python" and _compose_file(users, command[1]) == "./mlflow/create-users.py"
    user = coordinator["environment"]["MLFLOW_TRACKING_USERNAME"]
    assert user in command[2:]
    assert _compose_secret_of(users, create_users.password_variable(user)) == (
        _compose_secret_of(coordinator, "MLFLOW_TRACKING_PASSWORD")
    )
    admin = _compose_secret_of(mlflow, MLFLOW_AUTH_ADMIN_PASSWORD.name)
    assert admin and _compose_secret_of(users, "MLFLOW_TRACKING_PASSWORD") == admin
    env = _compose_env(users)
    assert env["MLFLOW_TRACKING_USERNAME"] == _compose_env(mlflow)[MLFLOW_AUTH_ADMIN_USERNAME.name]
    assert env["MLFLOW_TRACKING_URI"] == coordinator["environment"]["MLFLOW_TRACKING_URI"]
    assert _compose_tls_file(users, env["MLFLOW_TRACKING_SERVER_CERT_PATH"]) == TLS.ca_cert.name
    assert users["depends_on"]["mlflow"]["condition"] == "service_healthy"
    assert users["restart"] == "no"
    condition = coordinator["depends_on"]["mlflow-users"]["condition"]
    assert condition == "service_completed_successfully"
    holders = {n for n, s in services.items() if admin in s.get("secrets", [])}
    assert holders == {"mlflow", "mlflow-users"}

    templates = _templates(k8s)
    job = next(d for d in k8s if d["kind"] == "Job" and d["metadata"]["name"] == "mlflow-users")
    spec = job["spec"]["template"]["spec"]
    container = spec["containers"][0]
    command = _command(container)
    assert _k8s_source(spec, container, command[1]) == (
        "configMap",
        "mlflow-users",
        "create-users.py",
    )
    worker = templates["coordinator-worker"]["spec"]["containers"][0]
    user = _k8s_env(worker)["MLFLOW_TRACKING_USERNAME"]
    assert user in command[2:]
    assert _k8s_secret_ref(container, create_users.password_variable(user)) == (
        _k8s_secret_ref(worker, "MLFLOW_TRACKING_PASSWORD")
    )
    server = templates["mlflow"]["spec"]["containers"][0]
    admin_ref = _k8s_secret_ref(server, MLFLOW_AUTH_ADMIN_PASSWORD.name)
    assert admin_ref and _k8s_secret_ref(container, "MLFLOW_TRACKING_PASSWORD") == admin_ref
    admin_user = _k8s_env(server)[MLFLOW_AUTH_ADMIN_USERNAME.name]
    assert _k8s_env(container)["MLFLOW_TRACKING_USERNAME"] == admin_user
    ca_path = _k8s_env(container)["MLFLOW_TRACKING_SERVER_CERT_PATH"]
    assert _k8s_tls_file(spec, container, ca_path) == TLS.ca_cert.name
    holders = {
        name
        for name, _, c in _k8s_containers(k8s)
        if any(
            e.get("valueFrom", {}).get("secretKeyRef", {}).get("name") == admin_ref[0]
            for e in c.get("env", [])
        )
    }
    assert holders == {"mlflow", "mlflow-users"}
    # The network policy in front of MLflow lets the Job in.
    policy = next(
        d for d in k8s if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "mlflow-ingress"
    )
    peers = [
        p["podSelector"]["matchLabels"]
        for p in policy["spec"]["ingress"][0]["from"]
        if "podSelector" in p
    ]
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert any(_matches(peer, labels) for peer in peers)


def test_k8s_copies_match_the_canonical_files(k8s: list[dict[str, Any]]) -> None:
    maps = {d["metadata"]["name"]: d["data"] for d in k8s if d["kind"] == "ConfigMap"}
    assert maps["mlflow-auth"]["basic_auth.ini"] == AUTH_INI.read_text()
    assert maps["mlflow-users"]["create-users.py"] == CREATE_USERS.read_text()


@pytest.mark.security("secrets-in-image")
def test_tls_files_stay_out_of_git() -> None:
    paths = [f"deployments/tls/{name}" for name in sorted(TLS_NAMES)]
    ignored = subprocess.run(
        ["git", "check-ignore", "--no-index", *paths], cwd=ROOT, capture_output=True, text=True
    ).stdout.split()
    assert ignored == paths
    tracked = subprocess.run(
        ["git", "ls-files", "deployments/tls"], cwd=ROOT, capture_output=True, text=True
    ).stdout.split()
    assert tracked == []


# --- create-users.py against an HTTPS server answering like MLflow's users/create --------


class _FakeMLflow(BaseHTTPRequestHandler):
    """``POST /api/2.0/mlflow/users/create`` as MLflow's basic-auth app answers it."""

    admin: tuple[str, str] = ("admin", "")
    users: dict[str, str] = {}  # noqa: RUF012 (set per server)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        expected = base64.b64encode(":".join(self.admin).encode()).decode()
        if self.path != "/api/2.0/mlflow/users/create":
            self._answer(404, {"error_code": "ENDPOINT_NOT_FOUND", "message": "no"})
        elif self.headers.get("Authorization") != f"Basic {expected}":
            self._answer(401, None)
        else:
            request = json.loads(body)
            name, password = request["username"], request["password"]
            if name in self.users:
                message = f"User (username={name}) already exists. Error: (IntegrityError)"
                self._answer(400, {"error_code": "RESOURCE_ALREADY_EXISTS", "message": message})
            elif len(password) < 12:
                message = "Password must be at least 12 characters."
                self._answer(400, {"error_code": "INVALID_PARAMETER_VALUE", "message": message})
            else:
                self.users[name] = password
                self._answer(200, {"user": {"username": name, "is_admin": False}})

    def _answer(self, status: int, payload: object) -> None:
        data = b"Unauthorized" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass


@pytest.fixture
def fake_mlflow(tmp_path: Path) -> Iterator[tuple[str, Path, dict[str, str]]]:
    files = make_certificates(tmp_path / "tls", ["127.0.0.1"])
    users: dict[str, str] = {}
    handler = type(
        "Handler", (_FakeMLflow,), {"admin": ("admin", "Adm1n-pass-Wq9z-long"), "users": users}
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(files.cert, files.key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}", files.ca_cert, users
    finally:
        server.shutdown()
        server.server_close()


def _create_users(env: dict[str, str], *users: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return subprocess.run(
        [sys.executable, str(CREATE_USERS), *users],
        env=base | {"MLFLOW_USERS_WAIT_S": "0"} | env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_create_users_creates_once_and_never_prints_a_password(
    fake_mlflow: tuple[str, Path, dict[str, str]],
) -> None:
    url, ca, users = fake_mlflow
    coordinator_password = "C00rd-pass-Hy7u-long"
    env = {
        "MLFLOW_TRACKING_URI": url,
        "MLFLOW_TRACKING_USERNAME": "admin",
        "MLFLOW_TRACKING_PASSWORD": "Adm1n-pass-Wq9z-long",
        "MLFLOW_TRACKING_SERVER_CERT_PATH": str(ca),
        "MLFLOW_PASSWORD_COORDINATOR": coordinator_password,
    }
    secrets = (env["MLFLOW_TRACKING_PASSWORD"], coordinator_password)

    def outcome(done: subprocess.CompletedProcess[str]) -> str:
        assert not any(secret in done.stdout + done.stderr for secret in secrets)
        if done.returncode:
            assert done.stdout == "" and done.stderr.count("\n") == 1, done.stderr
        return done.stdout + done.stderr

    created = _create_users(env, "coordinator")
    assert created.returncode == 0 and "'coordinator' created" in outcome(created)
    assert users == {"coordinator": coordinator_password}
    again = _create_users(env, "coordinator")  # exists already: done
    assert again.returncode == 0 and "'coordinator' already exists" in outcome(again)

    refused = _create_users(
        env | {"MLFLOW_TRACKING_PASSWORD": "Wr0ng-pass-Lk3j-long"}, "coordinator"
    )
    assert refused.returncode == 1 and "HTTP 401" in outcome(refused)
    untrusted = _create_users(env | {"MLFLOW_TRACKING_SERVER_CERT_PATH": ""}, "coordinator")
    assert untrusted.returncode == 1 and "TLS" in outcome(untrusted)
    plain = _create_users(
        env | {"MLFLOW_TRACKING_URI": url.replace("https", "http")}, "coordinator"
    )
    assert plain.returncode == 1 and "https://" in outcome(plain)
    short = _create_users(env | {"MLFLOW_PASSWORD_BOB": "short"}, "bob")
    assert short.returncode == 1 and "MLFLOW_PASSWORD_BOB" in outcome(short)
    missing = _create_users(env, "alice")
    assert missing.returncode == 1 and "MLFLOW_PASSWORD_ALICE is not set" in outcome(missing)
    down = _create_users(env | {"MLFLOW_TRACKING_URI": "https://127.0.0.1:9"}, "coordinator")
    assert down.returncode == 1 and "did not answer" in outcome(down)
    assert users == {"coordinator": coordinator_password}
