"""``fedround contract``: data contracts (Great Expectations suites) for a federation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from fedround.tasks.core.errors import FedroundError

contract_app = typer.Typer(
    help="Data contracts: the Great Expectations suite every site's data is checked against.",
    no_args_is_help=True,
)


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


@contract_app.command("draft")
def draft(
    sample: Annotated[Path, typer.Argument(help="One sample of the data (Parquet or CSV).")],
    out: Annotated[
        Path | None, typer.Option(help="Write the suite here (JSON); default: print it.")
    ] = None,
    label: Annotated[
        str | None, typer.Option(help="The label column: its classes become a value set.")
    ] = None,
    categorical: Annotated[
        list[str] | None,
        typer.Option(help="A categorical column (repeat the option): its values form a set."),
    ] = None,
    name: Annotated[str | None, typer.Option(help="Suite name; default from the file.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing --out.")] = False,
) -> None:
    """Draft a data contract (a Great Expectations suite) from one sample of your data.

    Rules: the exact column set, per-column types, numeric ranges (the sample's min/max
    widened by 10 % of the range, rounded), null fractions, category sets of
    low-cardinality columns and of the label, row-count bounds.

    The draft copies values of the sample (ranges, categories) into the suite: run it on
    your own sample, review every rule against what all sites may hold, and commit the
    file with the federation config (`contract: <file>`). It is checked against the sample
    it came from before it is written.
    """
    from fedround.site_workers.contract import validate_frame
    from fedround.site_workers.contract_draft import (
        DraftError,
        draft_suite_from_file,
        suite_json,
    )
    from fedround.site_workers.data import DataError, read_table

    if out is not None and out.exists() and not force:
        _fail(f"{out} exists: pass --force to overwrite it")
    try:
        suite = draft_suite_from_file(sample, name=name, label=label, categorical=categorical or [])
        report = validate_frame(read_table(sample), suite, "sample")
    except (FedroundError, DataError, DraftError) as exc:
        _fail(str(exc))
        return
    if not report.success:  # a drafting bug, never the sample's fault
        _fail(f"the draft fails its own sample: {report.summary()}")
    text = suite_json(suite)
    json.loads(text)  # always valid JSON
    if out is None:
        typer.echo(text, nl=False)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    typer.echo(
        f"wrote {out}: DRAFT suite {suite['name']!r}, {len(suite['expectations'])} rules from "
        f"{report.row_count} sample rows; the sample passes it.\n"
        "Review it (ranges and category sets come from this one sample), then commit it with "
        "the federation config as its `contract:`."
    )


def register(app: typer.Typer) -> None:
    app.add_typer(contract_app, name="contract")
