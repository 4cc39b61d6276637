"""What a training run records for its lineage, beside the round loop.

The coordinator flow makes one :class:`TrainingLineage` per run, before anything else:

- it records the config's exact revision (git commit, DVC hash) and refuses a dirty
  config unless ``allow_dirty`` (:mod:`fedround.tasks.config_versioning`);
- it resolves ``--init-from models:/<name>@<alias>`` to a verified registered version,
  whose weights become the run's round-0 checkpoint (the new model is then a fine-tune);
- it sets the federation context, so every MLflow run started inside (ours, the sites',
  user code) is tagged by the ``fedround`` MLflow plugin;
- it stores the data-contract result of every site and, at the end, the sites left out
  per round, the cost of the run per site and tenant, and the training plots.

Recording after the rounds is best effort: a failure there is logged, never fails a run
whose model is already trained and registered.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedround.tasks import run_context
from fedround.tasks.config_versioning import ConfigRevision, config_revision
from fedround.tasks.core.config import (
    FederationConfig,
    load_contract_suite,
    load_federation_config,
)
from fedround.tasks.core.contract_report import ContractReport
from fedround.tasks.core.costs import SITE_FIGURES, summarize
from fedround.tasks.core.errors import ConfigError
from fedround.tasks.core.preprocessing import Preprocessor
from fedround.tasks.core.serialization import Weights, weights_from_bytes
from fedround.tasks.core.usercode import load_callable, resolve_model_config
from fedround.tasks.plots import PLOTS, training_plots
from fedround.tasks.registry import ModelRegistry, RegistryError, VerifiedModel, quiet_downloads

if TYPE_CHECKING:
    from fedround.tasks.tracking import RunTracker

log = logging.getLogger(__name__)

TAG = "fedround."
CONTRACTS_ARTIFACT = "lineage/contracts.json"
ROUNDS_ARTIFACT = "lineage/rounds.json"
COST_ARTIFACT = "cost/cost.json"


def load_run_json(mlflow_run_id: str, path: str, tracking_uri: str) -> Any:
    """A JSON artifact of an MLflow run, or ``None`` if it is absent or unreadable."""
    import mlflow.artifacts

    quiet_downloads()
    with tempfile.TemporaryDirectory(prefix="fedround-artifact-") as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(
                run_id=mlflow_run_id, artifact_path=path, dst_path=tmp, tracking_uri=tracking_uri
            )
            return json.loads(Path(local).read_text())
        except Exception:
            return None


def parse_model_uri(uri: str) -> str:
    """The model name in ``models:/<name>@<alias>`` or ``models:/<name>/<version>``."""
    if not uri.startswith("models:/") or len(uri) <= len("models:/"):
        raise ConfigError(
            f"--init-from {uri!r}: expected models:/<name>@<alias> or models:/<name>/<version>"
        )
    rest = uri[len("models:/") :]
    return rest.split("@", 1)[0].split("/", 1)[0]


def resolve_init_from(uri: str, config: FederationConfig, tracking_uri: str) -> VerifiedModel:
    """The registered model a run starts from, verified and checked to fit the config."""
    registry = ModelRegistry(tracking_uri, parse_model_uri(uri))
    try:
        parent = registry.verify(str(registry.resolve(uri).version))
    except RegistryError as exc:
        raise ConfigError(f"--init-from {uri}: {exc}") from exc
    wanted = config.model
    if parent.preprocessor is not None:  # a table model: its inputs are fixed by its preprocessor
        wanted = resolve_model_config(
            config.model, parent.preprocessor.n_features, parent.preprocessor.n_outputs
        )
    if parent.model_config != wanted:
        raise ConfigError(
            f"--init-from {uri}: {parent.name} v{parent.version} has model "
            f"{parent.model_config.model_dump()}, the config asks for "
            f"{wanted.model_dump()}; fine-tuning needs the same architecture"
        )
    return parent


def precheck(config_path: Path, allow_dirty: bool) -> None:
    """Refuse a dirty config, or a model factory this machine cannot import, in seconds,
    before any service starts (the coordinator builds the model; sites need it too)."""
    config = load_federation_config(config_path)
    load_contract_suite(config_path, config)
    load_callable(config.model.import_path, "model factory")
    if config.evaluation.evaluate and config.evaluation.holdout:
        load_callable(config.evaluation.evaluate, "evaluate function")
    if allow_dirty:
        return
    config_revision(config_path, config_path.parent / config.contract, allow_dirty=False)


@dataclass
class TrainingLineage:
    config: FederationConfig
    run_id: str
    revision: ConfigRevision
    parent: VerifiedModel | None = None

    @classmethod
    def prepare(
        cls,
        config_path: Path,
        run_id: str,
        tracking_uri: str,
        init_from: str | None = None,
        allow_dirty: bool = False,
    ) -> TrainingLineage:
        config = load_federation_config(config_path)
        revision = config_revision(config_path, config_path.parent / config.contract, allow_dirty)
        parent = resolve_init_from(init_from, config, tracking_uri) if init_from else None
        return cls(config, run_id, revision, parent)

    @contextmanager
    def context(self) -> Iterator[dict[str, str]]:
        with run_context.federation_context(
            federation=self.config.federation,
            tenant=self.config.tenant,
            run_id=self.run_id,
            config_revision=self.revision.revision,
        ) as fields:
            yield fields

    def run_tags(self) -> dict[str, str]:
        tags = {**self.revision.tags(), f"{TAG}allow_dirty": str(self.revision.allow_dirty).lower()}
        if self.parent is not None:
            tags[f"{TAG}parent_model"] = self.parent.name
            tags[f"{TAG}parent_version"] = self.parent.version
            tags[f"{TAG}parent_weights_sha256"] = self.parent.weights_sha256
        return tags

    def initial_preprocessor(self) -> Preprocessor | None:
        """A fine-tuned table model keeps its parent's preprocessing (its inputs' meaning)."""
        return self.parent.preprocessor if self.parent else None

    def initial_weights(self) -> Weights | None:
        """Round-0 weights: the parent's, when the run fine-tunes a registered model."""
        return weights_from_bytes(self.parent.weights_bytes) if self.parent else None

    def version_tags(self, tracker: RunTracker) -> tuple[dict[str, str], str | None]:
        """Lineage tags for the registered version, and its parent version (same model)."""
        run_tags = tracker.client.get_run(tracker.mlflow_run_id).data.tags
        keep = (
            "config_",
            "contract_",
            "allow_dirty",
            "parent_",
            "prefect_flow_run_id",
            "excluded_sites",
        )
        tags = {k: v for k, v in run_tags.items() if k.startswith(tuple(TAG + p for p in keep))}
        parent = None
        if run_tags.get(f"{TAG}parent_model") == self.config.model_name:
            parent = run_tags.get(f"{TAG}parent_version")
        return tags, parent

    def record_contracts(
        self, tracker: RunTracker, passed: dict[str, ContractReport], excluded: dict[str, str]
    ) -> None:
        results: dict[str, Any] = {
            site: {
                "success": True,
                "suite": report.suite,
                "rows": report.row_count,
                "rules": len(report.results),
                "summary": report.summary(),
            }
            for site, report in passed.items()
        }
        results.update({site: {"success": False, "summary": why} for site, why in excluded.items()})
        tracker.log_text(json.dumps(results, indent=2, sort_keys=True), CONTRACTS_ARTIFACT)

    def finish(
        self, tracker: RunTracker, rounds: list[dict[str, Any]], coordinator_seconds: float
    ) -> None:
        """Rounds' left-out sites, cost, plots: logged to the run, best effort."""
        try:
            self._log_rounds(tracker, rounds)
            self._log_cost_and_plots(tracker, coordinator_seconds)
        except Exception:
            log.warning("could not record the run's lineage report", exc_info=True)

    def _log_rounds(self, tracker: RunTracker, rounds: list[dict[str, Any]]) -> None:
        # an earlier attempt of a resumed run left its rounds behind
        merged: dict[str, Any] = (
            load_run_json(tracker.mlflow_run_id, ROUNDS_ARTIFACT, tracker.tracking_uri) or {}
        )
        merged.update({str(r["round"]): r for r in rounds})
        ordered = dict(sorted(merged.items(), key=lambda kv: int(kv[0])))
        tracker.log_text(json.dumps(ordered, indent=2), ROUNDS_ARTIFACT)

    def _log_cost_and_plots(self, tracker: RunTracker, coordinator_seconds: float) -> None:
        client = tracker.client
        run_id = tracker.mlflow_run_id
        keys = set(client.get_run(run_id).data.metrics)
        wanted_site = set(SITE_FIGURES) | {site for site, _ in PLOTS.values()}
        site_series: dict[str, dict[str, list[tuple[int, float]]]] = {}
        for key in sorted(keys):
            parts = key.split(".")
            if len(parts) == 3 and parts[0] == "site" and parts[2] in wanted_site:
                history = client.get_metric_history(run_id, key)
                site_series.setdefault(parts[1], {})[parts[2]] = [
                    (m.step, m.value) for m in history
                ]
        global_series = {
            metric: [(m.step, m.value) for m in client.get_metric_history(run_id, metric)]
            for metric in PLOTS
            if metric in keys
        }
        cost = summarize(
            {
                site: {figure: [v for _, v in series.get(figure, [])] for figure in SITE_FIGURES}
                for site, series in site_series.items()
            },
            self.config.tenant,
            coordinator_seconds,
        )
        tracker.log_metrics(cost.metrics(), step=self.config.rounds)
        tracker.log_text(json.dumps(cost.to_dict(), indent=2), COST_ARTIFACT)
        with tempfile.TemporaryDirectory(prefix="fedround-plots-") as tmp:
            for name, png in training_plots(global_series, site_series).items():
                path = Path(tmp) / name
                path.write_bytes(png)
                tracker.log_artifact(path, "plots")
