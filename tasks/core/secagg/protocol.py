"""Secure aggregation's four steps, for a site (client) and the coordinator (server).

Bonawitz, Ivanov, Kreuter, Marcedone, McMahan, Patel, Ramage, Segal and Seth, "Practical
Secure Aggregation for Privacy-Preserving Machine Learning", CCS 2017 (the semi-honest
protocol of Figure 4). All of it is pure: messages are JSON bytes in and out, the I/O is
the caller's (:mod:`fedround.tasks.secure_aggregation`). The pieces: :mod:`.params`,
:mod:`.messages`, :mod:`.client`, :mod:`.server`; this module runs them together
(:func:`simulate_round`, for tests and benchmarks).

0. :func:`client_advertise`: each site makes two fresh X25519 key pairs (one to encrypt
   shares, one to agree pair masks) and a self-mask seed, and publishes the public keys
   and a commitment to the seed (:class:`KeyAdvert`). The coordinator keeps the valid
   adverts, U1 (:meth:`SecAggServer.receive_adverts`).
1. :func:`client_share`: each site splits its seed and its mask private key into t-of-|U1|
   Shamir shares and encrypts each recipient's pair to it (AES-GCM) together with a hash
   commitment to each share (:class:`ShareBundle`, one for every site of U1, itself
   included). The coordinator forwards them: U2 = the sites whose bundles it accepted.
2. :func:`client_mask`: each site decrypts its shares and uploads
   y = encode(x) + PRG(self-mask) + Σ_{j ∈ U2, j ≠ i} ±PRG(pair key ij) mod 2**bits, with
   + when i's index is below j's: the pair masks cancel in the sum over U2.
   The coordinator adds the y that arrive (U3) into one running sum.
3. :func:`client_unmask`: each survivor reveals, for every site of U3, its share of that
   site's self-mask seed and, for every site that dropped (U2 \\ U3), its share of that
   site's mask key; never both for one site. The coordinator checks every revealed share
   against its commitment, rebuilds the secrets from t shares, removes the survivors'
   self-masks and the dropped sites' leftover pair masks, and decodes the sum
   (:meth:`SecAggServer.finish`).

A site's Shamir index is its position in ``RoundParams.sites`` plus one. Every key is
derived with HKDF bound to :meth:`RoundParams.context`, so nothing of one round (masks,
share encryption, commitments) is of use in another.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from .client import ClientSecrets, client_advertise, client_mask, client_share, client_unmask
from .errors import SecAggRefused
from .fixed_point import FloatArray
from .messages import KeyAdvert
from .params import RoundParams
from .server import SecAggServer


def simulate_round(
    params: RoundParams,
    updates: Mapping[str, npt.ArrayLike],
    *,
    drop_before_sharing: Sequence[str] = (),
    drop_after_masking: Sequence[str] = (),
    drop_before_unmasking: Sequence[str] = (),
) -> tuple[FloatArray, SecAggServer]:
    """Run a whole round in memory, every message through its JSON bytes and every site's
    state through :meth:`ClientSecrets.to_bytes`: (the decoded sum, the server).

    Sites of ``params.sites`` without an update never advertise. Dropouts:
    ``drop_before_sharing`` advertise but send no shares; ``drop_after_masking`` mask their
    update but it never arrives (U2 \\ U3: their pair masks are removed with their mask
    keys); ``drop_before_unmasking`` are in the sum but reveal no shares."""
    server = SecAggServer(params)
    states: dict[str, bytes] = {}
    adverts: dict[str, bytes] = {}
    for site in params.sites:
        if site in updates:
            state, advert = client_advertise(params, site)
            states[site], adverts[site] = state.to_bytes(), advert.model_dump_json().encode()
    roster_json = [advert.model_dump_json() for advert in server.receive_adverts(adverts)]
    bundles: dict[str, bytes] = {}
    for site in server.roster:
        if site in drop_before_sharing:
            continue
        roster = [KeyAdvert.model_validate_json(raw) for raw in roster_json]
        state, bundle = client_share(params, ClientSecrets.from_bytes(states[site]), roster)
        states[site], bundles[site] = state.to_bytes(), bundle.model_dump_json().encode()
    inboxes = server.receive_shares(bundles)
    dtype = params.fixed_point().dtype
    for site in server.shared:
        inbox = json.loads(json.dumps(inboxes[site]))
        state, masked, _ = client_mask(
            params, ClientSecrets.from_bytes(states[site]), updates[site], server.shared, inbox
        )
        states[site] = state.to_bytes()
        if site not in drop_after_masking:
            server.add_masked(site, np.frombuffer(masked.tobytes(), dtype=dtype))
    unmasks: dict[str, bytes] = {}
    for site in server.survivors:
        if site not in drop_before_unmasking:
            state = ClientSecrets.from_bytes(states[site])
            try:
                reveal = client_unmask(params, state, server.survivors, server.dropped)
            except SecAggRefused:  # too few survivors: no site answers, finish aborts
                continue
            unmasks[site] = reveal.model_dump_json().encode()
    return server.finish(unmasks), server
