"""Secure aggregation at the site: the four messages of a round.

1. ``advert`` (when the site has trained): the site flattens its update (clipped, and
   noised for central DP), keeps it on its own disk with the round's fresh secrets, and
   uploads its public keys;
2. ``shares``: given the roster of the round's adverts, it secret-shares its self-mask
   seed and its mask key among the roster, each share encrypted to its recipient;
3. ``masked``: given the shares addressed to it, it uploads its weighted update masked so
   that the coordinator can recover only the sum;
4. ``unmask``: given which sites' masked updates arrived, it reveals the shares that
   remove the survivors' self-masks and the dropped sites' pair masks, then deletes the
   round's secrets.

Between the steps everything the site needs stays in its site-state folder (0600 files,
never uploaded), so each step is one short call: the embedded runtime runs it in a local
worker process, the distributed one in the site's session.
"""

from __future__ import annotations

import json
import os
import secrets as pysecrets
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedround.tasks.core.errors import FedroundError, UpdateRejected
from fedround.tasks.core.manifest import UpdateManifest
from fedround.tasks.core.secagg import (
    ClientSecrets,
    KeyAdvert,
    RoundParams,
    client_advertise,
    client_mask,
    client_share,
    client_unmask,
)
from fedround.tasks.core.serialization import sha256_hex
from fedround.tasks.core.signing import PeerKeys, verify_manifest
from fedround.tasks.object_store import ObjectStore, open_store
from fedround.tasks.secure_aggregation import (
    SecureRound,
    SecureStep,
    put_message,
    read_broadcast,
)

from .settings import SiteSettings
from .signing_key import load_signing_key
from .site_state import SiteState


class SecureAggregationError(FedroundError):
    """A secure-aggregation step cannot run at this site (its state is gone, a broadcast
    is unusable): the site drops out of the round, which recovers while t sites remain."""


def flatten(delta: dict[str, torch.Tensor]) -> np.ndarray:
    """The update as one float64 vector, tensors in sorted name order."""
    return np.concatenate(
        [delta[name].detach().to(torch.float64).reshape(-1).numpy() for name in sorted(delta)]
    )


class _RoundState:
    """The site's secrets and update of one round, on its own disk."""

    def __init__(self, settings: SiteSettings, federation: str, run_id: str, round_: int) -> None:
        root = SiteState(settings.site_state_dir, federation, run_id).folder
        self.folder = root / f"secagg-round-{round_:04d}"

    def save(self, secure: SecureRound, secrets: ClientSecrets, num_examples: int) -> None:
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        body = {
            "secure": secure.model_dump(mode="json"),
            "secrets": secrets.to_bytes().decode(),
            "num_examples": num_examples,
        }
        _write_private(self.folder / "state.json", json.dumps(body).encode())

    def save_update(self, vector: np.ndarray) -> None:
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_private(self.folder / "update.bin", vector.astype(np.float64).tobytes())

    def load(self) -> tuple[SecureRound, ClientSecrets, int]:
        try:
            body = json.loads((self.folder / "state.json").read_bytes())
            return (
                SecureRound.model_validate(body["secure"]),
                ClientSecrets.from_bytes(body["secrets"].encode()),
                int(body["num_examples"]),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SecureAggregationError(
                f"no usable secure-aggregation state in {self.folder} ({exc}): this site did "
                "not train the round, or lost its disk; it drops out of the round"
            ) from exc

    def load_update(self, length: int) -> np.ndarray:
        vector = np.frombuffer((self.folder / "update.bin").read_bytes(), dtype=np.float64)
        if vector.size != length:
            raise SecureAggregationError(
                f"the kept update has {vector.size} values, the round expects {length}"
            )
        return vector

    def delete(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _write_private(path: Path, data: bytes) -> None:
    temporary = path.with_suffix(".tmp")
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(handle, "wb") as out:
        out.write(data)
    os.replace(temporary, path)


def check_adverts(
    peer_keys_file: Path,
    params: RoundParams,
    adverts: dict[str, bytes],
    manifests: dict[str, Any],
) -> None:
    """Every advert of the roster is the one its site signed for this round, checked
    against the keys the federation owner gave this site (``fedround keys export``), so a
    coordinator cannot slip in keys of its own and read the shares. Any doubt: this site
    refuses to deal its shares (:class:`SecureAggregationError`, naming the site)."""
    try:
        peers = PeerKeys.from_json(peer_keys_file.read_bytes())
    except (OSError, ValueError) as exc:
        raise SecureAggregationError(
            f"peer_keys_file {peer_keys_file} is unusable ({exc}): ask the federation owner "
            "for a fresh `fedround keys export`"
        ) from exc
    if peers.federation != params.federation:
        raise SecureAggregationError(
            f"peer_keys_file {peer_keys_file} holds the keys of {peers.federation}, not "
            f"{params.federation}"
        )
    now = datetime.now(UTC)
    for site, raw in sorted(adverts.items()):
        ring = peers.rings.get(site)
        try:
            manifest = UpdateManifest.model_validate(manifests.get(site))
            if ring is None:
                raise ValueError(f"no pinned key for {site}: export the keys again")
            verify_manifest(manifest, ring.valid(now), now)
            expected = (params.federation, params.run_id, params.round, params.nonce, site)
            found = (manifest.federation, manifest.run_id, manifest.round, manifest.nonce)
            if (*found, manifest.site) != expected or manifest.encoding != "secagg-advert":
                raise ValueError("it is signed for another round, site or step")
            if manifest.sha256 != sha256_hex(raw):
                raise ValueError("it is not the advert its site signed")
        except (ValueError, UpdateRejected) as exc:
            raise SecureAggregationError(
                f"round {params.round}: the roster's advert of {site} does not check out "
                f"against the pinned keys ({exc}): refusing to deal shares"
            ) from exc


def start_secure_round(
    settings: SiteSettings,
    store: ObjectStore,
    secure: SecureRound,
    manifest: UpdateManifest,
    delta: dict[str, torch.Tensor],
) -> int:
    """Step 1: keep the update at the site and upload the round's public keys (the
    advert, signed like an update). Returns the bytes uploaded."""
    params = secure.params
    vector = flatten(delta)
    if vector.size != params.length:
        raise SecureAggregationError(
            f"the update has {vector.size} values, the round's parameters say {params.length}"
        )
    if secure.noise_std > 0:  # central DP: this site's share of the noise, from a secret seed
        rng = np.random.default_rng(pysecrets.randbits(128))
        vector = vector + rng.normal(0.0, secure.noise_std, size=vector.size)
    state = _RoundState(settings, manifest.federation, manifest.run_id, manifest.round)
    state.delete()  # a retried round starts clean
    secrets, advert = client_advertise(params, manifest.site)
    state.save_update(vector)
    state.save(secure, secrets, manifest.num_examples)
    return put_message(
        store, manifest, "advert", advert.model_dump_json().encode(), load_signing_key(settings)
    )


def run_secure_step(settings: SiteSettings, step: SecureStep) -> int:
    """Steps 2–4 (``step.step``): read the coordinator's broadcast, answer it. Returns the
    bytes uploaded; :class:`SecureAggregationError` when this site cannot take part."""
    from .site_round import check_serves

    check_serves(settings, step.federation, step.site)
    store = open_store(settings.object_store)
    state = _RoundState(settings, step.federation, step.run_id, step.round)
    secure, secrets, num_examples = state.load()
    params = secure.params
    if params.nonce != step.nonce:
        raise SecureAggregationError(
            f"the kept state is for nonce {params.nonce[:8]}, the coordinator asks for "
            f"{step.nonce[:8]}: a stale request"
        )
    where = (step.federation, step.run_id, step.round)
    metrics: dict[str, float] = {}
    try:
        if step.step == "shares":
            roster = read_broadcast(store, *where, "roster.json")
            raws = [str(raw).encode() for raw in roster["adverts"]]
            adverts = [KeyAdvert.model_validate_json(raw) for raw in raws]
            if settings.peer_keys_file is not None:
                check_adverts(
                    settings.peer_keys_file,
                    params,
                    {advert.site: raw for advert, raw in zip(adverts, raws, strict=True)},
                    dict(roster.get("manifests") or {}),
                )
            secrets, bundle = client_share(params, secrets, adverts)
            payload = bundle.model_dump_json().encode()
        elif step.step == "masked":
            roster = read_broadcast(store, *where, "roster.json")
            weight = float(roster["weights"][step.site])
            body = read_broadcast(store, *where, f"inbox-{step.site}.json")
            vector = state.load_update(params.length) * weight
            secrets, masked, clipped = client_mask(
                params, secrets, vector, list(body["shared"]), dict(body["inbox"])
            )
            payload = masked.tobytes()
            metrics["secagg_clipped"] = float(clipped)
        else:
            body = read_broadcast(store, *where, "survivors.json")
            shares = client_unmask(params, secrets, list(body["survivors"]), list(body["dropped"]))
            payload = shares.model_dump_json().encode()
    except (KeyError, TypeError, ValueError) as exc:
        raise SecureAggregationError(
            f"round {step.round}: the coordinator's {step.step} broadcast is unusable: {exc}"
        ) from exc
    if step.step == "unmask":
        state.delete()  # the round's secrets are no longer needed
    else:
        state.save(secure, secrets, num_examples)
    manifest = UpdateManifest(
        federation=step.federation,
        run_id=step.run_id,
        round=step.round,
        site=step.site,
        nonce=step.nonce,
        num_examples=num_examples,
        sha256="",
        nbytes=0,
        metrics=metrics,
    )
    return put_message(store, manifest, step.step, payload, load_signing_key(settings))
