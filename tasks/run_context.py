"""The federation context of the current code: which federation, tenant, run, round and site.

:func:`federation_context` sets it for a block of code, in a context variable (exact for
threads and Prefect tasks) and in ``FEDROUND_*`` environment variables (inherited by
processes started inside the block, such as a site's training code). MLflow runs started
anywhere inside pick it up as tags through the ``fedround`` run-context plugin
(:mod:`fedround.mlflow_plugins.run_context`), without the caller passing anything.

This module is imported by that plugin inside every MLflow client: it imports nothing
heavy (no Prefect unless the process already uses it).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

FIELDS = ("federation", "tenant", "run_id", "round", "site", "config_revision")
ENV = {field: f"FEDROUND_{field.upper()}" for field in FIELDS}
TAG_PREFIX = "fedround."

log = logging.getLogger(__name__)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._:+@/-]{0,199}$")
_current: ContextVar[dict[str, str] | None] = ContextVar("fedround_context", default=None)


class BrokenContext(ValueError):
    """A context field has a value that cannot be right (the message says which)."""


def _check(fields: dict[str, str]) -> dict[str, str]:
    problems = []
    for key, value in fields.items():
        if key not in FIELDS:
            problems.append(f"unknown field {key!r}")
        elif key == "round" and not value.isdigit():
            problems.append(f"round must be a whole number, got {value!r}")
        elif key != "round" and not _NAME.match(value):
            problems.append(f"{key} has an unusable value {value!r}")
    if problems:
        raise BrokenContext("; ".join(problems))
    return fields


@contextmanager
def federation_context(**fields: str | int | None) -> Iterator[dict[str, str]]:
    """Run a block inside a federation context; fields not given are inherited."""
    given = {key: str(value) for key, value in fields.items() if value is not None}
    merged = {**current_fields(), **_check(given)}
    saved = {key: os.environ.get(ENV[key]) for key in FIELDS}
    token = _current.set(merged)
    os.environ.update({ENV[key]: value for key, value in merged.items()})
    try:
        yield merged
    finally:
        _current.reset(token)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(ENV[key], None)
            else:
                os.environ[ENV[key]] = value


def update(**fields: str | int | None) -> None:
    """Change fields of the current context in place (e.g. the round, as rounds advance).

    Inside :func:`federation_context` the change ends with the block; at the top level of
    a worker process serving one site call after another, it lasts until the next call.
    """
    given = _check({key: str(value) for key, value in fields.items() if value is not None})
    _current.set({**current_fields(), **given})
    os.environ.update({ENV[key]: value for key, value in given.items()})


def adopt(fields: dict[str, str | int]) -> None:
    """Take over a context sent by the coordinator (site side); bad fields only warn."""
    good = {}
    for key, value in fields.items():
        try:
            good.update(_check({key: str(value)}))
        except BrokenContext as exc:
            log.warning("ignoring part of the federation context: %s", exc)
    update(**good)


def current_fields() -> dict[str, str]:
    """The current context: the context variable if set, else ``FEDROUND_*`` variables."""
    found = _current.get()
    if found is not None:
        return dict(found)
    return {key: os.environ[ENV[key]] for key in FIELDS if os.environ.get(ENV[key])}


def prefect_flow_run_id() -> str | None:
    """The Prefect flow run this code runs in, if any (without importing Prefect)."""
    if "prefect" in sys.modules:
        try:
            from prefect import runtime

            found = runtime.flow_run.id
            if found:
                return str(found)
        except Exception:  # outside a flow run, or an older/broken Prefect
            pass
    return os.environ.get("PREFECT__FLOW_RUN_ID") or None


def usable_fields() -> tuple[dict[str, str], list[str]]:
    """The context fields that pass their checks, and a problem per field that does not."""
    fields, problems = {}, []
    for key, value in current_fields().items():
        try:
            fields.update(_check({key: value}))
        except BrokenContext as exc:
            problems.append(str(exc))
    return fields, problems


def mlflow_tags() -> dict[str, str]:
    """Tags for an MLflow run started here; raises :class:`BrokenContext` on bad values.

    Outside any federation context this is empty, even inside a Prefect flow run.
    """
    fields = _check(current_fields())
    return _tags(fields)


def _tags(fields: dict[str, str]) -> dict[str, str]:
    if not fields:
        return {}
    tags = {TAG_PREFIX + key: value for key, value in fields.items()}
    flow_run = prefect_flow_run_id()
    if flow_run:
        tags[TAG_PREFIX + "prefect_flow_run_id"] = flow_run
    return tags


def lenient_mlflow_tags() -> tuple[dict[str, str], list[str]]:
    """Tags from the usable fields only, and what was wrong with the others."""
    fields, problems = usable_fields()
    return _tags(fields), problems
