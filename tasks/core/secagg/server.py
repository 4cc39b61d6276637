"""Secure aggregation at the coordinator: one :class:`SecAggServer` per round.

It forwards the sites' encrypted shares, adds the masked updates into one running sum
(memory O(length), whatever the number of sites), and at the end rebuilds from t
revealed shares each survivor's self-mask seed and each dropped site's mask key, checks
them against the sites' own commitments, and removes the masks. It never sees one
site's update: only the sum of the survivors'.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from .client import add_pair_masks
from .errors import SecAggAborted, SecAggMessageError, SecAggParameterError
from .fixed_point import FloatArray
from .masks import KEY_BYTES, derive_key, expand
from .messages import (
    SEED_BYTES,
    KeyAdvert,
    ShareBundle,
    ShareKind,
    UnmaskShares,
    ciphertext_commitments,
    seed_commitment,
    share_commitment,
)
from .params import RoundParams
from .shamir import combine


class SecAggServer:
    """The coordinator's side of one round. Streaming: memory O(length) for the masked
    vectors (one running sum), O(sites²) small strings for the shares.

    Call :meth:`receive_adverts`, :meth:`receive_shares`, :meth:`add_masked` for each
    masked update, then :meth:`finish`. A message that is malformed or inconsistent
    excludes its site, with the reason in :attr:`rejected`; fewer than t sites left at any
    step raises :class:`SecAggAborted` (nothing of the round may be applied)."""

    def __init__(self, params: RoundParams) -> None:
        self.params = params
        self._context = params.context()
        self._fixed_point = params.fixed_point()
        self._stage = "adverts"
        self._rejected: dict[str, str] = {}
        self._adverts: dict[str, KeyAdvert] = {}  # U1
        self._commitments: dict[tuple[str, str], tuple[bytes, bytes]] = {}  # (owner, recipient)
        self._shared: list[str] = []  # U2
        self._survivors: list[str] = []  # U3, in arrival order
        self._complaints: dict[str, list[str]] = {}
        self._sum = np.zeros(0, dtype=self._fixed_point.dtype)

    @property
    def roster(self) -> list[str]:
        """U1: the sites whose adverts were accepted, in index order."""
        return list(self._adverts)

    @property
    def shared(self) -> list[str]:
        """U2: the sites whose share bundles were accepted, in index order."""
        return list(self._shared)

    @property
    def survivors(self) -> list[str]:
        """U3: the sites whose masked update is in the sum, in index order."""
        return sorted(self._survivors, key=self.params.index)

    @property
    def dropped(self) -> list[str]:
        """U2 \\ U3: sites that shared but whose masked update is not in the sum."""
        return [site for site in self._shared if site not in self._survivors]

    @property
    def rejected(self) -> dict[str, str]:
        """Site → why one of its messages was excluded. A site rejected at the unmask step
        is still a survivor: its update is in the sum, only its revealed shares were
        discarded (all of them, once one is wrong)."""
        return dict(self._rejected)

    @property
    def complaints(self) -> dict[str, list[str]]:
        """Owner → the survivors that reported its shares unavailable (missing, altered,
        or not matching their commitments): evidence against the owner or the
        coordinator's transport, never proof."""
        return {owner: list(sites) for owner, sites in self._complaints.items()}

    def _enter(self, stage: str, action: str, after: str) -> None:
        if self._stage != stage:
            raise SecAggParameterError(
                f"cannot {action} at the {self._stage} stage: call it {after}"
            )

    def _abort(self, message: str) -> SecAggAborted:
        self._stage = "aborted"
        return SecAggAborted(message)

    def receive_adverts(self, adverts: Mapping[str, bytes]) -> list[KeyAdvert]:
        """Step 0: the valid adverts (U1, in index order) from site → raw JSON. A site
        outside the round, a malformed advert, or a key or commitment shared with another
        site's advert (both are excluded: either could be the copy) are rejected."""
        self._enter("adverts", "receive adverts", "first, once")
        valid: dict[str, KeyAdvert] = {}
        for site in sorted(adverts):
            if site not in self.params.sites:
                self._rejected[site] = f"site {site}: not one of the round's sites"
                continue
            try:
                valid[site] = KeyAdvert.parse(adverts[site], site, self.params)
            except SecAggMessageError as exc:
                self._rejected[site] = str(exc)
        owners: dict[str, list[str]] = {}
        for site, advert in valid.items():
            for key in (advert.enc_public, advert.mask_public, advert.self_mask_commitment):
                owners.setdefault(key, []).append(site)
        for sites in owners.values():
            for site in sites if len(sites) > 1 else ():
                others = sorted(set(sites) - {site})
                self._rejected[site] = (
                    f"site {site}: its advert repeats a key or commitment of {others}"
                )
                valid.pop(site, None)
        self._adverts = {site: valid[site] for site in sorted(valid, key=self.params.index)}
        if len(valid) < self.params.threshold:
            raise self._abort(
                f"only {len(valid)} valid key adverts, fewer than the threshold "
                f"{self.params.threshold}"
            )
        self._stage = "shares"
        return list(self._adverts.values())

    def receive_shares(self, bundles: Mapping[str, bytes]) -> dict[str, dict[str, str]]:
        """Step 1: each accepted site's inbox, recipient → {sender → ciphertext}, from
        site → raw bundle JSON. A bundle must address exactly the roster (its sender
        included); the accepted senders are U2."""
        self._enter("shares", "receive shares", "after receive_adverts, once")
        roster = set(self._adverts)
        accepted: dict[str, ShareBundle] = {}
        for site in sorted(bundles):
            if site not in roster:
                self._rejected.setdefault(
                    site, f"site {site}: sent shares without an accepted key advert"
                )
                continue
            try:
                bundle = ShareBundle.parse(bundles[site], site, self.params)
            except SecAggMessageError as exc:
                self._rejected[site] = str(exc)
                continue
            missing = sorted(roster - bundle.ciphertexts.keys())
            extra = sorted(bundle.ciphertexts.keys() - roster)
            if missing or extra:
                self._rejected[site] = (
                    f"site {site}: its shares must address exactly the roster; missing "
                    f"{missing}, not in the roster {extra}"
                )
                continue
            accepted[site] = bundle
        self._shared = sorted(accepted, key=self.params.index)
        if len(self._shared) < self.params.threshold:
            raise self._abort(
                f"only {len(self._shared)} sites sent valid shares, fewer than the threshold "
                f"{self.params.threshold}"
            )
        for owner, bundle in accepted.items():
            for recipient, text in bundle.ciphertexts.items():
                self._commitments[owner, recipient] = ciphertext_commitments(text)
        self._sum = np.zeros(self.params.length, dtype=self._fixed_point.dtype)
        self._stage = "masked"
        return {
            recipient: {sender: accepted[sender].ciphertexts[recipient] for sender in self._shared}
            for recipient in self._shared
        }

    def add_masked(self, site: str, masked: npt.NDArray[Any]) -> None:
        """Step 2: add ``site``'s masked update into the running sum. It must come from U2,
        once, as a flat array of the field's dtype and the round's length: else
        :class:`SecAggMessageError` and the site is excluded (it counts as dropped)."""
        self._enter("masked", "add a masked update", "after receive_shares")
        if site in self._survivors:
            raise SecAggMessageError(f"site {site}: its masked update was already added", site)
        if site not in self._shared:
            raise SecAggMessageError(
                f"site {site}: not among the sites whose shares were accepted", site
            )
        if site in self._rejected:
            raise SecAggMessageError(f"site {site}: already excluded: {self._rejected[site]}", site)
        problem = None
        if not isinstance(masked, np.ndarray):
            problem = f"the masked update is a {type(masked).__name__}, not an array"
        elif masked.dtype != self._fixed_point.dtype:
            problem = f"the masked update is {masked.dtype}, expected {self._fixed_point.dtype}"
        elif masked.shape != (self.params.length,):
            problem = (
                f"the masked update has shape {masked.shape}, expected ({self.params.length},)"
            )
        if problem is not None:
            self._rejected[site] = f"site {site}: {problem}"
            raise SecAggMessageError(f"site {site}: {problem}", site)
        np.add(self._sum, masked, out=self._sum)
        self._survivors.append(site)

    def _check_unmask(self, site: str, raw: bytes) -> UnmaskShares:
        message = UnmaskShares.parse(raw, site, self.params)
        survivors, dropped = set(self._survivors), set(self.dropped)
        wrong_self = sorted(message.self_mask_shares.keys() - survivors)
        wrong_keys = sorted(message.mask_key_shares.keys() - dropped)
        if wrong_self or wrong_keys:
            raise SecAggMessageError(
                f"site {site}: reveals self-mask shares of non-survivors {wrong_self} or "
                f"mask-key shares of non-dropped sites {wrong_keys}",
                site,
            )
        listed = {*message.self_mask_shares, *message.mask_key_shares, *message.unavailable}
        if listed != set(self._shared):
            raise SecAggMessageError(
                f"site {site}: neither reveals nor reports unavailable the shares of "
                f"{sorted(set(self._shared) - listed)} (or lists others: "
                f"{sorted(listed - set(self._shared))})",
                site,
            )
        kinds: tuple[ShareKind, ...] = ("self-mask", "mask-key")
        for kind in kinds:
            for owner in message.shares(kind):
                committed = self._commitments[owner, site][0 if kind == "self-mask" else 1]
                share = message.share(kind, owner)
                if share_commitment(self._context, owner, site, kind, share) != committed:
                    raise SecAggMessageError(
                        f"site {site}: its {kind} share of {owner} does not match the "
                        f"commitment {owner} made: a wrong share",
                        site,
                    )
        return message

    def _reconstruct(self, owner: str, kind: ShareKind, valid: Mapping[str, UnmaskShares]) -> bytes:
        holders = [site for site, message in valid.items() if owner in message.shares(kind)]
        t = self.params.threshold
        if len(holders) < t:
            raise self._abort(
                f"only {len(holders)} valid shares of {owner}'s "
                + ("self-mask seed" if kind == "self-mask" else "mask key")
                + f", fewer than the threshold {t}: its mask cannot be removed"
            )
        shares = {self.params.index(site): valid[site].share(kind, owner) for site in holders[:t]}
        try:
            return combine(shares, t, SEED_BYTES if kind == "self-mask" else KEY_BYTES)
        except SecAggParameterError as exc:
            raise self._abort(
                f"the shares of {owner}'s {kind} secret do not combine: {exc}"
            ) from None

    def finish(self, unmasks: Mapping[str, bytes]) -> FloatArray:
        """Step 3: the float64 sum of the survivors' updates (as encoded: clipped to
        [−R, R], within :meth:`FixedPoint.error_bound`), from survivor → raw
        :class:`UnmaskShares` JSON.

        A message from a non-survivor is ignored; a malformed one, or one revealing a
        share that does not match its owner's commitment, has all its shares discarded and
        its site recorded in :attr:`rejected`. Fewer than t survivors, or fewer than t
        valid shares of a needed secret, or shares that rebuild a secret other than the
        one its owner committed to, raise :class:`SecAggAborted` naming the owner."""
        self._enter("masked", "finish", "after receive_shares and add_masked")
        survivors = self.survivors
        t = self.params.threshold
        if len(survivors) < t:
            raise self._abort(
                f"only {len(survivors)} masked updates arrived, fewer than the threshold {t}"
            )
        valid: dict[str, UnmaskShares] = {}
        for site in sorted(unmasks):
            if site not in survivors:
                self._rejected.setdefault(
                    site, f"site {site}: sent unmask shares but is not a survivor"
                )
                continue
            try:
                valid[site] = self._check_unmask(site, unmasks[site])
            except SecAggMessageError as exc:
                self._rejected[site] = f"unmask: {exc}"
                continue
            for owner in valid[site].unavailable:
                self._complaints.setdefault(owner, []).append(site)
        valid = {site: valid[site] for site in sorted(valid, key=self.params.index)}
        total = self._sum.copy()
        dtype = self._fixed_point.dtype
        for owner in survivors:
            seed = self._reconstruct(owner, "self-mask", valid)
            if (
                seed_commitment(self._context, owner, seed)
                != self._adverts[owner].self_mask_commitment
            ):
                raise self._abort(
                    f"the shares of {owner}'s self-mask seed rebuild a seed other than the one "
                    f"it committed to: {owner} dealt inconsistent shares"
                )
            self_mask = expand(
                derive_key(seed, "self-mask", self._context), self.params.length, dtype
            )
            np.subtract(total, self_mask, out=total)
        peers = {site: self._adverts[site].mask_key() for site in survivors}
        for owner in self.dropped:
            raw = self._reconstruct(owner, "mask-key", valid)
            private = X25519PrivateKey.from_private_bytes(raw)
            if private.public_key().public_bytes_raw() != self._adverts[owner].mask_key():
                raise self._abort(
                    f"the shares of {owner}'s mask key rebuild a key other than the one it "
                    f"advertised: {owner} dealt inconsistent shares"
                )
            # Each survivor i added +PRG(k_i,owner) if i's index is below owner's, else
            # −PRG: the dropped site's own view of the same masks has the opposite sign.
            add_pair_masks(self.params, owner, private, peers, self._context, total)
        self._stage = "done"
        return self._fixed_point.decode(total)
