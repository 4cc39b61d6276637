"""Which exact revision of a federation config (and its data-contract suite) a run used.

Federation configs and suites live in a git repository, either committed to git directly
(the examples in this repository) or in a DVC-tracked folder whose content is pushed to a
DVC remote on the S3 server (a federation-config repository; ``dvc pull`` restores it).
:func:`config_revision` records, for the config and the suite:

- the git commit (``HEAD``) of the repository that holds them;
- for DVC-tracked files, the DVC content hash (md5, the key in the DVC remote), the
  tracked folder's hash and the file's URL in the remote;
- the SHA-256 of the bytes the run actually read;
- whether anything was uncommitted: a file modified since the commit, not committed at
  all, modified since ``dvc add``, or a ``.dvc`` file not committed to git.

A dirty config is refused (:class:`DirtyConfig`) unless ``allow_dirty`` is given; the run
then records ``dirty`` and what was wrong. A config outside any git repository cannot be
dirty against anything: it is accepted, recorded as ``untracked`` with its SHA-256, and
a warning says that its revision is not reproducible.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from fedround.tasks.core.errors import ConfigError

log = logging.getLogger(__name__)


class DirtyConfig(ConfigError):
    """The config or suite differs from what is committed; the message says how."""


class FileRevision(BaseModel):
    model_config = ConfigDict(frozen=True)

    path: str
    sha256: str
    tracked_by: Literal["git", "dvc", "untracked"]
    dvc_md5: str | None = None
    dvc_file: str | None = None
    dvc_url: str | None = None
    problems: list[str] = Field(default_factory=list)


class ConfigRevision(BaseModel):
    """The revision a run used; ``revision`` is the short form recorded everywhere."""

    model_config = ConfigDict(frozen=True)

    config: FileRevision
    suite: FileRevision
    git_root: str | None = None
    git_commit: str | None = None
    git_remote: str | None = None
    dvc_folder_md5: str | None = None
    dirty: bool = False
    allow_dirty: bool = False

    @property
    def problems(self) -> list[str]:
        return [*self.config.problems, *self.suite.problems]

    @property
    def revision(self) -> str:
        if self.git_commit is None:
            return f"untracked sha256:{self.config.sha256[:12]}"
        text = f"git:{self.git_commit[:12]}"
        if self.config.dvc_md5:
            text += f" dvc:{self.config.dvc_md5[:12]}"
        return text + ("+dirty" if self.dirty else "")

    def tags(self) -> dict[str, str]:
        """MLflow tags (run and model version) describing this revision."""
        tags = {
            "fedround.config_revision": self.revision,
            "fedround.config_tracked_by": self.config.tracked_by,
            "fedround.config_dirty": str(self.dirty).lower(),
            "fedround.config_sha256": self.config.sha256,
            "fedround.contract_sha256": self.suite.sha256,
        }
        optional = {
            "fedround.config_git_commit": self.git_commit,
            "fedround.config_git_remote": self.git_remote,
            "fedround.config_dvc_md5": self.config.dvc_md5,
            "fedround.contract_dvc_md5": self.suite.dvc_md5,
            "fedround.config_dvc_folder_md5": self.dvc_folder_md5,
            "fedround.config_dvc_url": self.config.dvc_url,
        }
        tags.update({k: v for k, v in optional.items() if v})
        if self.dirty:
            tags["fedround.config_dirty_reasons"] = "; ".join(self.problems)[:5000]
        return tags


def _git(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["git", "-C", str(root), *args], capture_output=True, text=True, check=False
    )


def _git_root(path: Path) -> Path | None:
    try:
        done = _git(path.parent, "rev-parse", "--show-toplevel")
    except FileNotFoundError:  # no git installed
        return None
    return Path(done.stdout.strip()).resolve() if done.returncode == 0 else None


def _dvc_file(path: Path, root: Path) -> Path | None:
    """The ``.dvc`` file tracking ``path`` (or a folder holding it), if any."""
    for candidate in [path, *path.parents]:
        if candidate == root or root not in candidate.parents:
            return None
        dvc_file = candidate.with_name(candidate.name + ".dvc")
        if dvc_file.is_file():
            return dvc_file
    return None


def _dvc_outs_md5(dvc_file: Path) -> str | None:
    try:
        outs = yaml.safe_load(dvc_file.read_text()).get("outs") or []
        return str(outs[0]["md5"]) if outs else None
    except (OSError, yaml.YAMLError, AttributeError, KeyError, TypeError):
        return None


def _file_revision(path: Path, root: Path | None, data: bytes) -> FileRevision:
    sha256 = hashlib.sha256(data).hexdigest()
    if root is None:
        return FileRevision(path=str(path), sha256=sha256, tracked_by="untracked")
    relative = path.relative_to(root).as_posix()
    dvc_file = _dvc_file(path, root)
    if dvc_file is None:
        problems = []
        if _git(root, "ls-files", "--error-unmatch", "--", relative).returncode != 0:
            problems.append(f"{relative} is not committed to git")
        elif _git(root, "status", "--porcelain", "--", relative).stdout.strip():
            problems.append(f"{relative} has changes not committed to git")
        return FileRevision(path=relative, sha256=sha256, tracked_by="git", problems=problems)

    from dvc.repo import Repo

    dvc_relative = dvc_file.relative_to(root).as_posix()
    problems = []
    if _git(root, "ls-files", "--error-unmatch", "--", dvc_relative).returncode != 0:
        problems.append(f"{dvc_relative} is not committed to git")
    elif _git(root, "status", "--porcelain", "--", dvc_relative).stdout.strip():
        problems.append(f"{dvc_relative} has changes not committed to git")
    with Repo(str(root)) as repo:
        status = repo.data_status(targets=[relative], granular=True)
    changed = {
        f"{kind} since the last `dvc add`/`dvc commit`"
        for kind, paths in status.get("uncommitted", {}).items()
        if relative in paths
    } | {
        f"{kind} in DVC but not committed to git"
        for kind, paths in status.get("committed", {}).items()
        if relative in paths
    }
    problems += [f"{relative} {what}" for what in sorted(changed)]
    url = None
    try:
        import dvc.api

        url = dvc.api.get_url(relative, repo=str(root))
    except Exception as exc:  # no remote configured: the hash is still recorded
        log.debug("no DVC remote URL for %s: %s", relative, exc)
    return FileRevision(
        path=relative,
        sha256=sha256,
        tracked_by="dvc",
        dvc_md5=hashlib.md5(data).hexdigest(),  # DVC 3 hashes the raw bytes
        dvc_file=dvc_relative,
        dvc_url=url,
        problems=problems,
    )


def config_revision(
    config_path: Path, suite_path: Path, allow_dirty: bool = False
) -> ConfigRevision:
    """Record the revision of a config and its suite; refuse a dirty one unless allowed."""
    config_path, suite_path = config_path.resolve(), suite_path.resolve()
    root = _git_root(config_path)
    config = _file_revision(config_path, root, config_path.read_bytes())
    suite_root = root if root is not None and root in suite_path.parents else None
    suite = _file_revision(suite_path, suite_root, suite_path.read_bytes())
    if root is not None and suite_root is None:
        suite = suite.model_copy(
            update={"problems": [f"{suite_path} lies outside the config's repository {root}"]}
        )
    commit = remote = None
    if root is not None:
        head = _git(root, "rev-parse", "--verify", "HEAD")
        commit = head.stdout.strip() if head.returncode == 0 else None
        if commit is None:
            config = config.model_copy(
                update={"problems": [*config.problems, f"the repository {root} has no commit"]}
            )
        origin = _git(root, "remote", "get-url", "origin")
        remote = origin.stdout.strip() if origin.returncode == 0 else None
    folder_md5 = None
    if config.dvc_file and root is not None:
        folder_md5 = _dvc_outs_md5(root / config.dvc_file)
    revision = ConfigRevision(
        config=config,
        suite=suite,
        git_root=str(root) if root else None,
        git_commit=commit,
        git_remote=remote,
        dvc_folder_md5=folder_md5,
        dirty=bool(config.problems or suite.problems),
        allow_dirty=allow_dirty,
    )
    if root is None:
        log.warning(
            "config %s is not in a git repository: recorded as %s, its revision cannot be "
            "reproduced later; keep federation configs in git (or a DVC-tracked folder)",
            config_path,
            revision.revision,
        )
    if revision.dirty and not allow_dirty:
        raise DirtyConfig(
            f"refusing to start from an uncommitted config: {'; '.join(revision.problems)}. "
            "Commit it (git commit; for a DVC-tracked folder: dvc add, git commit, dvc push), "
            "or pass --allow-dirty to run anyway (the run is then recorded as dirty)."
        )
    if revision.dirty:
        log.warning("running from a dirty config (--allow-dirty): %s", "; ".join(revision.problems))
    return revision
