"""MLflow tracking for one training run.

One MLflow run per training run (resumed, not duplicated, after a crash): parameters,
global metrics per round (``step=round``), per-site metrics, lineage tags. Registering the
global model at the end is the registry's job (``register_candidate(tracker, ...)`` in
:mod:`fedround.tasks.registry`, which imports this module, never the other way round).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from fedround.tasks.core.config import FederationConfig

log = logging.getLogger(__name__)

TAG = "fedround."


def flatten(prefix: str, value: Any) -> dict[str, str]:
    """Nested config → flat ``a.b.c`` MLflow params."""
    if isinstance(value, dict):
        flat: dict[str, str] = {}
        for key, inner in value.items():
            flat.update(flatten(f"{prefix}.{key}" if prefix else str(key), inner))
        return flat
    return {prefix: str(value)[:6000]}


def grant_promoters(
    tracking_uri: str,
    promoters: list[str],
    experiment_id: str | None = None,
    model_name: str | None = None,
) -> None:
    """Give ``promoters`` READ on the experiment and EDIT on the registered model, as the
    identity that created them (MANAGE on what it creates, in MLflow's basic auth).

    On a server whose ``default_permission`` is ``NO_PERMISSIONS`` nobody else sees a
    tenant's experiments and models; this lets the tenant's own promoters in. Nothing to do
    without promoters or on a local store (no server, no permissions)."""
    if not promoters or not tracking_uri.startswith(("http://", "https://")):
        return
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client

    auth = get_app_client("basic-auth", tracking_uri=tracking_uri)
    grants = [("experiment", experiment_id, "READ"), ("registered_model", model_name, "EDIT")]
    for user in promoters:
        for kind, resource, permission in grants:
            if resource is None:
                continue
            try:
                auth.grant_user_permission(user, kind, resource, permission)
            except MlflowException as exc:
                raise MlflowException(
                    f"could not grant MLflow user {user!r} (registry.promoters) {permission} "
                    f"on {kind} {resource!r}: {exc.message}. The server needs MLflow's "
                    "basic-auth app (fedround-auth) and the user must exist "
                    "(deployments/mlflow/create-users.py)"
                ) from exc


class RunTracker:
    """Thin wrapper over ``MlflowClient`` bound to one MLflow run."""

    def __init__(self, tracking_uri: str, mlflow_run_id: str) -> None:
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self.mlflow_run_id = mlflow_run_id

    @classmethod
    def start(
        cls,
        tracking_uri: str,
        config: FederationConfig,
        run_id: str,
        tags: dict[str, str],
        artifact_root: Path | None = None,
    ) -> RunTracker:
        """Find this training run's MLflow run (after a crash) or create it."""
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        experiment = client.get_experiment_by_name(config.federation)
        if experiment is None:
            location = (artifact_root / config.federation).as_uri() if artifact_root else None
            experiment_id = client.create_experiment(config.federation, artifact_location=location)
            grant_promoters(tracking_uri, config.registry.promoters, experiment_id=experiment_id)
        else:
            experiment_id = experiment.experiment_id
        found = client.search_runs(
            [experiment_id], filter_string=f"tags.`{TAG}run_id` = '{run_id}'", max_results=1
        )
        if found:
            tracker = cls(tracking_uri, found[0].info.run_id)
            client.update_run(tracker.mlflow_run_id, status="RUNNING")
            client.set_tag(tracker.mlflow_run_id, f"{TAG}resumed", "true")
            return tracker
        from mlflow.tracking.context.registry import resolve_tags

        # resolve_tags adds the run-context plugins' tags (fedround's federation context).
        run = client.create_run(
            experiment_id, run_name=run_id, tags=resolve_tags({f"{TAG}run_id": run_id, **tags})
        )
        tracker = cls(tracking_uri, run.info.run_id)
        params = flatten("", config.model_dump(mode="json", exclude={"sites", "description"}))
        params["sites"] = ",".join(s.name for s in config.sites)
        tracker.log_params(params)
        return tracker

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.mlflow_run_id, params=items[start : start + 100])

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.mlflow_run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def log_metrics(self, metrics: dict[str, float], step: int, wait: bool = True) -> None:
        """Log metrics at ``step``; ``wait=False`` queues them on MLflow's async logger (off a
        round's critical path; :meth:`finish` flushes the queue)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for start in range(0, len(items), 1000):
            self.client.log_batch(
                self.mlflow_run_id, metrics=items[start : start + 1000], synchronous=wait
            )

    def experiment_id(self) -> str:
        return str(self.client.get_run(self.mlflow_run_id).info.experiment_id)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.mlflow_run_id, text, artifact_file)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.mlflow_run_id, str(path), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        import mlflow

        # mlflow.flush_async_logging() flushes the store of the global tracking URI; point
        # it at this run's store first, or it flushes (and creates) ./mlflow.db instead.
        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.flush_async_logging()
        self.client.set_terminated(self.mlflow_run_id, status=status)
