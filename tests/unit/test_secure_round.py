"""A secure-aggregation round through the object store: the coordinator's orchestration
(:mod:`fedround.flows.secure_round`) with the sites' real step functions, real signed
messages and a real local store, in one process.

The dispatcher here is a stand-in for the runtimes (they are covered end to end in
tests/e2e/test_secure_aggregation.py): it runs each site's step in-process, and drops a
site at a chosen step to inject a fault a real run cannot be made to produce on cue.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedround.flows.dispatch import current_dispatcher
from fedround.flows.secure_round import ABORTED, run_secure_aggregation, secure_round
from fedround.site_workers.secure_aggregation import run_secure_step, start_secure_round
from fedround.site_workers.settings import SiteSettings
from fedround.site_workers.signing_key import ensure_signing_key, write_key_file
from fedround.tasks.aggregation import AggregationOutcome
from fedround.tasks.core import keys
from fedround.tasks.core.config import FederationConfig, parse_federation_config
from fedround.tasks.core.manifest import UpdateManifest
from fedround.tasks.core.secagg import SecAggAborted
from fedround.tasks.core.signing import SigningKey
from fedround.tasks.core.validation import UpdateExpectation, tensor_specs
from fedround.tasks.object_store import LocalObjectStore, ObjectStoreSettings
from fedround.tasks.secure_aggregation import SecureStep
from fedround.tasks.site_keys import register_key, signing_keys

SITES = ["site-a", "site-b", "site-c", "site-d", "site-e"]
COUNTS = {"site-a": 100, "site-b": 400, "site-c": 250, "site-d": 50, "site-e": 200}
RUN, ROUND, NONCE = "r1", 1, "n" * 32


SECURE = "secure_aggregation: {enabled: true, step_timeout_s: 5}\n"


def _config(extra: str = "", secure: str = SECURE, min_sites: int = 2) -> FederationConfig:
    sites = ", ".join(f"{{name: {site}}}" for site in SITES)
    return parse_federation_config(
        f"federation: fed\ncontract: c.json\nselection: {{min_sites: {min_sites}}}\n"
        f"{secure}{extra}sites: [{sites}]\n"
    )


class InProcessSites:
    """Runs each site's step in this process; ``drop[step]`` sites fail it (a fault);
    ``before[step]`` runs first (a fault: a coordinator tampering with its broadcast)."""

    def __init__(self, settings: dict[str, SiteSettings]) -> None:
        self.settings = settings
        self.drop: dict[str, set[str]] = {}
        self.before: dict[str, Callable[[], None]] = {}
        self.asked: list[tuple[str, list[str]]] = []

    def secure_steps(self, steps: list[SecureStep], timeout: float) -> dict[str, str | None]:
        self.asked.append((steps[0].step, [step.site for step in steps]) if steps else ("", []))
        if steps and steps[0].step in self.before:
            self.before[steps[0].step]()
        outcomes: dict[str, str | None] = {}
        for step in steps:
            if step.site in self.drop.get(step.step, set()):
                outcomes[step.site] = "connection lost (fault injected by the test)"
                continue
            try:
                run_secure_step(self.settings[step.site], step)
                outcomes[step.site] = None
            except Exception as exc:
                outcomes[step.site] = f"{type(exc).__name__}: {exc}"
        return outcomes


class Round:
    def __init__(
        self, tmp_path: Path, config: FederationConfig, peer_keys: Path | None = None
    ) -> None:
        self.config = config
        self.store = LocalObjectStore(tmp_path / "store")
        store_settings = ObjectStoreSettings(kind="local", root=tmp_path / "store")
        self.settings = {
            site: SiteSettings(
                site=site,
                federation="fed",
                data_dir=tmp_path / site,
                object_store=store_settings,
                peer_keys_file=peer_keys,
            )
            for site in SITES
        }
        for site, settings in self.settings.items():
            register_key(self.store, "fed", site, ensure_signing_key(settings).registered())
        generator = torch.Generator().manual_seed(7)
        self.global_weights = {
            "layer.weight": torch.randn(12, 20, generator=generator),
            "layer.bias": torch.randn(12, generator=generator),
        }
        self.deltas = {
            site: {
                name: (torch.rand(t.shape, generator=generator) - 0.5) * 0.6
                for name, t in self.global_weights.items()
            }
            for site in SITES
        }
        self.secure = secure_round(config, RUN, ROUND, NONCE, SITES, self.global_weights)
        self.sites = InProcessSites(self.settings)

    def train(self) -> None:
        for site in SITES:
            manifest = UpdateManifest(
                federation="fed",
                run_id=RUN,
                round=ROUND,
                site=site,
                nonce=NONCE,
                num_examples=COUNTS[site],
                sha256="",
                nbytes=0,
            )
            start_secure_round(
                self.settings[site], self.store, self.secure, manifest, self.deltas[site]
            )

    def aggregate(self) -> tuple[AggregationOutcome, dict[str, Any]]:
        ring = signing_keys(self.store, "fed", SITES, True, datetime.now(UTC))
        expectations = {
            site: UpdateExpectation(
                federation="fed",
                run_id=RUN,
                round=ROUND,
                nonce=NONCE,
                site=site,
                specs=tensor_specs(self.global_weights),
                max_bytes=1 << 20,
                max_num_examples=1000,
                signing_keys=ring[site],
            )
            for site in SITES
        }
        token = current_dispatcher.set(self.sites)  # type: ignore[arg-type]
        try:
            return run_secure_aggregation(
                self.config,
                self.store,
                self.secure,
                SITES,
                expectations,
                self.global_weights,
                {},
                dp_sites=len(SITES),
            )
        finally:
            current_dispatcher.reset(token)

    def expected(self, sites: list[str]) -> dict[str, torch.Tensor]:
        largest = max(COUNTS[site] for site in SITES)
        weights = {site: COUNTS[site] / largest for site in sites}
        total = sum(weights.values())
        return {
            name: tensor + sum(weights[s] * self.deltas[s][name] for s in sites) / total
            for name, tensor in self.global_weights.items()
        }


@pytest.fixture
def round_(tmp_path: Path) -> Round:
    return Round(tmp_path, _config())


def _close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6)


def test_the_secure_sum_is_fedavg_and_no_plain_update_reaches_the_store(round_: Round) -> None:
    round_.train()
    outcome, _ = round_.aggregate()
    assert outcome.error is None
    assert outcome.accepted == COUNTS
    _close(outcome.weights, round_.expected(SITES))
    stored = round_.store.list("fed/")
    assert not [key for key in stored if key.endswith("update.safetensors")]
    masked = [key for key in stored if key.endswith("secagg/masked.bin")]
    assert len(masked) == len(SITES)
    # What the coordinator holds of one site is its masked vector: nothing like its update.
    one = np.frombuffer(round_.store.get(masked[0]), dtype=np.uint32)
    assert one.size == 12 * 20 + 12
    assert one.mean() > 2**30  # masks are uniform on [0, 2**32); the encoded update is near 0
    # The round's secrets are gone from every site once it revealed its shares.
    for settings in round_.settings.values():
        assert not list(settings.site_state_dir.rglob("state.json"))
    assert [step for step, _ in round_.sites.asked] == ["shares", "masked", "unmask"]


@pytest.mark.parametrize("dropped", [["site-c"], ["site-b", "site-e"]])
def test_sites_that_drop_after_sharing_are_recovered_exactly(
    round_: Round, dropped: list[str]
) -> None:
    """n − t = 2 of 5 sites (t = 3) may drop after sharing their keys: the survivors'
    reveal the dropped sites' mask keys and the sum is the survivors' FedAvg."""
    round_.sites.drop["masked"] = set(dropped)
    round_.train()
    outcome, _ = round_.aggregate()
    survivors = [site for site in SITES if site not in dropped]
    assert sorted(outcome.accepted) == survivors
    assert set(outcome.dropped) == set(dropped)
    assert "masked step" in outcome.dropped[dropped[0]]
    _close(outcome.weights, round_.expected(survivors))


def test_a_site_that_drops_before_unmasking_stays_in_the_sum(round_: Round) -> None:
    round_.sites.drop["unmask"] = {"site-a"}
    round_.train()
    outcome, _ = round_.aggregate()
    assert sorted(outcome.accepted) == SITES
    _close(outcome.weights, round_.expected(SITES))


def test_below_the_threshold_the_round_aborts_with_nothing_applied(round_: Round) -> None:
    round_.sites.drop["masked"] = {"site-a", "site-b", "site-c"}
    round_.train()
    outcome, state = round_.aggregate()
    assert outcome.weights is None
    assert outcome.error.startswith(ABORTED)
    assert "only 2 masked updates arrived, fewer than the threshold 3" in str(outcome.error)
    assert state == {}


def test_a_forged_masked_update_is_rejected_and_the_round_still_completes(
    round_: Round,
) -> None:
    """site-b's masked message is signed with a key that is not registered for it (an
    attacker holding its S3 credential, say): rejected before it is read, and the round
    completes over the other four, their sum exact."""
    round_.train()
    impostor = SigningKey.generate()
    write_key_file(round_.settings["site-b"].signing_key_path, impostor)
    outcome, _ = round_.aggregate()
    assert "unknown_key" in outcome.rejected["site-b"]
    survivors = [site for site in SITES if site != "site-b"]
    assert sorted(outcome.accepted) == survivors
    _close(outcome.weights, round_.expected(survivors))


def test_a_tampered_advert_excludes_its_site_before_any_step(round_: Round) -> None:
    round_.train()
    key = keys.secagg_site_key("fed", RUN, ROUND, "site-d", "advert.bin")
    advert = json.loads(round_.store.get(key))
    advert["mask_public"] = advert["enc_public"]
    round_.store.put(key, json.dumps(advert).encode())  # its manifest's digest no longer holds
    outcome, _ = round_.aggregate()
    assert "digest_mismatch" in outcome.rejected["site-d"]
    assert "site-d" not in round_.sites.asked[0][1]
    survivors = [site for site in SITES if site != "site-d"]
    _close(outcome.weights, round_.expected(survivors))


def test_central_dp_noise_is_added_by_the_sites_in_shares(tmp_path: Path) -> None:
    """Central DP under secure aggregation: each site adds N(0, (σC/√t)²), so the sum of
    at least t sites carries the central σC; the mean divides by the selected count."""
    config = _config("privacy: {mode: central, noise_multiplier: 2.0, clip_norm: 1.0}\n")
    round_ = Round(tmp_path, config)
    assert round_.secure.noise_std == pytest.approx(2.0 / 3**0.5)
    round_.train()
    outcome, _ = round_.aggregate()
    mean = {
        name: tensor + sum(round_.deltas[s][name] for s in SITES) / len(SITES)
        for name, tensor in round_.global_weights.items()
    }
    residual = torch.cat([(outcome.weights[name] - mean[name]).reshape(-1) for name in mean])
    # Five sites' noise of σC/√3 each, over 5: std 2/√3·√5/5 ≈ 0.516 per coordinate.
    # 252 coordinates: the std estimate is within 25 % (5.6 standard errors) but for ~1e-8
    assert float(residual.std()) == pytest.approx(2.0 / 3**0.5 * 5**0.5 / 5, rel=0.25)


def test_too_few_sites_for_the_threshold_is_refused_before_anyone_is_asked() -> None:
    config = _config("")
    with pytest.raises(SecAggAborted, match="fewer than the threshold"):
        secure_round(config, RUN, ROUND, NONCE, ["site-a"], {"w": torch.zeros(3)})


@pytest.mark.parametrize(
    ("extra", "refusal"),
    [
        ("mode: async\n", "does not combine with mode: async"),
        ("strategy: {aggregator: median}\n", "strategy.aggregator: median"),
        ("strategy: {name: scaffold}\n", "strategy.name: scaffold"),
        ("strategy: {clip: {mode: fixed, bound: 1.0}}\n", "strategy.clip"),
        ("strategy: {max_site_share: 0.5}\n", "strategy.max_site_share < 1"),
        ("compression: {quantize_bits: 8}\n", "compression"),
        ("limits: {max_update_norm: 5.0}\n", "limits.max_update_norm"),
        (
            "privacy: {mode: central, noise_multiplier: 1.0, clip_norm: 1.0, "
            "adaptive_clipping: {target_quantile: 0.5}}\n",
            "privacy.adaptive_clipping",
        ),
    ],
)
def test_settings_that_need_one_sites_update_are_refused(extra: str, refusal: str) -> None:
    from fedround.tasks.core.errors import ConfigError

    with pytest.raises(ConfigError, match=refusal.replace(".", r"\.").replace("<", "<")):
        _config(extra)


def test_a_round_of_one_site_and_an_unreachable_threshold_are_refused() -> None:
    from fedround.tasks.core.errors import ConfigError

    with pytest.raises(ConfigError, match="min_sites of at least 2"):
        _config(min_sites=1)
    with pytest.raises(ConfigError, match="threshold=9 is more than the 5 sites"):
        _config(secure="secure_aggregation: {enabled: true, threshold: 9}\n")


def test_the_default_value_range_leaves_room_for_the_dp_noise() -> None:
    plain = _config().secure_aggregation
    assert plain.round_value_range(_config().privacy, 3) == 1.0
    config = _config("privacy: {mode: central, noise_multiplier: 1.5, clip_norm: 0.5}\n")
    assert config.secure_aggregation.round_value_range(config.privacy, 4) == pytest.approx(
        0.5 * (1 + 6 * 1.5 / 2)
    )


def _pinned(tmp_path: Path) -> Round:
    """A round whose sites pinned the federation's keys, as `fedround keys export` wrote."""
    from fedround.tasks.core.signing import PeerKeys
    from fedround.tasks.site_keys import load_key_ring

    path = tmp_path / "peers.json"
    round_ = Round(tmp_path, _config(), peer_keys=path)
    rings = {site: load_key_ring(round_.store, "fed", site) for site in SITES}
    path.write_bytes(
        PeerKeys(federation="fed", exported_at=datetime.now(UTC), rings=rings).to_json()
    )
    return round_


def test_sites_that_pinned_their_peers_keys_check_every_advert(tmp_path: Path) -> None:
    round_ = _pinned(tmp_path)
    round_.train()
    outcome, _ = round_.aggregate()
    assert outcome.error is None
    _close(outcome.weights, round_.expected(SITES))


def test_a_coordinator_that_slips_in_its_own_keys_gets_no_shares(tmp_path: Path) -> None:
    """A coordinator replaces site-c's advert in the roster with keys of its own (to read
    the shares sent to "site-c"): every site that pinned the federation's keys refuses to
    deal its shares, so nothing is revealed and the round aborts."""
    from fedround.tasks.core.secagg import client_advertise

    round_ = _pinned(tmp_path)
    key = keys.secagg_round_key("fed", RUN, ROUND, "roster.json")

    def substitute() -> None:  # the fault: the coordinator tampers with its own broadcast
        roster = json.loads(round_.store.get(key))
        _, own = client_advertise(round_.secure.params, "site-c")
        roster["adverts"] = [
            own.model_dump_json() if json.loads(raw)["site"] == "site-c" else raw
            for raw in roster["adverts"]
        ]
        round_.store.put(key, json.dumps(roster).encode())

    round_.sites.before["shares"] = substitute
    round_.train()
    outcome, _ = round_.aggregate()
    assert outcome.weights is None and str(outcome.error).startswith(ABORTED)
    assert set(outcome.dropped) == set(SITES)
    reason = outcome.dropped["site-a"]
    assert "the roster's advert of site-c does not check out against the pinned keys" in reason
    stored = round_.store.list("fed/")
    assert not [k for k in stored if k.endswith("secagg/shares.bin")]  # no share was dealt
