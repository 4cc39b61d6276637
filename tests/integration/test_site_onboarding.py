"""A site that brings its own data: ``fedround site init`` writes its private config for files
wherever they are, ``fedround site check`` rehearses a round there with no server (real
Great Expectations, real files, the real model and training loop) and fails with one
clear line for each thing an operator can get wrong."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from fedround.flows.cli.main import app
from fedround.site_workers.settings import load_site_settings
from fedround.site_workers.worker import start_site_worker
from fedround.tasks.core.errors import ConfigError
from tests.unit import user_code

USER = user_code.__name__
SECRET = "s3cr3t-Never-In-History-9f2"

SUITE = {
    "name": "clinic-data",
    "expectations": [
        {
            "type": "expect_table_columns_to_match_set",
            "kwargs": {"column_set": ["age", "bmi", "city", "y"], "exact_match": True},
        },
        {"type": "expect_table_row_count_to_be_between", "kwargs": {"min_value": 10}},
        {
            "type": "expect_column_values_to_be_between",
            "kwargs": {"column": "age", "min_value": 0, "max_value": 120},
        },
        {
            "type": "expect_column_values_to_be_in_set",
            "kwargs": {"column": "y", "value_set": [0, 1]},
        },
    ],
}


def clinic_frame(n: int = 80, seed: int = 2) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "age": rng.integers(18, 90, n),
            "bmi": rng.normal(25, 4, n).round(1),
            "city": rng.choice(["berlin", "paris", "rome"], n),
            "y": rng.integers(0, 2, n),
        }
    )


def federation_yaml(folder: Path, **overrides: object) -> Path:
    (folder / "contract.json").write_text(json.dumps(SUITE))
    config: dict[str, object] = {
        "federation": "clinic",
        "rounds": 2,
        "data": {
            "kind": "table",
            "source": "sites",
            "table": {"features": ["age", "bmi", "city"], "categorical": ["city"], "label": "y"},
        },
        "model": {"factory": "mlp", "hidden": [8]},
        "training": {"batch_size": 16},
        "contract": "contract.json",
        "sites": [{"name": "site-a"}],
    }
    config.update(overrides)
    path = folder / "federation.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def site(tmp_path: Path) -> dict[str, Path]:
    """A site's own files in their own places, and the federation's config elsewhere."""
    data = tmp_path / "hospital" / "exports"
    data.mkdir(parents=True)
    (tmp_path / "hospital" / "holdout").mkdir()
    train = data / "train.csv"
    clinic_frame().to_csv(train, index=False)
    test = tmp_path / "hospital" / "holdout" / "test.parquet"
    clinic_frame(30, seed=9).to_parquet(test)
    (tmp_path / "federation").mkdir()
    return {
        "root": tmp_path,
        "train": train,
        "test": test,
        "config": tmp_path / "site.yaml",
        "federation": federation_yaml(tmp_path / "federation"),
        "store": tmp_path / "objects",
    }


def init(site: dict[str, Path], *extra: str, data: Path | None = None) -> object:
    return CliRunner().invoke(
        app,
        [
            "site",
            "init",
            "--federation",
            "clinic",
            "--site",
            "site-a",
            "--data",
            str(data or site["train"]),
            "--out",
            str(site["config"]),
            *extra,
        ],
    )


def check(site: dict[str, Path], *extra: str) -> object:
    return CliRunner().invoke(
        app,
        [
            "site",
            "check",
            "--config",
            str(site["config"]),
            "--federation-config",
            str(site["federation"]),
            *extra,
        ],
    )


# --- site init ---------------------------------------------------------------------------


def test_init_writes_a_private_config_for_files_where_they_are(site: dict[str, Path]) -> None:
    done = init(
        site,
        "--test-data",
        str(site["test"]),
        "--object-store",
        f"local:{site['store']}",
    )
    assert done.exit_code == 0, done.output
    assert "train.csv: table, 80 rows × 4 columns" in done.output
    mode = stat.S_IMODE(site["config"].stat().st_mode)
    assert mode == 0o600
    settings = load_site_settings(site["config"])
    assert settings.train_path == site["train"].resolve()
    assert settings.test_path == site["test"].resolve()
    assert settings.data_dir == (site["root"] / "hospital").resolve()
    assert settings.object_store.kind == "local"
    assert settings.object_store.root == site["store"].resolve()
    assert settings.pool == "clinic-site-a"


def test_init_without_a_test_file_reads_back_as_none(site: dict[str, Path]) -> None:
    done = init(site, "--object-store", f"local:{site['store']}")
    assert done.exit_code == 0, done.output
    assert load_site_settings(site["config"]).test_path is None  # not the default test.npz


def test_s3_keys_come_from_a_secret_file_never_from_flags(site: dict[str, Path]) -> None:
    secret_file = site["root"] / "keys.env"
    secret_file.write_text(f"FEDROUND_S3_ACCESS_KEY=site-a-key\nFEDROUND_S3_SECRET_KEY={SECRET}\n")
    s3 = ["--object-store", "s3", "--endpoint", "127.0.0.1:9000", "--bucket", "fedround"]
    done = init(site, *s3, "--secret-file", str(secret_file))
    assert done.exit_code == 0, done.output
    assert SECRET not in done.output
    assert "S3 keys from secret file" in done.output
    store = load_site_settings(site["config"]).object_store
    assert (store.kind, store.endpoint, store.bucket) == ("s3", "127.0.0.1:9000", "fedround")
    assert store.access_key == "site-a-key"
    assert store.secret_key is not None and store.secret_key.get_secret_value() == SECRET
    assert stat.S_IMODE(site["config"].stat().st_mode) == 0o600

    no_such_flag = init(site, *s3, "--secret-key", SECRET, "--force")
    assert no_such_flag.exit_code != 0  # there is no flag to put a secret in shell history


def test_s3_keys_from_the_environment(
    site: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    s3 = ["--object-store", "s3", "--endpoint", "127.0.0.1:9000", "--bucket", "fedround"]
    monkeypatch.setenv("FEDROUND_S3_ACCESS_KEY", "from-env")
    monkeypatch.delenv("FEDROUND_S3_SECRET_KEY", raising=False)
    half = init(site, *s3)
    assert half.exit_code == 1 and "secret_key is missing" in half.stderr
    assert not site["config"].exists()
    monkeypatch.setenv("FEDROUND_S3_SECRET_KEY", SECRET)
    done = init(site, *s3)
    assert done.exit_code == 0, done.output
    assert "S3 keys from the environment" in done.output and SECRET not in done.output
    assert load_site_settings(site["config"]).object_store.access_key == "from-env"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--object-store", "s3", "--endpoint", "h:9000"], "--object-store s3 needs --bucket"),
        (["--object-store", "ftp://x"], "use local:<directory> or s3"),
        (["--object-store", "local:/tmp/x", "--site", "Site A"], "site"),
    ],
)
def test_init_refuses_bad_options(
    site: dict[str, Path], arguments: list[str], message: str
) -> None:
    done = init(site, *arguments)
    assert done.exit_code == 1, done.output
    assert message in done.stderr
    assert not site["config"].exists()


def test_init_names_a_missing_or_unreadable_data_file(site: dict[str, Path]) -> None:
    missing = init(site, data=site["root"] / "nowhere.csv")
    assert missing.exit_code == 1
    assert "nowhere.csv does not exist" in missing.stderr

    broken = site["root"] / "broken.parquet"
    broken.write_bytes(b"PAR1 but not really")
    unreadable = init(site, data=broken)
    assert unreadable.exit_code == 1
    assert "unreadable data file: cannot read broken.parquet as parquet" in unreadable.stderr

    excel = site["root"] / "train.xlsx"
    excel.write_bytes(b"PK\x03\x04")
    unknown = init(site, data=excel)
    assert unknown.exit_code == 1 and "data.loader" in unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1


def test_init_does_not_overwrite_without_force(site: dict[str, Path]) -> None:
    assert init(site).exit_code == 0
    again = init(site)
    assert again.exit_code == 1 and "pass --force" in again.stderr
    assert init(site, "--force").exit_code == 0


def test_site_start_names_the_missing_training_file(site: dict[str, Path]) -> None:
    assert init(site).exit_code == 0
    site["train"].unlink()
    with pytest.raises(ConfigError, match=r"training file .*train\.csv does not exist"):
        start_site_worker(site["config"])


# --- site check --------------------------------------------------------------------------


def test_check_rehearses_a_round_and_shows_what_would_leave(site: dict[str, Path]) -> None:
    assert init(site, "--test-data", str(site["test"]), "--object-store", f"local:{site['store']}")
    done = check(site)
    assert done.exit_code == 0, done.output
    text = done.stdout
    assert "site site-a is ready for clinic (a dry run: nothing was sent)" in text
    assert "80 rows pass suite 'clinic-data'" in text
    assert "What would leave this site:" in text and "What stays here:" in text
    assert "0.weight" in text and "float32" in text
    assert "count, sum, sum of squares, min and max of numeric columns age, bmi" in text
    assert "this site's own summary only" in text
    assert not site["store"].exists()  # nothing was written to the object store

    report = json.loads(check(site, "--json").stdout)
    assert report["ok"] and report["stage"] == "update"
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    expected = {name: list(t.shape) for name, t in model.state_dict().items()}
    update = report["update"]
    assert {t["name"]: t["shape"] for t in update["tensors"]} == expected
    assert sum(t["nbytes"] for t in update["tensors"]) == 4 * sum(
        t.numel() for t in model.state_dict().values()
    )
    assert update["payload_bytes"] > sum(t["nbytes"] for t in update["tensors"])
    assert update["num_examples"] == 16  # one batch
    assert report["model"]["arguments"]["in_features"] == 6  # 2 numeric + 3 cities + other
    assert str(site["train"].parent) not in json.dumps(report["leaves"])


def _expect_failure(result: object, *fragments: str) -> str:
    assert result.exit_code == 1, result.output  # type: ignore[attr-defined]
    first = result.stderr.splitlines()[0]  # type: ignore[attr-defined]
    assert first.startswith("error: ")
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr  # type: ignore[attr-defined]
    return str(result.stderr)  # type: ignore[attr-defined]


def test_check_names_a_missing_file(site: dict[str, Path]) -> None:
    assert init(site, "--test-data", str(site["test"])).exit_code == 0
    site["test"].unlink()
    _expect_failure(check(site), "test.parquet does not exist", "test_file", "[data]")
    report = json.loads(check(site, "--json").stdout)
    assert (report["ok"], report["stage"]) == (False, "data")


def test_check_names_a_wrong_column(site: dict[str, Path]) -> None:
    assert init(site).exit_code == 0
    clinic_frame().rename(columns={"bmi": "BMI"}).to_csv(site["train"], index=False)
    stderr = _expect_failure(check(site), "data contract 'clinic-data' fails", "[contract]")
    assert "expect_table_columns_to_match_set" in stderr


def test_check_names_an_unreadable_file(site: dict[str, Path]) -> None:
    assert init(site).exit_code == 0
    site["train"].write_bytes(b"\x00\x01 not, a\ncsv \xff\xfe")
    _expect_failure(check(site), "unreadable data file", "train.csv")


def test_check_shows_the_contract_failures(site: dict[str, Path]) -> None:
    assert init(site).exit_code == 0
    frame = clinic_frame()
    frame.loc[[4, 8], "age"] = 420
    frame.to_csv(site["train"], index=False)
    stderr = _expect_failure(check(site), "1 of 4 rules broken")
    assert "column 'age' broke expect_column_values_to_be_between" in stderr
    assert "2 rows" in stderr and "420" not in stderr.split("rules broken", 1)[1]


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        (
            {"model": {"factory": f"{USER}:raises", "width": 5}},
            (f"model factory {USER}:raises", "ValueError: width 5 is not supported", "[model]"),
        ),
        (
            {"training": {"train": f"{USER}:train_raises"}},
            (f"train function {USER}:train_raises raised RuntimeError", "[training]"),
        ),
        (
            {"training": {"train": f"{USER}:train_nan_weights"}},
            ("non-finite weights", "[training]"),
        ),
        (
            {"limits": {"max_update_bytes": 100}},
            ("the coordinator would reject this site's update: too_large", "[update]"),
        ),
    ],
)
def test_check_reports_user_code_and_update_errors(
    site: dict[str, Path], override: dict[str, object], fragments: tuple[str, ...]
) -> None:
    assert init(site).exit_code == 0
    site["federation"] = federation_yaml(site["federation"].parent, **override)
    _expect_failure(check(site), *fragments)


def test_check_refuses_another_federations_config(site: dict[str, Path]) -> None:
    assert init(site).exit_code == 0
    site["federation"] = federation_yaml(site["federation"].parent, federation="other-fed")
    _expect_failure(check(site), "is for federation 'clinic'", "configures 'other-fed'")
