"""The coordinator's side of a round under secure aggregation.

After the round's sites have trained (each uploaded only its signed key advert), the
coordinator runs the protocol's three remaining exchanges through the object store,
asking the sites through the same dispatcher that ran their training (local worker
processes, or the sites' sessions):

1. roster: the valid adverts and each site's weight → every site uploads its encrypted
   shares; 2. inboxes: each site's shares from the others → every site uploads its masked
   update, which the coordinator adds into a running sum; 3. survivors: whose masked
   update arrived → every survivor reveals the shares that remove the masks.

The coordinator learns the sum of the survivors' weighted updates and nothing about one
of them; a site that fails a step drops out (recovered while ``threshold`` sites remain),
a site whose message is forged, malformed or wrong is excluded with the reason. Below the
threshold the round aborts: nothing is applied, the reason is recorded, and the run
moves on to the next round from the same model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from fedround.flows.dispatch import current_dispatcher
from fedround.site_workers.site_round import SiteRoundResult
from fedround.tasks.aggregation import AggregationOutcome, rejection
from fedround.tasks.core.config import FederationConfig
from fedround.tasks.core.errors import ObjectStoreError, UpdateRejected
from fedround.tasks.core.reputation import split_state
from fedround.tasks.core.secagg import (
    RoundParams,
    SecAggAborted,
    SecAggMessageError,
    SecAggServer,
    distributed_noise_std,
)
from fedround.tasks.core.serialization import Weights
from fedround.tasks.core.strategies import build_strategy
from fedround.tasks.core.validation import UpdateExpectation
from fedround.tasks.object_store import ObjectStore, open_store
from fedround.tasks.secure_aggregation import (
    SecureRound,
    SecureStep,
    SiteStep,
    put_broadcast,
    read_message,
)

log = logging.getLogger(__name__)

ABORTED = "secure aggregation aborted: "  # how AggregationOutcome.error begins then
ADVERT_MAX_BYTES = 4096
SHARE_BYTES_PER_SITE = 1024  # one recipient's ciphertext and commitment, with room
UNMASK_BYTES_PER_SITE = 512


def model_length(weights: Weights) -> int:
    return sum(int(tensor.numel()) for tensor in weights.values())


def secure_round(
    config: FederationConfig,
    run_id: str,
    round_: int,
    nonce: str,
    sites: Sequence[str],
    weights: Weights,
) -> SecureRound:
    """The protocol's parameters for a round sent to ``sites`` (sorted): its threshold,
    encoding and, for central DP, each site's share of the noise."""
    secure = config.secure_aggregation
    selected = sorted(sites)
    threshold = secure.round_threshold(len(selected), config.selection.min_sites)
    if threshold > len(selected):
        raise SecAggAborted(
            f"round {round_} has {len(selected)} sites to ask, fewer than the threshold of "
            f"{threshold}: a secure sum needs at least that many"
        )
    params = RoundParams(
        federation=config.federation,
        run_id=run_id,
        round=round_,
        nonce=nonce,
        sites=selected,
        threshold=threshold,
        bits=secure.bits,
        value_range=secure.round_value_range(config.privacy, threshold),
        length=model_length(weights),
    )
    privacy = config.privacy
    noise = 0.0
    if privacy.mode == "central":
        assert privacy.noise_multiplier is not None and privacy.clip_norm is not None
        noise = distributed_noise_std(privacy.noise_multiplier, privacy.clip_norm, threshold)
    return SecureRound(params=params, noise_std=noise)


def secure_tags(config: FederationConfig, aborted_rounds: Sequence[int]) -> dict[str, str]:
    """How the model's rounds were aggregated, as a tag for its MLflow run and version
    (``fedround lineage`` prints it with the privacy figures); empty when off."""
    secure = config.secure_aggregation
    if not secure.enabled:
        return {}
    threshold = (
        f"at least {secure.threshold} sites" if secure.threshold else "a majority of each round"
    )
    value_range = "default" if secure.value_range is None else f"{secure.value_range:g}"
    aborted = ",".join(str(r) for r in aborted_rounds) or "none"
    return {
        "fedround.privacy.secure_aggregation": (
            f"on: the coordinator saw only sums of {threshold} (min_sites "
            f"{config.selection.min_sites}); {secure.bits}-bit fixed point, value range "
            f"{value_range}; rounds aborted: {aborted}"
        )
    }


def _weights(config: FederationConfig, counts: Mapping[str, int]) -> dict[str, float]:
    """Each site's weight in (0, 1], fixed by the coordinator: alike under central DP or
    ``weighting: uniform``, else its (already bounded) example count over the largest."""
    if config.privacy.mode in ("central", "local") or config.strategy.weighting == "uniform":
        return dict.fromkeys(counts, 1.0)
    largest = max(counts.values())
    return {site: count / largest for site, count in counts.items()}


def _ask(
    step: SiteStep,
    secure: SecureRound,
    sites: Sequence[str],
    timeout: float,
    dropped: dict[str, str],
) -> list[str]:
    """Ask ``sites`` for their ``step`` message; those that fail it are recorded as
    dropped (with why) and the rest returned."""
    params = secure.params
    asks = [
        SecureStep(
            federation=params.federation,
            run_id=params.run_id,
            round=params.round,
            site=site,
            nonce=params.nonce,
            step=step,
        )
        for site in sites
    ]
    outcomes = current_dispatcher.get().secure_steps(asks, timeout)
    answered = []
    for site in sites:
        why = outcomes.get(site, "no answer")
        if why is None:
            answered.append(site)
        else:
            dropped[site] = f"dropped out at the {step} step: {why}"
    return answered


@task(name="secure aggregate", cache_policy=NO_CACHE)
def secure_aggregate(
    config: FederationConfig,
    store_settings: Any,
    secure: SecureRound,
    done: dict[str, SiteRoundResult],
    expectations: dict[str, UpdateExpectation],
    global_weights: Weights,
    strategy_state: dict[str, Any],
    dp_sites: int,
) -> tuple[AggregationOutcome, dict[str, Any]]:
    """The round's remaining secure-aggregation steps, as a task of the round."""
    return run_secure_aggregation(
        config,
        open_store(store_settings),
        secure,
        sorted(done),
        expectations,
        global_weights,
        strategy_state,
        dp_sites,
        get_run_logger(),
    )


def run_secure_aggregation(
    config: FederationConfig,
    store: ObjectStore,
    secure: SecureRound,
    trained: Sequence[str],
    expectations: Mapping[str, UpdateExpectation],
    global_weights: Weights,
    strategy_state: dict[str, Any],
    dp_sites: int,
    logger: Any = log,
) -> tuple[AggregationOutcome, dict[str, Any]]:
    """Run the round's remaining secure-aggregation steps with the sites that ``trained``
    (their adverts are in the store) and apply the sum (module doc).

    Returns the outcome (its ``error`` begins with :data:`ABORTED` when the round aborted,
    and then has no weights) and the strategy's state."""
    params = secure.params
    timeout = config.secure_aggregation.step_timeout_s
    server = SecAggServer(params)
    outcome = AggregationOutcome(weights=None)
    dropped: dict[str, str] = {}
    where = (params.federation, params.run_id, params.round)
    seconds: dict[str, float] = {}
    nbytes = 0

    def read(step: Any, sites: Sequence[str], max_bytes: int) -> dict[str, bytes]:
        nonlocal nbytes
        payloads: dict[str, bytes] = {}
        for site in sites:
            try:
                _, payload = read_message(store, expectations[site], step, max_bytes)
            except (UpdateRejected, ObjectStoreError) as exc:
                outcome.rejected[site] = rejection(site, exc)
                continue
            payloads[site] = payload
            nbytes += len(payload)
        return payloads

    try:
        started = time.perf_counter()
        counts: dict[str, int] = {}
        adverts: dict[str, bytes] = {}
        for site in sorted(trained):
            try:
                manifest, payload = read_message(
                    store, expectations[site], "advert", ADVERT_MAX_BYTES
                )
            except (UpdateRejected, ObjectStoreError) as exc:
                outcome.rejected[site] = rejection(site, exc)
                continue
            adverts[site], counts[site] = payload, manifest.num_examples
            outcome.manifests[site] = manifest
        roster = server.receive_adverts(adverts)
        weights = _weights(config, {advert.site: counts[advert.site] for advert in roster})
        put_broadcast(
            store,
            *where,
            "roster.json",
            {
                # As the sites signed them: a site that pinned its peers' keys checks each.
                "adverts": [adverts[advert.site].decode() for advert in roster],
                "manifests": {
                    advert.site: outcome.manifests[advert.site].model_dump(mode="json")
                    for advert in roster
                },
                "weights": weights,
            },
        )
        seconds["keys"] = time.perf_counter() - started

        started = time.perf_counter()
        members = [advert.site for advert in roster]
        answered = _ask("shares", secure, members, timeout, dropped)
        bundles = read("shares", answered, SHARE_BYTES_PER_SITE * (len(members) + 4))
        inboxes = server.receive_shares(bundles)
        for recipient in server.shared:
            put_broadcast(
                store,
                *where,
                f"inbox-{recipient}.json",
                {"shared": list(server.shared), "inbox": inboxes.get(recipient, {})},
            )
        seconds["shares"] = time.perf_counter() - started

        started = time.perf_counter()
        answered = _ask("masked", secure, list(server.shared), timeout, dropped)
        dtype = params.fixed_point().dtype
        itemsize = np.dtype(dtype).itemsize
        for site in answered:
            masked = read("masked", [site], params.length * itemsize).get(site)
            if masked is None:
                continue
            try:
                if len(masked) != params.length * itemsize:
                    raise SecAggMessageError(
                        f"site {site}: masked update of {len(masked)} bytes, expected "
                        f"{params.length * itemsize}"
                    )
                server.add_masked(site, np.frombuffer(masked, dtype=dtype))
            except SecAggMessageError as exc:
                outcome.rejected[site] = f"malformed: {exc}"
        put_broadcast(
            store,
            *where,
            "survivors.json",
            {"survivors": list(server.survivors), "dropped": list(server.dropped)},
        )
        seconds["masked"] = time.perf_counter() - started

        started = time.perf_counter()
        answered = _ask("unmask", secure, list(server.survivors), timeout, dropped)
        unmasks = read("unmask", answered, UNMASK_BYTES_PER_SITE * (len(members) + 4))
        total = server.finish(unmasks)
        seconds["unmask"] = time.perf_counter() - started
    except SecAggAborted as exc:
        outcome.rejected.update(_reasons(server))
        outcome.error = f"{ABORTED}{exc}"
        outcome.dropped = dropped
        _log_dropped(logger, dropped)
        logger.warning("round %d: %s", params.round, outcome.error)
        return outcome, strategy_state
    outcome.rejected.update(_reasons(server))
    _log_dropped(logger, dropped)
    survivors = list(server.survivors)
    # A survivor that missed the unmask step is still in the sum (the others' shares
    # removed its masks): it took part in the round.
    outcome.dropped = {site: why for site, why in dropped.items() if site not in survivors}
    outcome.accepted = {site: counts[site] for site in survivors}
    # DP-FedAvg: an equally weighted mean over the round's selected sites (fixed denominator).
    dp = config.privacy.mode in ("central", "local")
    denominator = float(dp_sites) if dp else sum(weights[site] for site in survivors)
    delta = _as_tensors(total / denominator, global_weights)
    strategy = build_strategy(config.strategy, len(config.sites))
    strategy.load_state_dict(split_state(strategy_state)[0])
    outcome.weights = strategy.optimizer.step(global_weights, delta)
    outcome.stats.update(
        {
            "secagg_sites": float(len(survivors)),
            "secagg_dropped": float(len(server.dropped)),
            "secagg_threshold": float(params.threshold),
            "secagg_bytes_up": float(nbytes),
            **{f"secagg_{step}_seconds": value for step, value in seconds.items()},
        }
    )
    logger.info(
        "round %d: secure sum of %d sites (threshold %d; %d dropped after masking), steps %s",
        params.round,
        len(survivors),
        params.threshold,
        len(server.dropped),
        {step: round(value, 3) for step, value in seconds.items()},
    )
    return outcome, strategy.state_dict()


def _reasons(server: SecAggServer) -> dict[str, str]:
    return {site: f"malformed: {why}" for site, why in server.rejected.items()}


def _log_dropped(logger: Any, dropped: Mapping[str, str]) -> None:
    for site, why in sorted(dropped.items()):
        logger.warning("site %s: %s", site, why)


def _as_tensors(vector: np.ndarray, like: Weights) -> dict[str, torch.Tensor]:
    """The flat sum back into the model's tensors (sorted names, as the sites flattened)."""
    tensors: dict[str, torch.Tensor] = {}
    offset = 0
    for name in sorted(like):
        reference = like[name]
        size = int(reference.numel())
        part = vector[offset : offset + size].reshape(tuple(reference.shape))
        tensors[name] = torch.from_numpy(np.ascontiguousarray(part)).to(reference.dtype)
        offset += size
    return tensors
