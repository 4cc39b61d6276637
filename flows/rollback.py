"""The rollback flow: restore the previous production model in one command.

``rollback_model`` (``fedround rollback <federation.yaml>``, or from the Prefect UI) takes
the same lock as promotions. If a staged rollout is in progress it is stopped (the canary
sites' aliases are removed, they serve ``production`` again); otherwise ``production``
moves back to the previous production version, after checking that version's artifacts
against their digests. The rolled-back version is tagged ``rolled_back`` and the action
is appended to the audit log with who, when and why.

A dirty config does not block a rollback (it only names the model and the object store):
an emergency must not wait for a commit. Nor does a dead promotion: its lock is taken over
once its lease runs out, at once if it ran on this machine and its process is gone, and
with ``break_lock`` (``fedround rollback --break-lock --reason TEXT``) right away, audited.
A promotion that died half-way is repaired first (finished if its alias had moved), so
the rollback starts from the registry's real state.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from pydantic import BaseModel

from fedround.flows.promotion import open_lifecycle, promotion_lock
from fedround.tasks.audit import AuditLog
from fedround.tasks.core.config import FederationConfig
from fedround.tasks.lifecycle import Lifecycle, break_lock_audited
from fedround.tasks.locks import Lock, LockHeld
from fedround.tasks.object_store import ObjectStore
from fedround.tasks.registry import PRODUCTION


class RollbackResult(BaseModel):
    federation: str
    model: str
    stage: str
    rolled_back: str | None
    production: str | None
    audit_sequence: int
    message: str


@flow(name="fedround-rollback", validate_parameters=False)
def rollback_model(
    config_path: str, reason: str = "", lock_wait_s: float = 0.0, break_lock: bool = False
) -> RollbackResult:
    """Stop a canary in progress, else put the previous production version back.
    ``break_lock``: if a promotion's lock is held, break it first (needs a ``reason``)."""
    # A dirty config does not block a rollback: an emergency must not wait for a commit.
    config, revision, store, registry, audit = open_lifecycle(config_path, allow_dirty=True)
    lock = _take_lock(store, config, audit, reason, lock_wait_s, break_lock)
    try:
        lifecycle = Lifecycle(registry, audit, lock, revision)
        for repaired in lifecycle.reconcile():
            get_run_logger().warning(
                "repaired first: audit #%d %s", repaired.sequence, repaired.reason
            )
        audited = lifecycle.roll_back(reason)
    finally:
        lock.release()
    stage = str(audited.details.get("stage"))
    production = registry.aliases().get(PRODUCTION)
    if stage == "canary":
        message = (
            f"stopped the canary of {config.model_name} v{audited.version}: every site serves "
            f"{'v' + production if production else 'no model'} again"
        )
        rolled_back = audited.version
    else:
        rolled_back = str(audited.details.get("from"))
        message = (
            f"{config.model_name} production rolled back from v{rolled_back} to "
            f"v{audited.version} ({audited.semver})"
        )
    get_run_logger().info("%s (audit #%d)", message, audited.sequence)
    return RollbackResult(
        federation=config.federation,
        model=config.model_name,
        stage=stage,
        rolled_back=rolled_back,
        production=production,
        audit_sequence=audited.sequence,
        message=message,
    )


def _take_lock(
    store: ObjectStore,
    config: FederationConfig,
    audit: AuditLog,
    reason: str,
    wait_s: float,
    break_lock: bool,
) -> Lock:
    lock = promotion_lock(store, config, f"roll back {config.model_name}")
    try:
        return lock.acquire(wait_s)
    except LockHeld as exc:
        if not break_lock:
            raise LockHeld(
                f"{exc} If that holder is gone (a crashed promotion), roll back now with "
                "--break-lock --reason TEXT"
            ) from None
    name = f"promotion-{config.model_name}"
    entry = break_lock_audited(store, audit, name, reason)
    get_run_logger().warning(
        "broke the lock %s of %s (audit #%d): %s",
        name,
        entry.details["broken_lock"].get("holder"),
        entry.sequence,
        reason,
    )
    return lock.acquire(wait_s)
