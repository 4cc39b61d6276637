"""Object-store key layout: predictable, per federation, with one prefix per site.

::

    <federation>/global/<run>/contract.json                       coordinator writes, sites read
    <federation>/global/<run>/round-0003/model.safetensors (+ model.json, control.safetensors)
    <federation>/updates/<site>/<run>/round-0003/update.safetensors (+ update.json)
    <federation>/checkpoints/<run>/round-0003/{weights.safetensors,strategy.json,manifest.json}
    <federation>/locks/promotion-<model>.json                     single-writer locks
    <federation>/audit/000000000042.jsonl                         append-only audit log
    <federation>/registry/site-keys/<site>.json                   sites' public keys

Everything a site may read lies under ``<federation>/global/`` and everything it may write
under ``<federation>/updates/<site>/``, so per-site object-store credentials can grant
exactly that (see :func:`site_read_prefix` and :func:`site_write_prefix`).
"""

from __future__ import annotations

import re

from .errors import ConfigError

_ROUND = re.compile(r"/round-(\d+)/")
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# A federation, tenant or site name (config.Name): one path segment, so a prefix or an S3
# grant built from it covers that name only.
NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"


def check_run_id(run_id: str) -> str:
    """``run_id`` if it can name a run's objects: one path segment of letters, digits,
    ``.``, ``_`` and ``-`` (at most 100, no ``..``); else a :class:`ConfigError`."""
    if not _RUN_ID.match(run_id) or ".." in run_id:
        raise ConfigError(
            f"run id {run_id[:120]!r} cannot name a run: use 1-100 letters, digits, '.', "
            "'_' or '-', starting with a letter or digit (no '/', no '..'), e.g. "
            "nightly-2026-12-01"
        )
    return run_id


def site_read_prefix(federation: str) -> str:
    return f"{federation}/global/"


def dispatch_keys_key(federation: str) -> str:
    """The coordinator's public dispatch keys, where the sites read them (not a run id:
    run ids never start with '_')."""
    return f"{site_read_prefix(federation)}_dispatch-keys.json"


def site_write_prefix(federation: str, site: str) -> str:
    return f"{federation}/updates/{site}/"


def contract_key(federation: str, run_id: str) -> str:
    return f"{site_read_prefix(federation)}{run_id}/contract.json"


def data_spec_key(federation: str, run_id: str) -> str:
    """The run's data declaration (kind, table columns, loader): what sites read and check."""
    return f"{site_read_prefix(federation)}{run_id}/data.json"


def preprocessing_key(federation: str, run_id: str) -> str:
    """The run's federated preprocessor (tables), merged from the sites' summaries."""
    return f"{site_read_prefix(federation)}{run_id}/preprocessing.json"


def global_prefix(federation: str, run_id: str, round_: int) -> str:
    return f"{site_read_prefix(federation)}{run_id}/round-{round_:04d}/"


def global_key(federation: str, run_id: str, round_: int) -> str:
    return f"{global_prefix(federation, run_id, round_)}model.safetensors"


def global_manifest_key(federation: str, run_id: str, round_: int) -> str:
    return f"{global_prefix(federation, run_id, round_)}model.json"


def global_control_key(federation: str, run_id: str, round_: int) -> str:
    """SCAFFOLD: the server's control variate c for the round, beside its global model."""
    return f"{global_prefix(federation, run_id, round_)}control.safetensors"


def update_prefix(federation: str, run_id: str, round_: int, site: str) -> str:
    return f"{site_write_prefix(federation, site)}{run_id}/round-{round_:04d}/"


def update_key(federation: str, run_id: str, round_: int, site: str) -> str:
    return f"{update_prefix(federation, run_id, round_, site)}update.safetensors"


def update_manifest_key(federation: str, run_id: str, round_: int, site: str) -> str:
    return f"{update_prefix(federation, run_id, round_, site)}update.json"


def secagg_site_key(federation: str, run_id: str, round_: int, site: str, name: str) -> str:
    """A site's secure-aggregation message of a round (its advert, shares, masked update,
    unmasking shares), in the site's own write prefix."""
    return f"{update_prefix(federation, run_id, round_, site)}secagg/{name}"


def secagg_round_key(federation: str, run_id: str, round_: int, name: str) -> str:
    """The coordinator's secure-aggregation broadcast of a round (roster, inboxes,
    survivors), beside the round's global model where every site reads."""
    return f"{global_prefix(federation, run_id, round_)}secagg/{name}"


def checkpoints_prefix(federation: str, run_id: str) -> str:
    return f"{federation}/checkpoints/{run_id}/"


def checkpoint_prefix(federation: str, run_id: str, round_: int) -> str:
    return f"{checkpoints_prefix(federation, run_id)}round-{round_:04d}/"


def checkpoint_rounds(keys: list[str]) -> list[int]:
    """Round numbers of committed checkpoints (those with a manifest), ascending."""
    rounds = {
        int(m.group(1))
        for key in keys
        if key.endswith("/manifest.json") and (m := _ROUND.search(key))
    }
    return sorted(rounds)


def evaluation_model_key(federation: str, evaluation_id: str, label: str) -> str:
    """A model published for federated evaluation (e.g. ``candidate`` or ``production``)."""
    return f"{site_read_prefix(federation)}evaluations/{evaluation_id}/{label}.safetensors"


def evaluation_preprocessing_key(federation: str, evaluation_id: str, label: str) -> str:
    """The preprocessor of a table model published for federated evaluation (JSON)."""
    return f"{site_read_prefix(federation)}evaluations/{evaluation_id}/{label}.preprocessing.json"


# --- the control plane of a distributed run (small JSON objects) -------------------------


def run_pointer_key(federation: str, run_id: str) -> str:
    """``{"state": "running"|"finished"|"failed", "round": r, "nonce": …}``: what is open now."""
    return f"{site_read_prefix(federation)}{run_id}/current.json"


def round_plan_key(federation: str, run_id: str, round_: int) -> str:
    """The open round's plan: one round spec per selected site."""
    return f"{global_prefix(federation, run_id, round_)}plan.json"


def site_run_prefix(federation: str, run_id: str, site: str) -> str:
    return f"{site_write_prefix(federation, site)}{run_id}/"


def session_key(federation: str, run_id: str, site: str, attempt: int) -> str:
    """A site session's heartbeat (a counter the session bumps every second)."""
    return f"{site_run_prefix(federation, run_id, site)}sessions/{attempt:04d}.json"


def contract_report_key(federation: str, run_id: str, site: str) -> str:
    return f"{site_run_prefix(federation, run_id, site)}contract.json"


def round_error_key(federation: str, run_id: str, round_: int, site: str) -> str:
    """Written by a site that could not complete a round, so the coordinator stops waiting."""
    return f"{update_prefix(federation, run_id, round_, site)}error.json"


def evaluation_result_key(federation: str, evaluation_id: str, site: str) -> str:
    return f"{site_write_prefix(federation, site)}evaluations/{evaluation_id}.json"


# --- model lifecycle (coordinator only: no site credential reaches these prefixes) --------


def lock_key(federation: str, name: str) -> str:
    """A single-writer lock, e.g. ``promotion-<model>`` (see :mod:`fedround.tasks.locks`)."""
    return f"{federation}/locks/{name}.json"


def site_keys_prefix(federation: str) -> str:
    return f"{federation}/registry/site-keys/"


def site_keys_key(federation: str, site: str) -> str:
    """The public keys registered for ``site`` (see :mod:`fedround.tasks.core.signing`)."""
    return f"{site_keys_prefix(federation)}{site}.json"


def audit_prefix(federation: str) -> str:
    return f"{federation}/audit/"


def audit_entry_key(federation: str, sequence: int) -> str:
    """Entry ``sequence`` of the federation's append-only audit log (one JSON line)."""
    return f"{audit_prefix(federation)}{sequence:012d}.jsonl"


# --- privacy-budget ledgers (coordinator only; per tenant, across its federations) --------
# ``_`` cannot begin a federation name, so these keys never fall under a federation's prefix.


def tenant_prefix(tenant: str) -> str:
    """What a tenant keeps beside its federations' prefixes (its privacy ledgers)."""
    return f"_tenants/{tenant}/"


def privacy_ledger_prefix(tenant: str, site: str | None = None) -> str:
    """The ledger of ``tenant`` (``site=None``) or of one of its sites."""
    scope = "tenant" if site is None else f"sites/{site}"
    return f"{tenant_prefix(tenant)}privacy-ledger/{scope}/"


def privacy_ledger_entry_key(tenant: str, site: str | None, sequence: int) -> str:
    return f"{privacy_ledger_prefix(tenant, site)}{sequence:012d}.json"


def privacy_ledger_head_key(tenant: str, site: str | None) -> str:
    return f"{privacy_ledger_prefix(tenant, site)}head.json"
