"""``fedround contract draft``, with real Great Expectations on real files: the draft passes
the sample it came from (CSV and Parquet), and a corrupted copy fails naming the column
and the rule, without the offending values in the report."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from fedround.flows.cli.main import app
from fedround.site_workers.contract import check_site_contract
from fedround.site_workers.contract_draft import draft_suite_from_file
from fedround.tasks.core.config import DataConfig, TableConfig

DATA = DataConfig(
    kind="table",
    source="sites",
    table=TableConfig(features=["age", "bmi", "city", "smoker"], categorical=["city"], label="y"),
)


def sample_frame(n: int = 120, seed: int = 5) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    bmi = rng.normal(25, 4, n).round(1)
    bmi[rng.random(n) < 0.05] = np.nan
    return pd.DataFrame(
        {
            "age": rng.integers(18, 90, n),
            "bmi": bmi,
            "city": rng.choice(["berlin", "paris", "rome"], n),
            "smoker": rng.choice([True, False], n),
            "y": rng.integers(0, 2, n),
        }
    )


def write(frame: pd.DataFrame, path: Path) -> Path:
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    return path


@pytest.fixture(scope="module")
def drafted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("draft")
    sample = write(sample_frame(), folder / "sample.parquet")
    return sample, draft_suite_from_file(sample, label="y", categorical=["city"])


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_the_draft_passes_the_sample_it_came_from(tmp_path: Path, suffix: str) -> None:
    sample = write(sample_frame(), tmp_path / f"sample{suffix}")
    suite = draft_suite_from_file(sample, label="y", categorical=["city"])
    report = check_site_contract(sample, suite, "site-a", DATA)
    assert report.success, report.summary()
    assert len(report.results) == len(suite["expectations"]) > 15
    assert suite["meta"]["fedround"]["draft"] is True


def _out_of_range(frame: pd.DataFrame) -> pd.DataFrame:
    frame.loc[[3, 4], "age"] = 4242
    return frame


def _unknown_city(frame: pd.DataFrame) -> pd.DataFrame:
    frame.loc[7, "city"] = "gotham-north"
    return frame


def _bmi_mostly_missing(frame: pd.DataFrame) -> pd.DataFrame:
    frame.loc[:60, "bmi"] = np.nan
    return frame


def _text_in_a_number_column(frame: pd.DataFrame) -> pd.DataFrame:
    frame["age"] = frame["age"].astype(object)
    frame.loc[9, "age"] = "forty-two"
    return frame


def _one_class(frame: pd.DataFrame) -> pd.DataFrame:
    frame["y"] = 1
    return frame


def _new_class(frame: pd.DataFrame) -> pd.DataFrame:
    frame.loc[[1, 2, 3], "y"] = 9
    return frame


@pytest.mark.parametrize(
    ("corrupt", "column", "rule", "secret"),
    [
        (_out_of_range, "age", "expect_column_values_to_be_between", "4242"),
        (_unknown_city, "city", "expect_column_values_to_be_in_set", "gotham"),
        (_bmi_mostly_missing, "bmi", "expect_column_values_to_not_be_null", None),
        (_text_in_a_number_column, "age", "expect_column_values_to_be_in_type_list", "forty"),
        (_one_class, "y", "expect_column_unique_value_count_to_be_between", None),
        (_new_class, "y", "expect_column_values_to_be_in_set", None),
    ],
)
def test_a_corrupted_copy_fails_naming_the_column_and_the_rule(
    tmp_path: Path,
    drafted: tuple[Path, dict],
    corrupt: Callable[[pd.DataFrame], pd.DataFrame],
    column: str,
    rule: str,
    secret: str | None,
) -> None:
    _, suite = drafted
    copy = write(corrupt(sample_frame()), tmp_path / "copy.csv")
    report = check_site_contract(copy, suite, "site-b", DATA)
    assert not report.success
    assert (column, rule) in {(f.column, f.rule) for f in report.failures}, report.summary()
    assert f"column {column!r} broke {rule}" in report.summary()
    if secret:
        assert secret not in report.model_dump_json()


def test_dropped_and_added_columns_are_named(tmp_path: Path, drafted: tuple[Path, dict]) -> None:
    _, suite = drafted
    frame = sample_frame().drop(columns=["smoker"]).assign(extra=1)
    report = check_site_contract(write(frame, tmp_path / "copy.csv"), suite, "site-c", DATA)
    broken = {(f.column, f.rule) for f in report.failures}
    assert (None, "expect_table_columns_to_match_set") in broken
    smoker = [f for f in report.failures if f.column == "smoker"]
    assert smoker and all("column 'smoker' is missing" in (f.error or "") for f in smoker)


def test_cli_writes_a_reviewable_draft_and_prints_without_out(tmp_path: Path) -> None:
    sample = write(sample_frame(), tmp_path / "Clinic Sample.csv")
    out = tmp_path / "contracts" / "clinic.json"
    runner = CliRunner()
    options = ["--out", str(out), "--label", "y", "--categorical", "city", "--name", "clinic-data"]
    done = runner.invoke(app, ["contract", "draft", str(sample), *options])
    assert done.exit_code == 0, done.output
    assert "DRAFT suite 'clinic-data'" in done.output and "the sample passes it" in done.output
    suite = json.loads(out.read_text())
    assert suite["name"] == "clinic-data"
    assert suite["meta"]["fedround"]["source"] == "Clinic Sample.csv"
    assert "great_expectations_version" not in json.dumps(suite)  # GE's own edits stay out
    lines = out.read_text().splitlines()
    assert sum(line.strip().startswith('{"type": "expect_') for line in lines) == len(
        suite["expectations"]
    )  # one rule per line, for review and diffs

    printed = runner.invoke(app, ["contract", "draft", str(sample)])
    assert printed.exit_code == 0, printed.output
    assert json.loads(printed.stdout)["name"] == "clinic-sample-contract"

    again = runner.invoke(app, ["contract", "draft", str(sample), "--out", str(out)])
    assert again.exit_code == 1 and "exists: pass --force" in again.output


def test_cli_errors_are_one_clear_line(tmp_path: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(app, ["contract", "draft", str(tmp_path / "nope.csv")])
    assert missing.exit_code == 1 and "does not exist" in missing.stderr

    garbage = tmp_path / "broken.parquet"
    garbage.write_bytes(b"not parquet at all")
    unreadable = runner.invoke(app, ["contract", "draft", str(garbage)])
    assert unreadable.exit_code == 1 and "cannot read broken.parquet as parquet" in (
        unreadable.stderr
    )

    sample = write(sample_frame(), tmp_path / "s.csv")
    no_label = runner.invoke(app, ["contract", "draft", str(sample), "--label", "outcome"])
    assert no_label.exit_code == 1 and "['outcome'] are not in the sample" in no_label.stderr
    assert len(no_label.stderr.strip().splitlines()) == 1
