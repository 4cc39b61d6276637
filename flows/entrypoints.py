"""The coordinator's flows as deployments name them (kept free of heavy imports: the
coordinator's worker checks flow runs against them without importing the flows)."""

from __future__ import annotations

TRAINING_ENTRYPOINT = "fedround.flows.training:train_federation"
# Model lifecycle, run on demand (Prefect UI or `prefect deployment run`) in the coordinator pool.
LIFECYCLE_DEPLOYMENTS = (
    (
        "fedround-promotion",
        "fedround.flows.promotion:promote_model",
        "Evaluate the candidate against production at every site; promote it if it passes",
    ),
    (
        "fedround-rollback",
        "fedround.flows.rollback:rollback_model",
        "Restore the previous production model (or stop a canary rollout)",
    ),
)
PROJECT_DIR_ENV = "FEDROUND_PROJECT_DIR"
