"""Secure aggregation's messages in the object store (the protocol itself is pure:
:mod:`fedround.tasks.core.secagg`).

A site writes each of its four messages (``advert``, ``shares``, ``masked``, ``unmask``)
in its own write prefix as a payload and an :class:`UpdateManifest` signed with its
Ed25519 key, exactly as it uploads an update: the manifest names the run, round, nonce,
site, the payload's digest and size and the step (``encoding: secagg-<step>``). The
advert's manifest takes the place of the update manifest, so a round's dispatch notices
a site that finished training in both runtimes without knowing about secure aggregation.
The coordinator reads a message only after the signature verifies, in one bounded read,
and checks the digest; anything else rejects the site with a reason.

The coordinator's broadcasts (roster, inboxes, survivors) go beside the round's global
model, where every site of the federation reads.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from fedround.tasks.core import keys
from fedround.tasks.core.errors import ObjectTooLarge, RejectReason, UpdateRejected
from fedround.tasks.core.limits import UPDATE_MANIFEST_MAX_BYTES
from fedround.tasks.core.manifest import UpdateManifest
from fedround.tasks.core.secagg import RoundParams
from fedround.tasks.core.serialization import sha256_hex
from fedround.tasks.core.signing import SigningKey, sign_manifest
from fedround.tasks.core.validation import UpdateExpectation, check_manifest, check_signature
from fedround.tasks.object_store import ObjectStore

Step = Literal["advert", "shares", "masked", "unmask"]
SiteStep = Literal["shares", "masked", "unmask"]  # the steps after training
ENCODING_PREFIX = "secagg-"
BROADCAST_MAX_BYTES = 64 * 1024 * 1024  # a roster or inbox of thousands of sites fits


class SecureRound(BaseModel):
    """What a round spec adds under secure aggregation: the protocol's parameters (the
    round's sites, threshold, encoding) and the noise each site adds for central DP."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    params: RoundParams
    noise_std: float = Field(0.0, ge=0, description="σ·C/√t per site (central DP), else 0")


class SecureStep(BaseModel):
    """The coordinator asks a site for its next secure-aggregation message."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    federation: str
    run_id: str
    round: int
    site: str
    nonce: str
    step: SiteStep


def manifest_key(federation: str, run_id: str, round_: int, site: str, step: Step) -> str:
    if step == "advert":  # in the update's place: dispatch waits for it like for an update
        return keys.update_manifest_key(federation, run_id, round_, site)
    return keys.secagg_site_key(federation, run_id, round_, site, f"{step}.json")


def payload_key(federation: str, run_id: str, round_: int, site: str, step: Step) -> str:
    return keys.secagg_site_key(federation, run_id, round_, site, f"{step}.bin")


def step_error_key(federation: str, run_id: str, round_: int, site: str, step: Step) -> str:
    """Where a site's session says why it could not answer a step."""
    return keys.secagg_site_key(federation, run_id, round_, site, f"{step}-error.json")


def put_message(
    store: ObjectStore,
    manifest: UpdateManifest,
    step: Step,
    payload: bytes,
    signing_key: SigningKey | None,
) -> int:
    """Upload one site message (payload first, signed manifest last); bytes written.

    ``manifest`` carries the round's identity, example count and metrics; its digest,
    size and encoding are set here."""
    body = manifest.model_copy(
        update={
            "sha256": sha256_hex(payload),
            "nbytes": len(payload),
            "encoding": f"{ENCODING_PREFIX}{step}",
            "key_id": None,
            "signature": None,
        }
    )
    if signing_key is not None:
        body = sign_manifest(body, signing_key)
    where = (manifest.federation, manifest.run_id, manifest.round, manifest.site)
    store.put(payload_key(*where, step), payload)
    raw = body.to_json()
    store.put(manifest_key(*where, step), raw)
    return len(payload) + len(raw)


def read_message(
    store: ObjectStore, expected: UpdateExpectation, step: Step, max_bytes: int
) -> tuple[UpdateManifest, bytes]:
    """A site's message of the open round, verified: :class:`UpdateRejected` otherwise."""
    where = (expected.federation, expected.run_id, expected.round, expected.site)
    try:
        raw = store.get(manifest_key(*where, step), max_bytes=UPDATE_MANIFEST_MAX_BYTES)
        manifest = UpdateManifest.from_json(raw)
    except ObjectTooLarge as exc:
        raise UpdateRejected(RejectReason.MALFORMED, f"{step} manifest: {exc}") from exc
    except ValueError as exc:
        raise UpdateRejected(
            RejectReason.MALFORMED, f"{step} manifest is not valid: {exc}"
        ) from exc
    check_signature(manifest, expected)  # before anything else is trusted
    check_manifest(manifest, expected)
    if manifest.encoding != f"{ENCODING_PREFIX}{step}":
        raise UpdateRejected(
            RejectReason.MALFORMED,
            f"expected a secure-aggregation {step} message, got encoding {manifest.encoding!r}",
        )
    try:
        payload = store.get(payload_key(*where, step), max_bytes=max_bytes)
    except ObjectTooLarge as exc:
        raise UpdateRejected(
            RejectReason.TOO_LARGE, f"{step} message larger than {max_bytes} bytes"
        ) from exc
    if len(payload) != manifest.nbytes or sha256_hex(payload) != manifest.sha256:
        raise UpdateRejected(
            RejectReason.DIGEST_MISMATCH,
            f"{step} message does not match its manifest's digest or size",
        )
    return manifest, payload


def put_broadcast(
    store: ObjectStore, federation: str, run_id: str, round_: int, name: str, body: Any
) -> None:
    """A coordinator broadcast of the round (JSON), readable by every site."""
    store.put(
        keys.secagg_round_key(federation, run_id, round_, name),
        json.dumps(body, sort_keys=True).encode(),
    )


def read_broadcast(
    store: ObjectStore, federation: str, run_id: str, round_: int, name: str
) -> dict[str, Any]:
    """A coordinator broadcast, read once and bounded; a JSON object or ``ValueError``."""
    raw = store.get(
        keys.secagg_round_key(federation, run_id, round_, name), max_bytes=BROADCAST_MAX_BYTES
    )
    body = json.loads(raw)
    if not isinstance(body, dict):
        raise ValueError(f"secure-aggregation broadcast {name} is not a JSON object")
    return body
