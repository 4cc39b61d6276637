"""Production manifests (deployments/compose.yaml, deployments/k8s/): no Docker engine or
cluster runs here, so they are parsed, cross-checked and (k8s) validated against the
Kubernetes JSON schemas shipped in the ``kubernetes-validate`` wheel, offline."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedround.site_workers.settings import SiteSettings
from fedround.tasks.core.config import load_federation_config

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


# --- compose ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return data


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
            if source.startswith("./"):
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
    assert coordinator["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert coordinator["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert coordinator["FEDROUND_S3_ENDPOINT"] == "minio:9000"
    assert (ROOT / services["coordinator-worker"]["command"][-1]).exists()


def test_compose_sites_reach_only_prefect_and_minio(compose: dict[str, Any]) -> None:
    services = compose["services"]
    on_sites = {n for n, s in services.items() if "sites" in s.get("networks", [])}
    assert on_sites == {"prefect-server", "minio", "site-01-worker"}
    site = services["site-01-worker"]
    assert site["networks"] == ["sites"]
    assert site["command"] == ["fedround", "site", "start", "--config", "/site/site.yaml"]
    assert all(mount.endswith(":ro") for mount in site["volumes"])
    assert all(secret.startswith("site_site-01_") for secret in site["secrets"])
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
    assert refs and set(refs) == {"site-01-s3"}  # its own keys, nothing of the coordinator's


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
    for policy in ("coordinator.json", "site.json"):
        assert config["data"][policy] == (DEPLOY / "minio" / "policies" / policy).read_text()
