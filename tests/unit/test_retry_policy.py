"""Transient object-store errors are retried; validation failures never are."""

from __future__ import annotations

import pytest
from prefect.states import Failed

from fedround.tasks.core.errors import (
    ContractError,
    ObjectNotFound,
    ObjectStoreError,
    RejectReason,
    UpdateRejected,
)
from fedround.tasks.retry import only_transient


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (ObjectStoreError("connection reset by the S3 server"), True),
        (ObjectNotFound("no object s3://b/k"), True),
        (UpdateRejected(RejectReason.NOT_FINITE, "NaN"), False),
        (ContractError("suite is not valid"), False),
        (ValueError("anything else"), False),
    ],
)
def test_only_transient_errors_are_retried(error: Exception, retried: bool) -> None:
    assert only_transient(None, None, Failed(data=error)) is retried
