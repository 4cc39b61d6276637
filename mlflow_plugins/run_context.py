"""MLflow run-context plugin: tag every run started inside a federation.

Registered in ``pyproject.toml`` under the ``mlflow.run_context_provider`` entry point, so
MLflow loads it in every process where fedround is installed. Any ``mlflow.start_run()``
made while a federation context is active (see :mod:`fedround.tasks.run_context`: the
coordinator, site processes, user code) gets the tags ``fedround.federation``,
``fedround.tenant``, ``fedround.run_id``, ``fedround.round``, ``fedround.site``,
``fedround.config_revision`` and ``fedround.prefect_flow_run_id``; explicit tags from the
caller still win. A broken context only warns: it never fails the host's run.
"""

from __future__ import annotations

import warnings

from mlflow.tracking.context.abstract_context import RunContextProvider

from fedround.tasks import run_context


class FederationContextWarning(UserWarning):
    """The federation context could not be read; the run goes on without those tags."""


def _warn(message: str) -> None:
    warnings.warn(f"fedround: {message}", FederationContextWarning, stacklevel=3)


class FederationRunContext(RunContextProvider):
    """Tags from :func:`fedround.tasks.run_context.mlflow_tags`."""

    def in_context(self) -> bool:
        try:
            return bool(run_context.current_fields())
        except Exception as exc:
            _warn(f"cannot read the federation context: {exc}")
            return False

    def tags(self) -> dict[str, str]:
        try:
            tags, problems = run_context.lenient_mlflow_tags()
        except Exception as exc:
            _warn(f"federation tags left off this MLflow run: {exc}")
            return {}
        if problems:
            _warn("broken federation context, these tags were left off: " + "; ".join(problems))
        return tags
