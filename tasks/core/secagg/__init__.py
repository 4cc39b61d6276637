"""Secure aggregation (Bonawitz et al., CCS 2017): the coordinator learns the sum of the
round's updates, never one site's. Pure code, no I/O (:mod:`fedround.tasks.secure_aggregation`
moves the messages).

The protocol (:mod:`.protocol` walks through it). Each site encodes its flat float
update as integers modulo 2**bits (:mod:`.fixed_point`) and adds two kinds of
pseudo-random masks (ChaCha20 keystreams, :mod:`.masks`): a pair mask per other site,
agreed by X25519 and added by one side, subtracted by the other, so they cancel in the
sum; and a self-mask from a seed of its own. Before masking, each site Shamir-shares its
seed and its pair-mask private key t-of-n among the others (:mod:`.shamir`, over
p = 2**521 − 1), encrypted to each recipient through the coordinator. When the masked
updates are in, each survivor reveals its shares of the survivors' seeds and of the
dropped sites' mask keys, never both for one site; with t shares the coordinator
removes the self-masks and the dropped sites' leftover pair masks, and decodes the sum.
The round survives dropouts while t sites remain, and aborts below (:class:`SecAggAborted`).

What the coordinator learns: the sum of the survivors' encoded updates; who took part in
each step (U1 ⊇ U2 ⊇ U3); the sizes and timing of the messages; the public keys and the
hash commitments to the shares. It learns nothing about one site's update as long as it
follows the protocol and colludes with fewer than t sites (t > n/2 is enforced: a
coordinator that tells some sites a site dropped and others that it survived then still
cannot collect t shares of both its secrets, since each site reveals only one kind).
What it does not protect against: a coordinator that substitutes the sites' key adverts
(it could then read the shares): the adverts must reach the sites authenticated. The
integration signs them with the sites' Ed25519 keys; sites that pinned the federation's
keys (``peer_keys_file``) check every advert themselves, otherwise the coordinator is
trusted to relay them faithfully. And the sum itself,
which with t survivors and t − 1 colluders is the one honest site's update: add
:func:`distributed_noise_std` noise for differential privacy.

Quantization: each coordinate is clipped to [−R, R] (the clipped count is returned) and
rounded to a grid of step 1/s, with s = ⌊(2**(bits−1) − 1)/n⌋/R for n = len(sites), so
the sum of n encodings never wraps. The decoded sum of unclipped values is off by at most
n/(2s) + 8·n·R·2**−53 per coordinate (:meth:`FixedPoint.error_bound`): at bits=32, n=50,
R=1, 5.8e-7; at bits=64, float64's rounding dominates.
"""

from __future__ import annotations

from .client import ClientSecrets, client_advertise, client_mask, client_share, client_unmask
from .errors import (
    SecAggAborted,
    SecAggError,
    SecAggMessageError,
    SecAggParameterError,
    SecAggRefused,
)
from .fixed_point import FixedPoint
from .masks import derive_key, expand, pairwise_secret
from .messages import KeyAdvert, ShareBundle, UnmaskShares
from .params import RoundParams, distributed_noise_std
from .protocol import simulate_round
from .server import SecAggServer
from .shamir import combine, lagrange_at_zero, split

__all__ = [
    "ClientSecrets",
    "FixedPoint",
    "KeyAdvert",
    "RoundParams",
    "SecAggAborted",
    "SecAggError",
    "SecAggMessageError",
    "SecAggParameterError",
    "SecAggRefused",
    "SecAggServer",
    "ShareBundle",
    "UnmaskShares",
    "client_advertise",
    "client_mask",
    "client_share",
    "client_unmask",
    "combine",
    "derive_key",
    "distributed_noise_std",
    "expand",
    "lagrange_at_zero",
    "pairwise_secret",
    "simulate_round",
    "split",
]
