"""Config revisions with real git and DVC: a federation-config repository whose configs
and suites live in a DVC-tracked folder pushed to the S3 server, cloned and pulled fresh;
the revision is recorded exactly and a modified config is refused unless allowed."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from minio import Minio

from fedround.tasks.config_versioning import DirtyConfig, config_revision
from fedround.tasks.run_lineage import precheck
from tests.services import Endpoints

from .dvc_repo import SUITE, fresh_clone, make_config_repo, sh

CONFIG = (
    "federation: dvc-fed\ntenant: acme\nrounds: 1\n"
    "contract: contracts/mnist-site-data.json\nsites: [{name: a}, {name: b}]\n"
)


@pytest.fixture(scope="module")
def clone(s3_service: Endpoints, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("config-repo")
    origin, bucket = make_config_repo(root, s3_service, CONFIG)
    return fresh_clone(origin, root / "clone", s3_service), bucket


def test_pulled_config_records_git_commit_and_dvc_hash(
    clone: tuple[Path, str], s3_service: Endpoints
) -> None:
    repo, bucket = clone
    config = repo / "federation" / "federation.yaml"
    revision = config_revision(config, repo / "federation" / "contracts" / SUITE.name)
    head = sh("git", "rev-parse", "HEAD", cwd=repo)
    md5 = hashlib.md5(config.read_bytes()).hexdigest()
    assert not revision.dirty and revision.problems == []
    assert revision.config.tracked_by == "dvc" and revision.suite.tracked_by == "dvc"
    assert revision.git_commit == head
    assert revision.config.dvc_md5 == md5
    assert revision.suite.dvc_md5 == hashlib.md5(SUITE.read_bytes()).hexdigest()
    assert revision.revision == f"git:{head[:12]} dvc:{md5[:12]}"
    assert revision.dvc_folder_md5 and revision.dvc_folder_md5.endswith(".dir")
    # the recorded hash names the object that holds this exact config in the DVC remote
    assert revision.config.dvc_url == f"s3://{bucket}/configs/files/md5/{md5[:2]}/{md5[2:]}"
    client = Minio(
        s3_service.s3_endpoint,
        access_key=s3_service.admin_access_key,
        secret_key=s3_service.admin_secret_key,
        secure=False,
        region=s3_service.s3_region,
    )
    stored = client.get_object(bucket, f"configs/files/md5/{md5[:2]}/{md5[2:]}").read()
    assert stored == config.read_bytes()
    tags = revision.tags()
    assert tags["fedround.config_git_commit"] == head
    assert tags["fedround.config_dvc_md5"] == md5
    assert tags["fedround.config_dirty"] == "false"


def test_modified_dvc_tracked_config_is_refused_unless_allowed(
    clone: tuple[Path, str], tmp_path: Path
) -> None:
    repo, _ = clone
    config = repo / "federation" / "federation.yaml"
    suite = repo / "federation" / "contracts" / SUITE.name
    original = config.read_text()
    config.write_text(original.replace("rounds: 1", "rounds: 2"))
    try:
        with pytest.raises(DirtyConfig) as refused:
            precheck(config, allow_dirty=False)
        message = str(refused.value)
        assert "federation/federation.yaml modified since the last `dvc add`" in message
        assert "--allow-dirty" in message
        allowed = config_revision(config, suite, allow_dirty=True)
        assert allowed.dirty and allowed.allow_dirty
        assert allowed.revision.endswith("+dirty")
        assert allowed.tags()["fedround.config_dirty"] == "true"
        assert allowed.config.dvc_md5 == hashlib.md5(config.read_bytes()).hexdigest()
    finally:
        config.write_text(original)
    assert not config_revision(config, suite).dirty  # back to the committed content


def test_git_tracked_config_changes_and_untracked_files_are_refused(tmp_path: Path) -> None:
    repo = tmp_path / "plain-git"
    (repo / "contracts").mkdir(parents=True)
    config, suite = repo / "fed.yaml", repo / "contracts" / SUITE.name
    config.write_text(CONFIG)
    suite.write_bytes(SUITE.read_bytes())
    sh("git", "init", "-q", "-b", "main", cwd=repo)
    with pytest.raises(DirtyConfig, match=r"fed.yaml is not committed to git"):
        config_revision(config, suite)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q", "-m", "c", cwd=repo)
    clean = config_revision(config, suite)
    assert clean.config.tracked_by == "git" and clean.config.dvc_md5 is None
    assert clean.revision == f"git:{sh('git', 'rev-parse', 'HEAD', cwd=repo)[:12]}"
    suite.write_text(suite.read_text().replace("mnist", "MNIST"))
    with pytest.raises(
        DirtyConfig, match=r"contracts/mnist-site-data.json has changes not committed"
    ):
        config_revision(config, suite)


def test_config_outside_git_is_recorded_as_untracked(tmp_path: Path) -> None:
    config, suite = tmp_path / "fed.yaml", tmp_path / "suite.json"
    config.write_text(CONFIG)
    suite.write_bytes(SUITE.read_bytes())
    revision = config_revision(config, suite)
    assert not revision.dirty and revision.git_commit is None
    assert revision.config.tracked_by == "untracked"
    assert (
        revision.revision
        == f"untracked sha256:{hashlib.sha256(config.read_bytes()).hexdigest()[:12]}"
    )
