"""Secure aggregation at a site: the client's four steps.

A site keeps :class:`ClientSecrets` between the steps (on its own disk, never uploaded):
its private keys and self-mask seed of the round, the roster, the shares it received.
Each step checks that the state belongs to the same :class:`RoundParams` and is at the
right step, and answers a repeated request only identically: a site that masked twice,
or shared twice, with different inputs would hand the coordinator what it needs to
unmask it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets as pysecrets
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import SecAggAborted, SecAggMessageError, SecAggParameterError, SecAggRefused
from .fixed_point import UIntArray
from .masks import derive_key, expand, pairwise_secret
from .messages import (
    COORDINATOR,
    SEED_BYTES,
    KeyAdvert,
    ShareBundle,
    UnmaskShares,
    b64,
    open_shares,
    seal_shares,
    seed_commitment,
    share_key,
    validation_summary,
)
from .params import RoundParams
from .shamir import split

ClientStep = Literal["advertised", "shared", "masked"]


class ClientSecrets(BaseModel):
    """A site's state between the steps of one round: its private keys and seed, the
    roster, the shares it received. Serializable (:meth:`to_bytes`) so the site keeps it
    on its own disk between steps; it must never leave the site. Secret fields are
    hidden from ``repr``."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, hide_input_in_errors=True)

    version: Literal[1] = 1
    context_digest: str  # sha256 of the RoundParams.context() it belongs to
    site: str
    step: ClientStep
    enc_private: str = Field(repr=False)
    mask_private: str = Field(repr=False)
    self_mask_seed: str = Field(repr=False)
    roster: list[KeyAdvert] = Field(default_factory=list)
    bundle: str | None = None  # the ShareBundle sent, JSON: returned again on a retry
    self_mask_shares: dict[str, str] = Field(default_factory=dict, repr=False)
    mask_key_shares: dict[str, str] = Field(default_factory=dict, repr=False)
    bad_senders: dict[str, str] = Field(default_factory=dict)  # sender → why its shares failed
    shared: list[str] = Field(default_factory=list)  # U2, as masked over
    masked_digest: str | None = None  # of (update, U2): masking twice only identically

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> ClientSecrets:
        try:
            return cls.model_validate_json(raw)
        except ValidationError as exc:
            raise SecAggParameterError(
                "the saved secure-aggregation state is not valid "
                f"({validation_summary(exc)}): this site cannot go on with the round and "
                "drops out"
            ) from None

    def _check(self, params: RoundParams, steps: tuple[ClientStep, ...], action: str) -> None:
        if self.context_digest != params.context_digest():
            raise SecAggParameterError(
                f"site {self.site}: the saved secrets belong to another round or other "
                f"parameters than the one to {action}: use the state saved for this round"
            )
        if self.step not in steps:
            raise SecAggParameterError(
                f"site {self.site}: cannot {action} at step {self.step!r} (needs "
                f"{' or '.join(steps)}): call the steps in order"
            )


def _private(text: str) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(base64.b64decode(text))


def _public(key: X25519PrivateKey) -> str:
    return b64(key.public_key().public_bytes_raw())


def client_advertise(params: RoundParams, site: str) -> tuple[ClientSecrets, KeyAdvert]:
    """Step 0 at ``site``: fresh key pairs and self-mask seed for this round, and the
    advert to publish."""
    params.index(site)
    enc, mask = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    seed = pysecrets.token_bytes(SEED_BYTES)
    context = params.context()
    advert = KeyAdvert(
        site=site,
        enc_public=_public(enc),
        mask_public=_public(mask),
        self_mask_commitment=seed_commitment(context, site, seed),
    )
    state = ClientSecrets(
        context_digest=hashlib.sha256(context).hexdigest(),
        site=site,
        step="advertised",
        enc_private=b64(enc.private_bytes_raw()),
        mask_private=b64(mask.private_bytes_raw()),
        self_mask_seed=b64(seed),
    )
    return state, advert


def _check_roster(
    params: RoundParams, state: ClientSecrets, roster: Sequence[KeyAdvert]
) -> list[KeyAdvert]:
    """The roster in index order, checked: SecAggMessageError if inconsistent."""
    seen: dict[str, KeyAdvert] = {}
    keys: set[str] = set()
    for advert in roster:
        if not isinstance(advert, KeyAdvert):
            raise SecAggMessageError(
                f"{COORDINATOR}: a roster entry is a {type(advert).__name__}, not a KeyAdvert",
                COORDINATOR,
            )
        advert.check(params)
        if advert.site in seen:
            raise SecAggMessageError(
                f"{COORDINATOR}: the roster lists site {advert.site} twice", COORDINATOR
            )
        for key in (advert.enc_public, advert.mask_public, advert.self_mask_commitment):
            if key in keys:
                raise SecAggMessageError(
                    f"{COORDINATOR}: site {advert.site}'s advert repeats a key or commitment "
                    "of another roster entry",
                    COORDINATOR,
                )
            keys.add(key)
        seen[advert.site] = advert
    own = seen.get(state.site)
    expected = (
        _public(_private(state.enc_private)),
        _public(_private(state.mask_private)),
        seed_commitment(params.context(), state.site, base64.b64decode(state.self_mask_seed)),
    )
    if own is None or (own.enc_public, own.mask_public, own.self_mask_commitment) != expected:
        raise SecAggMessageError(
            f"{COORDINATOR}: the roster "
            + ("leaves out" if own is None else "changed the keys of")
            + f" this site ({state.site}): refusing to share with it",
            COORDINATOR,
        )
    if len(seen) < params.threshold:
        raise SecAggAborted(
            f"only {len(seen)} sites advertised keys, fewer than the threshold "
            f"{params.threshold}: the round cannot finish"
        )
    return sorted(seen.values(), key=lambda advert: params.index(advert.site))


def client_share(
    params: RoundParams, secrets: ClientSecrets, roster: Sequence[KeyAdvert]
) -> tuple[ClientSecrets, ShareBundle]:
    """Step 1 at a site: t-of-|U1| shares of its self-mask seed and mask key, encrypted to
    each roster site (itself included).

    ``roster``: the adverts the coordinator accepted (U1). It must hold this site with its
    keys unchanged, only sites of the round, no site or key twice
    (:class:`SecAggMessageError`) and at least t sites (:class:`SecAggAborted`). Called
    again with the same roster it returns the same bundle; with another it refuses
    (:class:`SecAggRefused`)."""
    state = secrets
    state._check(params, ("advertised", "shared", "masked"), "share its secrets")
    entries = _check_roster(params, state, roster)
    if state.step != "advertised":
        if state.roster == entries and state.bundle is not None:
            return state, ShareBundle.model_validate_json(state.bundle)
        raise SecAggRefused(
            f"site {state.site}: its secrets were already shared with another roster; "
            "sharing again could hand the coordinator more shares",
            COORDINATOR,
        )
    context = params.context()
    indices = [params.index(advert.site) for advert in entries]
    seed_shares = split(base64.b64decode(state.self_mask_seed), params.threshold, indices)
    key_shares = split(base64.b64decode(state.mask_private), params.threshold, indices)
    enc_private = _private(state.enc_private)
    ciphertexts = {
        advert.site: seal_shares(
            share_key(enc_private, advert, context),
            context,
            state.site,
            advert.site,
            seed_shares[index],
            key_shares[index],
        )
        for advert, index in zip(entries, indices, strict=True)
    }
    bundle = ShareBundle(site=state.site, ciphertexts=ciphertexts)
    updated = state.model_copy(
        update={"step": "shared", "roster": entries, "bundle": bundle.model_dump_json()}
    )
    return updated, bundle


def _shared_sites(params: RoundParams, roster: Sequence[str], shared: Sequence[str]) -> list[str]:
    members = list(shared)
    if not all(isinstance(site, str) for site in members) or len(set(members)) != len(members):
        raise SecAggMessageError(
            f"{COORDINATOR}: the list of sites that shared repeats a site or is not names",
            COORDINATOR,
        )
    outside = sorted(set(members) - set(roster))
    if outside:
        raise SecAggMessageError(
            f"{COORDINATOR}: sites {outside} are said to have shared but are not in the roster",
            COORDINATOR,
        )
    return sorted(members, key=params.index)


def add_pair_masks(
    params: RoundParams,
    own: str,
    own_private: X25519PrivateKey,
    peers: Mapping[str, bytes],
    context: bytes,
    total: UIntArray,
) -> None:
    """Add own's pair masks with each of ``peers`` (site → mask public key) into
    ``total``, in place: +PRG(key) when own's index is below the peer's, −PRG else."""
    dtype = params.fixed_point().dtype
    below = params.index(own)
    for peer, public in peers.items():
        try:
            secret = pairwise_secret(own_private, public)
        except SecAggParameterError as exc:
            raise SecAggMessageError(f"site {peer}: mask_public: {exc}", peer) from None
        mask = expand(derive_key(secret, "pair-mask", context), params.length, dtype)
        if below < params.index(peer):
            np.add(total, mask, out=total)
        else:
            np.subtract(total, mask, out=total)


def client_mask(
    params: RoundParams,
    secrets: ClientSecrets,
    update: npt.ArrayLike,
    shared: Sequence[str],
    inbox: Mapping[str, str],
) -> tuple[ClientSecrets, UIntArray, int]:
    """Step 2 at a site: (new state, the masked update, how many coordinates were clipped).

    ``update``: the float64 flat update (``params.length`` values, finite). ``shared``: U2,
    the sites whose bundles the coordinator accepted; it must include this site, lie
    within the roster (:class:`SecAggMessageError`) and count at least t
    (:class:`SecAggAborted`). ``inbox``: sender → ciphertext of U2's shares for this site.
    A ciphertext that is missing, does not decrypt or does not match its commitments
    records the sender in ``bad_senders`` (this site then reports its shares unavailable
    at step 3); it does not stop the site.

    Called again it answers only the same update and U2 (the same masked vector:
    two different maskings would let the coordinator subtract them), else
    :class:`SecAggRefused`."""
    state = secrets
    state._check(params, ("shared", "masked"), "mask its update")
    roster = {advert.site: advert for advert in state.roster}
    members = _shared_sites(params, list(roster), shared)
    if state.site not in members:
        raise SecAggMessageError(
            f"{COORDINATOR}: this site ({state.site}) is not among the sites that shared",
            COORDINATOR,
        )
    if len(members) < params.threshold:
        raise SecAggAborted(
            f"only {len(members)} sites shared their secrets, fewer than the threshold "
            f"{params.threshold}: the round cannot finish"
        )
    values = np.asarray(update, dtype=np.float64)
    if values.shape != (params.length,):
        raise SecAggParameterError(
            f"the update has shape {values.shape}, the round's parameters say "
            f"({params.length},): flatten it in the agreed order"
        )
    digest = hashlib.sha256(values.tobytes() + json.dumps(members).encode()).hexdigest()
    if state.step == "masked" and digest != state.masked_digest:
        raise SecAggRefused(
            f"site {state.site}: it already masked its update for another update or other "
            "sites; masking twice would let the coordinator subtract the two",
            COORDINATOR,
        )
    context = params.context()
    if state.step == "shared":
        enc_private = _private(state.enc_private)
        self_shares: dict[str, str] = {}
        key_shares: dict[str, str] = {}
        bad: dict[str, str] = {}
        for sender in members:
            if sender not in inbox:
                bad[sender] = "no shares from it in the inbox"
                continue
            try:
                key = share_key(enc_private, roster[sender], context)
                self_share, key_share = open_shares(key, context, sender, state.site, inbox[sender])
            except SecAggMessageError as exc:
                bad[sender] = str(exc)
                continue
            self_shares[sender], key_shares[sender] = b64(self_share), b64(key_share)
        state = state.model_copy(
            update={
                "step": "masked",
                "self_mask_shares": self_shares,
                "mask_key_shares": key_shares,
                "bad_senders": bad,
                "shared": members,
                "masked_digest": digest,
            }
        )
    fixed_point = params.fixed_point()
    masked, clipped = fixed_point.encode(values)
    seed = base64.b64decode(state.self_mask_seed)
    self_mask = expand(derive_key(seed, "self-mask", context), params.length, fixed_point.dtype)
    np.add(masked, self_mask, out=masked)
    peers = {site: roster[site].mask_key() for site in members if site != state.site}
    add_pair_masks(params, state.site, _private(state.mask_private), peers, context, masked)
    return state, masked, clipped


def client_unmask(
    params: RoundParams,
    secrets: ClientSecrets,
    survivors: Sequence[str],
    dropped: Sequence[str],
) -> UnmaskShares:
    """Step 3 at a site: its shares of the survivors' (U3) self-mask seeds and of the
    dropped sites' (U2 \\ U3) mask keys.

    Refuses (:class:`SecAggRefused`) unless U3 and the dropped sites are disjoint, make up
    U2 exactly, U3 holds this site and at least t sites: a site never reveals both shares
    of one site (that would unmask its update). Call it once per round and then delete
    the secrets: the never-both rule holds across calls only if no second call sees
    them."""
    state = secrets
    state._check(params, ("masked",), "reveal its shares")
    alive, gone = list(survivors), list(dropped)
    names = [*alive, *gone]
    if not all(isinstance(site, str) for site in names) or len(set(names)) != len(names):
        both = sorted(set(alive) & set(gone))
        raise SecAggRefused(
            f"site {state.site}: refuses to reveal: "
            + (
                f"{both} are listed both as survivors and as dropped"
                if both
                else "a site is listed twice"
            )
            + " (revealing both shares of a site would unmask its update)",
            COORDINATOR,
        )
    if set(names) != set(state.shared):
        raise SecAggRefused(
            f"site {state.site}: refuses to reveal: survivors and dropped must be exactly the "
            f"sites that shared; unknown {sorted(set(names) - set(state.shared))}, left out "
            f"{sorted(set(state.shared) - set(names))}",
            COORDINATOR,
        )
    if state.site not in alive:
        raise SecAggRefused(
            f"site {state.site}: refuses to reveal: it is listed as dropped, yet asked", COORDINATOR
        )
    if len(alive) < params.threshold:
        raise SecAggRefused(
            f"site {state.site}: refuses to reveal: only {len(alive)} survivors, fewer than the "
            f"threshold {params.threshold}",
            COORDINATOR,
        )
    self_shares = {
        site: state.self_mask_shares[site] for site in alive if site in state.self_mask_shares
    }
    key_shares = {
        site: state.mask_key_shares[site] for site in gone if site in state.mask_key_shares
    }
    if self_shares.keys() & key_shares.keys():  # cannot happen: the lists are disjoint
        raise SecAggRefused(f"site {state.site}: would reveal both shares of a site", COORDINATOR)
    unavailable = [
        site for site in state.shared if site not in self_shares and site not in key_shares
    ]
    return UnmaskShares(
        site=state.site,
        self_mask_shares=self_shares,
        mask_key_shares=key_shares,
        unavailable=unavailable,
    )
