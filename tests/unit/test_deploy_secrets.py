"""Secrets stay out of the fedround image, and placeholder secrets stop the services.

* ``.dockerignore`` (the build context of deployments/Dockerfile is the repository root)
  keeps out what ``deployments/make-secrets.sh`` writes, the sites' settings, state,
  virtual environments and ``.git``, and lets in the code the image installs. It is read
  with a port of Docker's own matcher (moby/patternmatcher: anchored patterns, ``*`` stops
  at ``/``, ``**`` spans folders, a matching folder takes its contents, last match wins),
  itself checked against cases from Docker's test table. Git's rules (``pathspec``) differ
  exactly where an allowlist depends on them, so they are not used here.
* ``CoordinatorSettings.from_env`` and ``load_site_settings`` refuse placeholder or missing
  credentials with a :class:`ConfigError` naming the setting, never its value, unless
  ``FEDROUND_INSECURE_DEV=1`` / ``insecure_dev: true`` (a warning at every start then);
  the embedded default and the credentials the local stack and make-secrets.sh generate
  pass.
* ``deployments/docker-entrypoint.sh`` and ``deployments/minio/init.sh`` refuse them too.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
import shutil
import stat
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from fedround.flows.services import s3 as stack_s3
from fedround.flows.services.stack import Endpoints
from fedround.site_workers.settings import SiteSettings, load_site_settings, write_site_settings
from fedround.tasks.core.errors import ConfigError
from fedround.tasks.object_store import ObjectStoreSettings
from fedround.tasks.runtime import CoordinatorSettings

pytestmark = pytest.mark.security("secrets-in-image")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deployments"
PACKAGES = ("api", "flows", "tasks", "site_workers", "mlflow_plugins")
PLACEHOLDERS = ("REPLACE_ME", "CHANGEME", "changeme", "password", "minioadmin")
# A value shaped like a real secret: it must never appear in a message.
REAL_SECRET = "Qm9vdHN0cmFwLXNlY3JldC0xNzI5"
CREDENTIAL_ENV = (
    "FEDROUND_OBJECT_STORE",
    "FEDROUND_S3_ACCESS_KEY",
    "FEDROUND_S3_SECRET_KEY",
    "FEDROUND_INSECURE_DEV",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "PREFECT_API_KEY",
)
needs_sh = pytest.mark.skipif(shutil.which("sh") is None, reason="needs a POSIX sh")
needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


# --- Docker's .dockerignore rules, ported from moby/patternmatcher ---------------------


@dataclass(frozen=True)
class DockerPattern:
    """One line of a .dockerignore, matched the way ``patternmatcher.Pattern.match`` does."""

    cleaned: str
    exclusion: bool
    kind: str  # exact | prefix | suffix | regexp
    regex: re.Pattern[str] | None

    @classmethod
    def parse(cls, line: str) -> DockerPattern:
        """A pattern as ``ignorefile.ReadAll`` and ``patternmatcher.New`` leave it."""
        exclusion = line.startswith("!")
        text = line[1:].strip() if exclusion else line
        text = posixpath.normpath(text)
        if len(text) > 1 and text.startswith("/"):
            text = text[1:]
        kind, regex = cls._compile(text)
        return cls(text, exclusion, kind, regex)

    @staticmethod
    def _compile(pattern: str) -> tuple[str, re.Pattern[str] | None]:
        regex, kind, pos, index = "^", "exact", 0, 0
        while pos < len(pattern):
            char = pattern[pos]
            pos += 1
            if char == "*":
                if pos < len(pattern) and pattern[pos] == "*":
                    pos += 1
                    if pos < len(pattern) and pattern[pos] == "/":
                        pos += 1
                    if pos == len(pattern):
                        if kind == "exact":
                            kind = "prefix"
                        else:
                            regex, kind = regex + "[^/]*", "regexp"
                    else:
                        regex, kind = regex + "(.*/)?", "regexp"
                    if index == 0:
                        kind = "suffix"
                else:
                    regex, kind = regex + "[^/]*", "regexp"
            elif char == "?":
                regex, kind = regex + "[^/]", "regexp"
            elif char in ".+()|{}$":
                regex += "\\" + char
            elif char == "\\":
                if pos < len(pattern):
                    regex, kind = regex + "\\" + pattern[pos], "regexp"
                    pos += 1
                else:
                    regex += "\\\\"
            elif char in "[]":
                regex, kind = regex + char, "regexp"
            else:
                regex += char
            index += 1
        return kind, re.compile(regex + "$") if kind == "regexp" else None

    def matches(self, path: str) -> bool:
        if self.kind == "exact":
            return path == self.cleaned
        if self.kind == "prefix":
            return path.startswith(self.cleaned[:-2])
        if self.kind == "suffix":
            suffix = self.cleaned[2:]
            return path.endswith(suffix) or (suffix.startswith("/") and path == suffix[1:])
        assert self.regex is not None
        return self.regex.match(path) is not None


def read_dockerignore(text: str) -> list[DockerPattern]:
    """The patterns of a .dockerignore: comment lines and blank lines dropped."""
    lines = (line.strip() for line in text.splitlines())
    return [DockerPattern.parse(line) for line in lines if line and not line.startswith("#")]


def docker_excludes(patterns: list[DockerPattern], path: str) -> bool:
    """``PatternMatcher.MatchesOrParentMatches``: does the build context leave ``path`` out?"""
    path = posixpath.normpath(path)
    parent = posixpath.dirname(path)
    parents = parent.split("/") if parent else []
    matched = False
    for pattern in patterns:
        if pattern.exclusion != matched:
            continue
        match = pattern.matches(path) or any(
            pattern.matches("/".join(parents[: i + 1])) for i in range(len(parents))
        )
        if match:
            matched = not pattern.exclusion
    return matched


# (patterns, path, left out?) from moby/patternmatcher's TestMatches and its other tests.
DOCKER_CASES: list[tuple[list[str], str, bool]] = [
    (["*"], "fileutils.go", True),
    (["*"], "dir/file", True),  # through its parent folder
    (["*.go"], "fileutils.go", True),
    (["*.go"], "dir/fileutils.go", False),  # anchored at the root, unlike .gitignore
    (["docs", "!docs/README.md"], "docs/README.md", False),
    (["docs/*", "!docs/README.md"], "docs/README.md", False),
    (["*.go", "!fileutils.go"], "fileutils.go", False),
    (["!fileutils.go", "*.go"], "fileutils.go", True),
    (["**/dir"], "dir", True),
    (["**/dir"], "dir/file", True),
    (["**/dir2/*"], "dir/dir2/file", True),
    (["**/file*.txt"], "dir/dir/file.txt", True),
    (["**/**/*.txt2"], "dir/dir/file.txt", False),
    (["**/*.txt"], "file.txt", True),
    (["a/*.txt"], "a/dir/file.txt", False),
    (["abc/**"], "abc", False),
    (["abc/**"], "abc/def/ghi", True),
    (["**/.foo"], ".foo", True),
    (["**/.foo"], "bar.foo", False),
    (["abc.def"], "abcZdef", False),
    (["abc?def"], "abcZdef", True),
    (["a[b-d]e"], "ace", True),
    (["a[b-d]e"], "aae", False),
    (["**", "!util/docker/web"], "util/docker/web/foo", False),
    (["**", "!util/docker/web", "util/docker/web/foo"], "util/docker/web/foo", True),
]


@pytest.mark.parametrize(("patterns", "path", "left_out"), DOCKER_CASES)
def test_the_port_of_dockers_matcher_agrees_with_dockers_own_cases(
    patterns: list[str], path: str, left_out: bool
) -> None:
    assert docker_excludes([DockerPattern.parse(p) for p in patterns], path) is left_out


# --- what the build context holds ------------------------------------------------------


@pytest.fixture(scope="module")
def ignore() -> list[DockerPattern]:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    build = compose["x-fedround"]["build"]
    # The context is the repository root, so the .dockerignore that applies is the root's.
    assert (DEPLOY / build["context"]).resolve() == ROOT
    assert build["dockerfile"] == "deployments/Dockerfile"
    assert not (DEPLOY / "Dockerfile.dockerignore").exists()  # it would take precedence
    return read_dockerignore((ROOT / ".dockerignore").read_text())


@pytest.fixture(scope="module")
def generated_secrets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What deployments/make-secrets.sh writes (for two sites), run on a copy of it."""
    if shutil.which("bash") is None:
        pytest.skip("make-secrets.sh needs bash")
    copy = tmp_path_factory.mktemp("deploy") / "deployments"
    (copy / "secrets").mkdir(parents=True)
    shutil.copy(DEPLOY / "make-secrets.sh", copy / "make-secrets.sh")
    done = subprocess.run(
        ["bash", str(copy / "make-secrets.sh"), "site-01", "hospital-b"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return copy / "secrets"


def _secret(secrets: Path, name: str) -> str:
    return (secrets / name).read_text()


def test_make_secrets_writes_the_files_compose_expects(generated_secrets: Path) -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    expected = {Path(s["file"]).name for s in compose["secrets"].values()}
    expected |= {"site_hospital-b_s3_access_key", "site_hospital-b_s3_secret_key"}
    written = {p.name for p in generated_secrets.iterdir()}
    assert written == expected
    for path in generated_secrets.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name
        assert path.read_text().strip(), path.name


@needs_bash
def test_make_secrets_stops_at_an_existing_placeholder(tmp_path: Path) -> None:
    copy = tmp_path / "deployments"
    (copy / "secrets").mkdir(parents=True)
    shutil.copy(DEPLOY / "make-secrets.sh", copy / "make-secrets.sh")
    (copy / "secrets" / "minio_root_password").write_text("REPLACE_ME\n")
    done = subprocess.run(
        ["bash", str(copy / "make-secrets.sh")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert "minio_root_password holds a placeholder" in done.stderr
    assert (copy / "secrets" / "minio_root_password").read_text() == "REPLACE_ME\n"  # kept


def test_no_secret_make_secrets_writes_reaches_the_build_context(
    ignore: list[DockerPattern], generated_secrets: Path
) -> None:
    names = sorted(p.name for p in generated_secrets.iterdir())
    assert len(names) >= 10
    for name in [*names, ".gitignore", "README.md"]:
        assert docker_excludes(ignore, f"deployments/secrets/{name}"), name


@pytest.mark.parametrize(
    "path",
    [
        "deployments/sites/site-01/site.yaml",
        "deployments/sites/site-01/data/train.npz",
        "deployments/examples/randhie/sites/plan-95/site.yaml",
        "deployments/examples/randhie/sites/plan-95/train.parquet",
        "deployments/examples/randhie/holdout.parquet",
        "deployments/examples/site.yaml",
        "deployments/examples/secrets/coordinator_s3_secret_key",
        "deployments/examples/randhie/build/lib/randhie_federation/model.py",
        "deployments/examples/randhie/randhie_federation.egg-info/PKG-INFO",
        "deployments/k8s/secrets.yaml",
        "deployments/tls/ca.key",
        "deployments/tls/ca.crt",
        "deployments/tls/server.key",
        "deployments/tls/server.crt",
        "deployments/compose.yaml",
        "deployments/make-secrets.sh",
        ".fedround/services/credentials.json",
        ".fedround/services/identities.json",
        ".fedround/mlflow.db",
        ".fedround/objects/fed/global/round-1.safetensors",
        "state2/prefect/prefect.db",
        "mlflow.db",
        "tasks/mlflow.db",
        "flows/.fedround/runs/x.json",
        "site_workers/data/.fedround-state/control.pt",
        "mlruns/0/meta.yaml",
        ".env",
        "flows/keys.env",
        "tasks/tls.key",
        ".venv/bin/python",
        "venv/lib/python3.11/site-packages/x.py",
        ".git/config",
        ".git/objects/ab/cdef",
        "build/lib/fedround/tasks/runtime.py",
        "dist/fedround-0.1.0.whl",
        "fedround.egg-info/PKG-INFO",
        "tasks/__pycache__/runtime.cpython-311.pyc",
        ".mypy_cache/3.11/cache.db",
        "tests/unit/test_config.py",
        "benchmarks/scale.py",
    ],
)
def test_secrets_state_and_build_outputs_stay_out(ignore: list[DockerPattern], path: str) -> None:
    assert docker_excludes(ignore, path)


def _code_files() -> list[str]:
    found = [
        str(p.relative_to(ROOT))
        for package in PACKAGES
        for p in (ROOT / package).rglob("*.py")
        if "__pycache__" not in p.parts
    ]
    examples = DEPLOY / "examples"
    found += [
        str(p.relative_to(ROOT))
        for p in [examples / "mnist-demo.yaml", *examples.glob("contracts/*.json")]
    ]
    return found


def test_the_code_the_image_installs_is_in_the_build_context(ignore: list[DockerPattern]) -> None:
    files = _code_files()
    assert len(files) > 50 and "tasks/runtime.py" in files
    wanted = [
        *files,
        "pyproject.toml",
        "requirements.lock",
        "README.md",
        "deployments/docker-entrypoint.sh",
        "deployments/prefect.yaml",
        "deployments/examples/randhie/randhie_federation/model.py",
        "deployments/examples/randhie/pyproject.toml",
        "deployments/examples/randhie/federation.yaml",
    ]
    left_out = [path for path in wanted if docker_excludes(ignore, path)]
    assert left_out == []


def _dockerfile_copies() -> list[tuple[str, list[str]]]:
    """(destination, sources) of each COPY of deployments/Dockerfile."""
    copies = []
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            words = line.split()[1:]
            assert not any(w.startswith("--from") for w in words), line
            copies.append((words[-1], words[:-1]))
    return copies


def test_the_dockerfile_copies_code_and_examples_never_all_of_deployments(
    ignore: list[DockerPattern],
) -> None:
    copies = _dockerfile_copies()
    sources = [source for _, group in copies for source in group]
    assert "deployments" not in sources and "." not in sources and "deployments/" not in sources
    assert not any(s.startswith(("deployments/secrets", "deployments/sites")) for s in sources)
    assert set(PACKAGES) <= set(sources)
    for source in sources:
        paths = sorted(ROOT.glob(source)) if "*" in source else [ROOT / source]
        files = [p for path in paths for p in ([path] if path.is_file() else path.rglob("*"))]
        sent = [
            p
            for p in files
            if p.is_file() and not docker_excludes(ignore, str(p.relative_to(ROOT)))
        ]
        assert sent, f"COPY {source}: the build context holds nothing of it"


def test_nothing_sensitive_of_this_checkout_would_reach_the_builder(
    ignore: list[DockerPattern],
) -> None:
    """Every file of the working tree (.git and .venv aside, checked above) that the build
    context would hold is code, an example or a file the Dockerfile names."""
    allowed_top = {*PACKAGES, "pyproject.toml", "requirements.lock", "README.md"}
    allowed_deploy = ("deployments/docker-entrypoint.sh", "deployments/prefect.yaml")
    sensitive = re.compile(
        r"(^|/)(secrets|\.fedround|\.fedround-state|mlruns|build|[^/]*\.egg-info)(/|$)"
        r"|(^|/)(site\.yaml|credentials\.json|identities\.json|\.env|[^/]*\.(db|env|key|pem))$"
        r"|_s3_(access|secret)_key$|(^|/)minio_root_"
    )
    sent = []
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in {".git", ".venv"}]
        for name in names:
            path = str((Path(folder) / name).relative_to(ROOT))
            if not docker_excludes(ignore, path):
                sent.append(path)
    assert "tasks/runtime.py" in sent
    for path in sent:
        top = path.split("/")[0]
        assert (
            top in allowed_top or path in allowed_deploy or path.startswith("deployments/examples/")
        ), f"{path} would be sent to the builder"
        assert not sensitive.search(path), f"{path} would be sent to the builder"


# --- the services refuse placeholder credentials ---------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No credential or override in the environment; state in a temporary folder."""
    for name in CREDENTIAL_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FEDROUND_STATE_DIR", str(tmp_path / "state"))
    return monkeypatch


def _s3_coordinator(env: pytest.MonkeyPatch, access: str | None, secret: str | None) -> None:
    env.setenv("FEDROUND_OBJECT_STORE", "s3")
    env.setenv("FEDROUND_S3_ENDPOINT", "minio:9000")
    for name, value in (("FEDROUND_S3_ACCESS_KEY", access), ("FEDROUND_S3_SECRET_KEY", secret)):
        if value is None:
            env.delenv(name, raising=False)
        else:
            env.setenv(name, value)


def _insecure_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "INSECURE DEV MODE" in r.getMessage()
    ]


def test_the_embedded_default_needs_no_credentials(
    clean_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        settings = CoordinatorSettings.from_env()
    assert settings.object_store.kind == "local"
    assert settings.tracking_uri.startswith("sqlite:///")
    assert _insecure_warnings(caplog) == []


@pytest.mark.parametrize("placeholder", PLACEHOLDERS)
@pytest.mark.parametrize("which", ["FEDROUND_S3_ACCESS_KEY", "FEDROUND_S3_SECRET_KEY"])
def test_the_coordinator_refuses_each_placeholder(
    clean_env: pytest.MonkeyPatch, placeholder: str, which: str
) -> None:
    real = {"FEDROUND_S3_ACCESS_KEY": "coordinator-a1B2c3D4", "FEDROUND_S3_SECRET_KEY": REAL_SECRET}
    real[which] = placeholder
    _s3_coordinator(clean_env, real["FEDROUND_S3_ACCESS_KEY"], real["FEDROUND_S3_SECRET_KEY"])
    with pytest.raises(ConfigError) as caught:
        CoordinatorSettings.from_env()
    message = str(caught.value)
    assert f"{which} is a placeholder" in message
    assert placeholder not in message and REAL_SECRET not in message
    assert "make-secrets.sh" in message and "FEDROUND_INSECURE_DEV=1" in message


@pytest.mark.parametrize(("value", "problem"), [(None, "is not set"), ("", "is empty")])
def test_the_coordinator_refuses_missing_s3_keys(
    clean_env: pytest.MonkeyPatch, value: str | None, problem: str
) -> None:
    _s3_coordinator(clean_env, "coordinator-a1B2c3D4", value)
    with pytest.raises(ConfigError, match=f"FEDROUND_S3_SECRET_KEY {problem}"):
        CoordinatorSettings.from_env()


def test_the_coordinator_refuses_a_placeholder_password_in_the_tracking_uri(
    clean_env: pytest.MonkeyPatch,
) -> None:
    clean_env.setenv("MLFLOW_TRACKING_URI", "postgresql://fedround:REPLACE_ME@postgres/mlflow")
    with pytest.raises(ConfigError, match="the password in MLFLOW_TRACKING_URI is a placeholder"):
        CoordinatorSettings.from_env()
    clean_env.setenv("MLFLOW_TRACKING_URI", f"postgresql://fedround:{REAL_SECRET}@postgres/mlflow")
    assert CoordinatorSettings.from_env().tracking_uri.endswith("@postgres/mlflow")


def test_the_coordinator_refuses_a_placeholder_client_token(
    clean_env: pytest.MonkeyPatch,
) -> None:
    clean_env.setenv("MLFLOW_TRACKING_TOKEN", "changeme")
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_TOKEN is a placeholder"):
        CoordinatorSettings.from_env()


@pytest.mark.parametrize("override", ["1", "true", "yes"])
def test_the_override_starts_the_coordinator_with_a_warning_every_time(
    clean_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, override: str
) -> None:
    _s3_coordinator(clean_env, "minioadmin", "minioadmin")
    clean_env.setenv("FEDROUND_INSECURE_DEV", override)
    with caplog.at_level(logging.WARNING, logger="fedround.tasks.runtime"):
        first = CoordinatorSettings.from_env()
        CoordinatorSettings.from_env()
    assert first.object_store.kind == "s3"
    warnings = _insecure_warnings(caplog)
    assert len(warnings) == 2  # one per start
    assert "FEDROUND_S3_ACCESS_KEY is a placeholder" in warnings[0]
    assert "FEDROUND_S3_SECRET_KEY is a placeholder" in warnings[0]
    assert "minioadmin" not in caplog.text


def test_an_override_that_is_not_on_changes_nothing(clean_env: pytest.MonkeyPatch) -> None:
    _s3_coordinator(clean_env, "coordinator-a1B2c3D4", "REPLACE_ME")
    clean_env.setenv("FEDROUND_INSECURE_DEV", "0")
    with pytest.raises(ConfigError):
        CoordinatorSettings.from_env()


@pytest.fixture
def stack_credentials(tmp_path: Path) -> dict[str, object]:
    """Credentials the local service stack generates (flows/services), no server started."""
    services = tmp_path / "stack" / "services"
    with stack_s3.locked_credentials(services) as data:
        sites, _ = stack_s3.ensure_site_keys(data, "fed", ["site-a"])
        admin = stack_s3.admin_keys(data)
    return {"admin": admin, "site": sites["site-a"], "state": tmp_path / "stack"}


def test_the_local_stacks_generated_credentials_pass(
    clean_env: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    stack_credentials: dict[str, object],
    tmp_path: Path,
) -> None:
    admin = stack_credentials["admin"]
    site = stack_credentials["site"]
    assert isinstance(admin, stack_s3.S3Keys) and isinstance(site, stack_s3.S3Keys)
    endpoints = Endpoints(
        state_dir=Path(str(stack_credentials["state"])),
        s3_bucket="fedround",
        mlflow_bucket="mlflow",
        admin_access_key=admin.access_key,
        admin_secret_key=admin.secret_key,
        s3_port=8333,
    )
    for name, value in endpoints.env().items():
        clean_env.setenv(name, value)
    with caplog.at_level(logging.WARNING):
        settings = CoordinatorSettings.from_env()
    assert settings.object_store.kind == "s3"
    assert os.environ["FEDROUND_S3_SECRET_KEY"] == admin.secret_key

    credentials = stack_s3.SiteCredentials("fed", "site-a", "127.0.0.1:8333", "fedround", "r", site)
    path = tmp_path / "site-a" / "site.yaml"
    write_site_settings(
        path,
        SiteSettings(
            site="site-a",
            federation="fed",
            data_dir=tmp_path,
            object_store=ObjectStoreSettings.model_validate(credentials.object_store_settings()),
        ),
    )
    clean_env.delenv("FEDROUND_S3_SECRET_KEY")  # the site's own keys are in its file
    loaded = load_site_settings(path)
    assert loaded.object_store.access_key == site.access_key
    assert _insecure_warnings(caplog) == []


def test_make_secrets_output_passes(
    clean_env: pytest.MonkeyPatch, generated_secrets: Path, tmp_path: Path
) -> None:
    _s3_coordinator(
        clean_env,
        _secret(generated_secrets, "coordinator_s3_access_key"),
        _secret(generated_secrets, "coordinator_s3_secret_key"),
    )
    clean_env.setenv("MLFLOW_TRACKING_URI", _secret(generated_secrets, "mlflow_backend_store_uri"))
    assert CoordinatorSettings.from_env().object_store.kind == "s3"

    # The repository's example site, with the keys its worker gets as FEDROUND_S3_*.
    site = tmp_path / "site.yaml"
    shutil.copy(DEPLOY / "sites" / "site-01" / "site.yaml", site)
    clean_env.setenv(
        "FEDROUND_S3_ACCESS_KEY", _secret(generated_secrets, "site_site-01_s3_access_key")
    )
    clean_env.setenv(
        "FEDROUND_S3_SECRET_KEY", _secret(generated_secrets, "site_site-01_s3_secret_key")
    )
    assert load_site_settings(site).site == "site-01"


def _write_s3_site(
    path: Path, *, access: str | None = None, secret: str | None = None, **extra: object
) -> Path:
    store: dict[str, object] = {"kind": "s3", "endpoint": "minio:9000", "bucket": "fedround"}
    if access is not None:
        store["access_key"] = access
    if secret is not None:
        store["secret_key"] = secret
    document = {"site": "site-01", "federation": "fed", "data_dir": ".", "object_store": store}
    path.write_text(yaml.safe_dump(document | extra))
    return path


@pytest.mark.parametrize("placeholder", PLACEHOLDERS)
def test_a_site_refuses_each_placeholder_in_its_file(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, placeholder: str
) -> None:
    path = _write_s3_site(tmp_path / "site.yaml", access="site-01-x9Y8", secret=placeholder)
    with pytest.raises(ConfigError) as caught:
        load_site_settings(path)
    message = str(caught.value)
    assert f"object_store.secret_key in {path} is a placeholder" in message
    assert placeholder not in message.replace(str(path), "")
    assert "insecure_dev: true" in message


@pytest.mark.parametrize("placeholder", PLACEHOLDERS)
def test_a_site_refuses_each_placeholder_in_its_environment(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, placeholder: str
) -> None:
    path = _write_s3_site(tmp_path / "site.yaml")
    clean_env.setenv("FEDROUND_S3_ACCESS_KEY", placeholder)
    clean_env.setenv("FEDROUND_S3_SECRET_KEY", REAL_SECRET)
    with pytest.raises(ConfigError) as caught:
        load_site_settings(path)
    message = str(caught.value)
    assert "FEDROUND_S3_ACCESS_KEY is a placeholder" in message
    assert "FEDROUND_S3_SECRET_KEY" not in message and REAL_SECRET not in message


def test_a_site_refuses_missing_and_empty_keys(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = _write_s3_site(tmp_path / "site.yaml")
    with pytest.raises(
        ConfigError, match=r"object_store.secret_key \(or FEDROUND_S3_SECRET_KEY\) is not set"
    ):
        load_site_settings(path)
    clean_env.setenv("FEDROUND_S3_ACCESS_KEY", "site-01-x9Y8")
    clean_env.setenv("FEDROUND_S3_SECRET_KEY", "  ")
    with pytest.raises(ConfigError, match="FEDROUND_S3_SECRET_KEY is empty"):
        load_site_settings(path)


def test_a_site_with_a_local_store_needs_no_credentials(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "site.yaml"
    path.write_text(
        "site: site-01\nfederation: fed\ndata_dir: .\nobject_store: {kind: local, root: objects}\n"
    )
    assert load_site_settings(path).object_store.root == (tmp_path / "objects").resolve()


OverrideSetter = Callable[[pytest.MonkeyPatch, Path], Path]


def _override_in_file(env: pytest.MonkeyPatch, folder: Path) -> Path:
    return _write_s3_site(
        folder / "site.yaml", access="REPLACE_ME", secret="REPLACE_ME", insecure_dev=True
    )


def _override_in_env(env: pytest.MonkeyPatch, folder: Path) -> Path:
    env.setenv("FEDROUND_INSECURE_DEV", "1")
    return _write_s3_site(folder / "site.yaml", access="REPLACE_ME", secret="REPLACE_ME")


@pytest.mark.parametrize("set_override", [_override_in_file, _override_in_env])
def test_the_override_starts_a_site_with_a_warning_every_time(
    clean_env: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
    set_override: OverrideSetter,
) -> None:
    path = set_override(clean_env, tmp_path)
    with caplog.at_level(logging.WARNING, logger="fedround.tasks.runtime"):
        settings = load_site_settings(path)
        load_site_settings(path)
    assert settings.object_store.access_key == "REPLACE_ME"
    warnings = _insecure_warnings(caplog)
    assert len(warnings) == 2
    assert "site site-01" in warnings[0]
    assert f"object_store.secret_key in {path} is a placeholder" in warnings[0]


def test_insecure_dev_is_written_only_when_asked_for(tmp_path: Path) -> None:
    store = ObjectStoreSettings(kind="local", root=tmp_path / "objects")
    plain = tmp_path / "plain.yaml"
    write_site_settings(
        plain, SiteSettings(site="a", federation="f", data_dir=tmp_path, object_store=store)
    )
    assert "insecure_dev" not in yaml.safe_load(plain.read_text())
    dev = tmp_path / "dev.yaml"
    write_site_settings(
        dev,
        SiteSettings(
            site="a", federation="f", data_dir=tmp_path, object_store=store, insecure_dev=True
        ),
    )
    assert yaml.safe_load(dev.read_text())["insecure_dev"] is True
    assert load_site_settings(dev).insecure_dev is True


# --- the container entrypoint and the MinIO init script --------------------------------


def _entrypoint(env: dict[str, str], *command: str) -> subprocess.CompletedProcess[str]:
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    return subprocess.run(
        ["sh", str(DEPLOY / "docker-entrypoint.sh"), *(command or ("true",))],
        env=base | env,
        capture_output=True,
        text=True,
        timeout=30,
    )


@needs_sh
@pytest.mark.parametrize("placeholder", PLACEHOLDERS)
def test_the_entrypoint_refuses_a_placeholder_secret_file(tmp_path: Path, placeholder: str) -> None:
    secret = tmp_path / "coordinator_s3_secret_key"
    secret.write_text(placeholder)
    access = tmp_path / "coordinator_s3_access_key"
    access.write_text(REAL_SECRET)
    done = _entrypoint(
        {"FEDROUND_S3_SECRET_KEY_FILE": str(secret), "FEDROUND_S3_ACCESS_KEY_FILE": str(access)},
        "echo",
        "started",
    )
    assert done.returncode == 1
    assert "started" not in done.stdout
    assert "FEDROUND_S3_SECRET_KEY holds a placeholder" in done.stderr
    assert "FEDROUND_S3_ACCESS_KEY " not in done.stderr
    assert REAL_SECRET not in done.stderr and "make-secrets.sh" in done.stderr


@needs_sh
def test_the_entrypoint_refuses_kubernetes_placeholders_and_empty_files(tmp_path: Path) -> None:
    refused = _entrypoint(
        {
            "MLFLOW_BACKEND_STORE_URI": "REPLACE_ME",
            "PREFECT_SERVER_DATABASE_PASSWORD": "REPLACE_ME",
            "AWS_SECRET_ACCESS_KEY": "minioadmin",
            "PREFECT_SERVER_API_AUTH_STRING": "REPLACE_ME",
            "PREFECT_API_AUTH_STRING": "fedround:changeme",
        }
    )
    assert refused.returncode == 1
    for name in (
        "MLFLOW_BACKEND_STORE_URI",
        "PREFECT_SERVER_DATABASE_PASSWORD",
        "AWS_SECRET_ACCESS_KEY",
        "PREFECT_SERVER_API_AUTH_STRING",
        "PREFECT_API_AUTH_STRING",
    ):
        assert f"{name} holds a placeholder" in refused.stderr
    empty = tmp_path / "postgres_password"
    empty.write_text("\n")
    done = _entrypoint({"PREFECT_SERVER_DATABASE_PASSWORD_FILE": str(empty)})
    assert (
        done.returncode == 1
        and f"PREFECT_SERVER_DATABASE_PASSWORD_FILE={empty} is empty" in done.stderr
    )


@needs_sh
def test_the_entrypoint_override_warns_and_starts() -> None:
    done = _entrypoint(
        {"FEDROUND_S3_SECRET_KEY": "changeme", "FEDROUND_INSECURE_DEV": "1"}, "echo", "started"
    )
    assert done.returncode == 0 and done.stdout.strip() == "started"
    assert "WARNING: FEDROUND_S3_SECRET_KEY holds a placeholder" in done.stderr


@needs_sh
def test_the_entrypoint_starts_on_make_secrets_output(generated_secrets: Path) -> None:
    variables = {
        "FEDROUND_S3_ACCESS_KEY_FILE": "coordinator_s3_access_key",
        "FEDROUND_S3_SECRET_KEY_FILE": "coordinator_s3_secret_key",
        "MLFLOW_BACKEND_STORE_URI_FILE": "mlflow_backend_store_uri",
        "PREFECT_SERVER_DATABASE_PASSWORD_FILE": "postgres_password",
        "PREFECT_API_AUTH_STRING_FILE": "prefect_auth_string",
        "MLFLOW_AUTH_ADMIN_PASSWORD_FILE": "mlflow_admin_password",
        "MLFLOW_FLASK_SERVER_SECRET_KEY_FILE": "mlflow_flask_secret_key",
        "MLFLOW_TRACKING_PASSWORD_FILE": "mlflow_coordinator_password",
        "AWS_ACCESS_KEY_ID_FILE": "mlflow_s3_access_key",
        "AWS_SECRET_ACCESS_KEY_FILE": "mlflow_s3_secret_key",
    }
    done = _entrypoint(
        {name: str(generated_secrets / file) for name, file in variables.items()},
        "sh",
        "-c",
        'printf %s "$FEDROUND_S3_SECRET_KEY"',
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == _secret(generated_secrets, "coordinator_s3_secret_key")
    assert done.stderr == ""


def test_make_secrets_control_plane_credentials_fit_their_servers(generated_secrets: Path) -> None:
    """The Prefect auth string is `user:password`; MLflow accepts the passwords (its own
    rule); all differ from each other."""
    from mlflow.utils.validation import _validate_password

    user, _, password = _secret(generated_secrets, "prefect_auth_string").partition(":")
    assert user == "fedround" and len(password) >= 32
    names = ("mlflow_admin_password", "mlflow_coordinator_password", "mlflow_flask_secret_key")
    values = [_secret(generated_secrets, name) for name in names]
    for name, value in zip(names, values, strict=True):
        _validate_password(value)  # raises for one MLflow would refuse
        assert len(value) >= 32, name
    assert len({password, *values}) == 4


def test_make_secrets_gives_mlflow_and_the_coordinator_different_s3_keys(
    generated_secrets: Path,
) -> None:
    """The MLflow server's S3 identity is its own (policy mlflow.json), not the coordinator's."""
    pairs = [
        (
            _secret(generated_secrets, f"{who}_s3_access_key"),
            _secret(generated_secrets, f"{who}_s3_secret_key"),
        )
        for who in ("coordinator", "mlflow", "site_site-01")
    ]
    assert len({access for access, _ in pairs}) == len({secret for _, secret in pairs}) == 3
    assert _secret(generated_secrets, "mlflow_s3_access_key").startswith("mlflow-")
    assert len(_secret(generated_secrets, "mlflow_s3_secret_key")) >= 32


def _init_with_fake_mc(tmp_path: Path, secrets: Path) -> tuple[Path, dict[str, str]]:
    """An environment for init.sh whose ``mc`` only appends its arguments to a file
    (returned first): what init.sh would do to MinIO, for the demo's tenant and site."""
    calls = tmp_path / "mc-calls"
    fake = tmp_path / "bin" / "mc"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    fake.chmod(0o755)
    env = {
        "PATH": f"{fake.parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "SECRETS": str(secrets),
        "POLICIES": str(DEPLOY / "minio" / "policies"),
        "TENANT": "demo",
        "FEDERATION": "mnist-demo",
        "SITES": "site-01",
    }
    return calls, env


@needs_sh
def test_minio_init_refuses_placeholder_secrets_before_touching_minio(
    tmp_path: Path, generated_secrets: Path
) -> None:
    secrets = tmp_path / "secrets"
    shutil.copytree(generated_secrets, secrets)
    calls, env = _init_with_fake_mc(tmp_path, secrets)

    def init() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["sh", str(DEPLOY / "minio" / "init.sh")],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )

    (secrets / "minio_root_password").write_text("REPLACE_ME")
    refused = init()
    assert refused.returncode == 1
    assert "secret minio_root_password is empty or a placeholder" in refused.stderr
    assert not calls.exists()  # MinIO was never called
    (secrets / "minio_root_password").write_text(_secret(generated_secrets, "minio_root_password"))
    (secrets / "mlflow_s3_secret_key").write_text("changeme")
    refused = init()
    assert refused.returncode == 1
    assert "secret mlflow_s3_secret_key is empty or a placeholder" in refused.stderr
    assert not calls.exists()
    (secrets / "mlflow_s3_secret_key").write_text(
        _secret(generated_secrets, "mlflow_s3_secret_key")
    )
    done = init()
    assert done.returncode == 0, done.stderr
    made = calls.read_text()
    assert "user add fedround" in made
    # The tenant's coordinator, the MLflow server and the site: each its own user and policy.
    for policy, key in (
        ("fedround-coordinator-demo", "coordinator_s3_access_key"),
        ("fedround-mlflow", "mlflow_s3_access_key"),
        ("fedround-site-mnist-demo-site-01", "site_site-01_s3_access_key"),
    ):
        assert f"admin policy create fedround {policy} " in made, policy
        access = _secret(generated_secrets, key)
        assert f"admin policy attach fedround {policy} --user {access}" in made, policy
    # The bucket-wide policy of deployments from before per-tenant policies is taken off.
    coordinator = _secret(generated_secrets, "coordinator_s3_access_key")
    assert f"admin policy detach fedround fedround-coordinator --user {coordinator}" in made
    # old versions of what sites write (heartbeats every second) expire after a day
    rule = "ilm rule add --prefix mnist-demo/updates/ --noncurrent-expire-days 1 fedround/fedround"
    assert rule in calls.read_text()


@needs_sh
@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("TENANT", ""),
        ("TENANT", "a*"),
        ("TENANT", "demo/x"),
        ("FEDERATION", "Fed"),
        ("SITES", "s-"),
    ],
)
def test_minio_init_refuses_a_name_that_would_widen_a_policy(
    tmp_path: Path, generated_secrets: Path, variable: str, value: str
) -> None:
    """Tenant, federation and site names go into the policies' resources and conditions:
    init.sh stops, before touching MinIO, on one fedround's config would refuse."""
    calls, env = _init_with_fake_mc(tmp_path, generated_secrets)
    env[variable] = value
    done = subprocess.run(
        ["sh", str(DEPLOY / "minio" / "init.sh")], env=env, capture_output=True, text=True
    )
    assert done.returncode != 0
    assert "set TENANT" in done.stderr if value == "" else "is not a name" in done.stderr
    assert not calls.exists()


def test_generated_secret_keys_never_start_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    """A key starting with '-' breaks `dvc remote modify … secret_access_key <key>` (read as
    an option). The random source is replaced to force the case (1 draw in 64 otherwise)."""
    import secrets

    from fedround.flows.services import s3

    draws = iter(["-starts-with-a-dash", "_fine-key"])
    monkeypatch.setattr(secrets, "token_urlsafe", lambda n: next(draws))
    assert s3.new_secret() == "_fine-key"
    monkeypatch.undo()
    assert all(not s3.new_keys("site-").secret_key.startswith("-") for _ in range(200))
