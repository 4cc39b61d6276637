"""Retry policy shared by coordinator and site tasks."""

from __future__ import annotations

from typing import Any

from fedround.tasks.core.errors import ObjectStoreError


def only_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry object-store trouble (network, server) only.

    Validation failures (a bad update, a broken data contract, a digest mismatch) fail
    the same way every time and are never retried.
    """
    try:
        state.result()
    except ObjectStoreError:
        return True
    except Exception:
        return False
    return False
