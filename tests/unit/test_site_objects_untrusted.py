"""Objects a site writes are read with a size limit and parsed defensively: a malformed or
oversized one leaves that site out with a reason, it never fails the coordinator.

The dispatcher is driven directly over a real local object store (the site's objects are
written here the way a faulty or hostile site would write them); the S3 side of bounded
reads is tested in ``tests/integration/test_object_store_limits.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedround.flows.dispatch import SiteUnavailable
from fedround.flows.distributed import DistributedDispatcher, _Session
from fedround.tasks.aggregation import read_update
from fedround.tasks.core import keys
from fedround.tasks.core.config import load_federation_config
from fedround.tasks.core.errors import ObjectTooLarge, RejectReason, UpdateRejected
from fedround.tasks.core.limits import SESSION_STATE_MAX_BYTES, UPDATE_MANIFEST_MAX_BYTES
from fedround.tasks.core.manifest import UpdateManifest
from fedround.tasks.core.validation import UpdateExpectation
from fedround.tasks.object_store import LocalObjectStore
from fedround.tasks.secure_aggregation import SecureStep, manifest_key

pytestmark = pytest.mark.security("untrusted-site-objects")

CONFIG = Path(__file__).parents[1] / "e2e" / "distributed.yaml"
RUN, SITE = "run-1", "site-a"


def test_a_bounded_read_refuses_one_byte_more(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path)
    store.put("a/b.json", b"x" * 100)
    assert store.get("a/b.json", max_bytes=100) == b"x" * 100
    with pytest.raises(ObjectTooLarge, match="larger than the 99 bytes allowed"):
        store.get("a/b.json", max_bytes=99)
    assert len(store.get("a/b.json")) == 100  # unbounded reads stay for trusted objects


@pytest.fixture
def dispatcher(tmp_path: Path) -> DistributedDispatcher:
    config = load_federation_config(CONFIG)
    store = LocalObjectStore(tmp_path / "objects")
    fed = DistributedDispatcher(config, store, poll_s=0.01, liveness_s=5, join_timeout_s=5)
    fed.run_id = RUN
    fed.sessions[SITE] = _Session(attempt=1, started_at=0.0)
    return fed


def _heartbeat(fed: DistributedDispatcher, body: bytes) -> None:
    fed.store.put(keys.session_key(fed.config.federation, RUN, SITE, 1), body)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{}", "'beat' is 'None', not a whole number"),
        (b'{"beat": "7"}', "'beat' is '7', not a whole number"),
        (b"[1, 2]", "not a whole number"),
        (b"\xff\xfe not json", "heartbeat is unusable"),
        (b" " * (SESSION_STATE_MAX_BYTES + 1), "larger than the 65,536 bytes allowed"),
    ],
)
def test_an_unusable_heartbeat_leaves_the_site_out_with_the_reason(
    dispatcher: DistributedDispatcher, body: bytes, reason: str
) -> None:
    _heartbeat(dispatcher, body)
    assert not dispatcher._alive_or_joining(SITE)
    with pytest.raises(SiteUnavailable, match="heartbeat is unusable") as caught:
        dispatcher._poll(SITE, "round 1", 5, lambda: None, watch=True)
    assert reason in str(caught.value)
    _heartbeat(dispatcher, json.dumps({"beat": 3}).encode())  # a good one counts again
    dispatcher.malformed.clear()
    assert dispatcher._alive_or_joining(SITE)


def test_an_unusable_error_object_or_contract_report_is_a_reason_not_a_crash(
    dispatcher: DistributedDispatcher,
) -> None:
    federation = dispatcher.config.federation
    _heartbeat(dispatcher, b'{"beat": 1}')
    error_key = keys.round_error_key(federation, RUN, 1, SITE)
    for body, reason in [
        (b"[]", "not a JSON object"),
        (b"{", "its error object is unusable"),
        (b"x" * 70_000, "larger than the 65,536 bytes"),
    ]:
        dispatcher.store.put(error_key, body)
        assert reason in (dispatcher._error(error_key, "nonce") or "")
    dispatcher.store.put(keys.contract_report_key(federation, RUN, SITE), b'{"site": 1}')
    with pytest.raises(SiteUnavailable, match="its contract report is malformed"):
        dispatcher.check_contract(SITE, federation, RUN, timeout=5)


def _manifest(federation: str, metrics: dict[str, float] | None = None) -> UpdateManifest:
    """site-a's manifest for round 1 (nonce ``n``): 5 examples, a 10-byte update."""
    return UpdateManifest(
        federation=federation,
        run_id=RUN,
        round=1,
        site=SITE,
        nonce="n",
        num_examples=5,
        sha256="0" * 64,
        nbytes=10,
        metrics=metrics or {},
    )


def _expectation(max_bytes: int) -> UpdateExpectation:
    return UpdateExpectation("fed", RUN, 1, "n", SITE, {}, max_bytes, 100)


def test_oversized_updates_and_manifests_are_rejected_without_reading_them_whole(
    tmp_path: Path,
) -> None:
    store = LocalObjectStore(tmp_path)
    store.put(
        keys.update_manifest_key("fed", RUN, 1, SITE), b"{" + b" " * UPDATE_MANIFEST_MAX_BYTES
    )
    with pytest.raises(UpdateRejected) as caught:
        read_update(store, _expectation(1000))
    assert caught.value.reason is RejectReason.MALFORMED and "larger than" in str(caught.value)
    manifest = _manifest("fed")  # claims 10 bytes: what is read is bounded all the same
    store.put(keys.update_manifest_key("fed", RUN, 1, SITE), manifest.model_dump_json().encode())
    store.put(keys.update_key("fed", RUN, 1, SITE), bytes(4001))
    with pytest.raises(UpdateRejected) as caught:
        read_update(store, _expectation(4000))
    assert caught.value.reason is RejectReason.TOO_LARGE
    assert "larger than the limit of 4000 bytes" in str(caught.value)


def test_a_secure_step_message_is_waited_for_with_the_bound_it_is_read_with(
    dispatcher: DistributedDispatcher,
) -> None:
    # A step message (manifest) of 100 KiB is within the 1 MiB that the secure aggregation
    # reads it with: the dispatcher takes it as there, not the site as unavailable.
    federation = dispatcher.config.federation
    step = SecureStep(
        federation=federation, run_id=RUN, round=1, site=SITE, nonce="n", step="shares"
    )
    key = manifest_key(federation, RUN, 1, SITE, "shares")
    manifest = _manifest(federation, metrics={f"m{i:05d}": float(i) for i in range(4000)})
    raw = manifest.to_json()
    assert 64 * 1024 < len(raw) < UPDATE_MANIFEST_MAX_BYTES
    dispatcher.store.put(key, raw)
    assert dispatcher._step_answer(step) is True
    dispatcher.store.put(key, b"{" + b" " * UPDATE_MANIFEST_MAX_BYTES)  # one byte too many
    with pytest.raises(SiteUnavailable, match="larger than"):
        dispatcher._step_answer(step)
