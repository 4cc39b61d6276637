"""A user's federation-config repository: git + DVC, configs and contract suites in a
DVC-tracked folder, the DVC remote on the real S3 server (test helper, not a test)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from pathlib import Path

from minio import Minio

from tests.services import Endpoints

DVC = str(Path(sys.executable).with_name("dvc"))
REPO_ROOT = Path(__file__).resolve().parents[2]
SUITE = REPO_ROOT / "deployments" / "examples" / "contracts" / "mnist-site-data.json"


def sh(*command: str, cwd: Path) -> str:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{' '.join(command)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout.strip()


def _credentials(repo: Path, services: Endpoints) -> None:
    """The remote's keys go to .dvc/config.local: never into git."""
    for name, value in (
        ("access_key_id", services.admin_access_key),
        ("secret_access_key", services.admin_secret_key),
    ):
        sh(DVC, "remote", "modify", "--local", "store", name, value, cwd=repo)


def make_config_repo(root: Path, services: Endpoints, config_yaml: str) -> tuple[Path, str]:
    """``root/origin``: ``federation/{federation.yaml,contracts/…}`` tracked by DVC and
    pushed to a fresh bucket on the S3 server; returns the repo and the bucket."""
    bucket = f"dvc-{uuid.uuid4().hex[:10]}"
    client = Minio(
        services.s3_endpoint,
        access_key=services.admin_access_key,
        secret_key=services.admin_secret_key,
        secure=False,
        region=services.s3_region,
    )
    client.make_bucket(bucket)
    repo = root / "origin"
    (repo / "federation" / "contracts").mkdir(parents=True)
    (repo / "federation" / "federation.yaml").write_text(config_yaml)
    shutil.copy(SUITE, repo / "federation" / "contracts" / SUITE.name)
    sh("git", "init", "-q", "-b", "main", cwd=repo)
    sh("git", "config", "user.email", "ml@example.org", cwd=repo)
    sh("git", "config", "user.name", "ML engineer", cwd=repo)
    sh(DVC, "init", "-q", cwd=repo)
    sh(DVC, "config", "core.analytics", "false", cwd=repo)
    sh(DVC, "add", "-q", "federation", cwd=repo)
    sh(DVC, "remote", "add", "-d", "store", f"s3://{bucket}/configs", cwd=repo)
    sh(DVC, "remote", "modify", "store", "endpointurl", f"http://{services.s3_endpoint}", cwd=repo)
    sh(DVC, "remote", "modify", "store", "region", services.s3_region, cwd=repo)
    _credentials(repo, services)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-q", "-m", "federation config and contracts", cwd=repo)
    sh(DVC, "push", "-q", cwd=repo)
    return repo, bucket


def fresh_clone(origin: Path, destination: Path, services: Endpoints) -> Path:
    """``git clone`` + the remote's keys (kept out of git) + ``dvc pull``."""
    sh("git", "clone", "-q", str(origin), str(destination), cwd=origin.parent)
    assert not (destination / "federation").exists()  # content lives in the DVC remote
    _credentials(destination, services)
    sh(DVC, "pull", "-q", cwd=destination)
    return destination
