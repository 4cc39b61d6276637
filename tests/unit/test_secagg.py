"""Secure aggregation's protocol (tasks/core/secagg): exact sums under dropouts, aborts
below the threshold, masked vectors that look uniform, and every forged, malformed or
tampered message excluded with a reason (never an undocumented error)."""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from fedround.tasks.core.errors import QuorumNotReached
from fedround.tasks.core.secagg import (
    ClientSecrets,
    KeyAdvert,
    RoundParams,
    SecAggAborted,
    SecAggMessageError,
    SecAggParameterError,
    SecAggRefused,
    SecAggServer,
    ShareBundle,
    UnmaskShares,
    client_advertise,
    client_mask,
    client_share,
    client_unmask,
    derive_key,
    distributed_noise_std,
    expand,
    simulate_round,
)

SITES = [f"site-{name}" for name in "abcdefg"]  # n = 7
R = 2.0


def make_params(
    n: int = 7, t: int = 4, length: int = 1000, bits: int = 32, nonce: str = "n1"
) -> RoundParams:
    return RoundParams(
        federation="fed",
        run_id="run-1",
        round=3,
        nonce=nonce,
        sites=SITES[:n],
        threshold=t,
        bits=bits,
        value_range=R,
        length=length,
    )


def make_updates(params: RoundParams, seed: int = 0) -> dict[str, npt.NDArray[np.float64]]:
    rng = np.random.default_rng(seed)
    return {site: rng.uniform(-R, R, params.length) for site in params.sites}


def exact_sum(
    updates: dict[str, npt.NDArray[np.float64]], sites: list[str]
) -> npt.NDArray[np.float64]:
    rows = np.stack([updates[site] for site in sites])
    return np.array([math.fsum(column) for column in rows.T])


def assert_exact(
    total: npt.NDArray[np.float64],
    updates: dict[str, npt.NDArray[np.float64]],
    server: SecAggServer,
) -> None:
    error = np.max(np.abs(total - exact_sum(updates, server.survivors)))
    assert error <= server.params.fixed_point().error_bound()


Hook = Callable[[dict[str, bytes]], None]


@dataclass
class Driver:
    """A round run step by step, with a hook per step that may alter the raw messages
    (the coordinator's or a site's misbehaviour); states go through their bytes."""

    params: RoundParams
    updates: dict[str, npt.NDArray[np.float64]]
    states: dict[str, ClientSecrets] = field(default_factory=dict)
    masked: dict[str, npt.NDArray[np.unsignedinteger]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.server = SecAggServer(self.params)

    def advertise(self, hook: Hook | None = None) -> list[KeyAdvert]:
        adverts = {}
        for site in self.updates:
            state, advert = client_advertise(self.params, site)
            self.states[site] = state
            adverts[site] = advert.model_dump_json().encode()
        if hook:
            hook(adverts)
        return self.server.receive_adverts(adverts)

    def share(self, roster: list[KeyAdvert], hook: Hook | None = None) -> dict[str, dict[str, str]]:
        bundles = {}
        for advert in roster:
            state = ClientSecrets.from_bytes(self.states[advert.site].to_bytes())
            self.states[advert.site], bundle = client_share(self.params, state, roster)
            bundles[advert.site] = bundle.model_dump_json().encode()
        if hook:
            hook(bundles)
        return self.server.receive_shares(bundles)

    def mask(self, inboxes: dict[str, dict[str, str]], arrive: list[str] | None = None) -> None:
        for site in self.server.shared:
            state = ClientSecrets.from_bytes(self.states[site].to_bytes())
            self.states[site], masked, _ = client_mask(
                self.params, state, self.updates[site], self.server.shared, inboxes[site]
            )
            self.masked[site] = masked
            if arrive is None or site in arrive:
                self.server.add_masked(site, masked)

    def unmasks(self) -> dict[str, bytes]:
        survivors, dropped = self.server.survivors, self.server.dropped
        return {
            site: client_unmask(self.params, self.states[site], survivors, dropped)
            .model_dump_json()
            .encode()
            for site in survivors
        }

    def run(
        self, adverts: Hook | None = None, bundles: Hook | None = None, unmasks: Hook | None = None
    ) -> npt.NDArray[np.float64]:
        self.mask(self.share(self.advertise(adverts), bundles))
        raw = self.unmasks()
        if unmasks:
            unmasks(raw)
        return self.server.finish(raw)


# --- parameters ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"threshold": 3}, "more than half of the 7 sites \\(at least 4\\)"),
        ({"threshold": 8}, "between 2 and 7"),
        ({"sites": ["b", "a", "c"], "threshold": 2}, "sorted and unique"),
        ({"sites": ["a", "a", "b"], "threshold": 2}, "sorted and unique"),
        ({"sites": ["a"], "threshold": 2}, "at least 2 sites"),
        ({"value_range": math.inf}, "value_range"),
        ({"value_range": 0.0}, "value_range"),
        ({"bits": 16}, "bits"),
        ({"length": 0}, "length"),
        ({"round": 0}, "round"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_invalid_round_params_are_refused(changes: dict[str, object], problem: str) -> None:
    base = make_params().model_dump()

    with pytest.raises(ValidationError, match=problem):
        RoundParams(**{**base, **changes})


def test_context_binds_the_round() -> None:
    contexts = {
        make_params().context(),
        make_params(nonce="n2").context(),
        make_params(length=999).context(),
        make_params(t=5).context(),
        make_params(bits=64).context(),
    }

    assert len(contexts) == 5
    assert make_params().context() == make_params().context()
    assert make_params().fixed_point().max_summands == 7


# --- exact sums and dropouts ---------------------------------------------------------


@pytest.mark.parametrize("dropped", [[], ["site-c"], ["site-a", "site-d", "site-g"]])
def test_sum_is_exact_with_dropouts_after_masking(dropped: list[str]) -> None:
    params = make_params()
    updates = make_updates(params)

    total, server = simulate_round(params, updates, drop_after_masking=dropped)

    assert server.dropped == dropped
    assert server.survivors == [site for site in SITES if site not in dropped]
    assert server.rejected == {}
    assert_exact(total, updates, server)


@pytest.mark.parametrize("bits", [32, 64])
def test_sum_is_exact_with_dropouts_at_every_step(bits: int) -> None:
    params = make_params(bits=bits)
    updates = make_updates(params, seed=bits)

    total, server = simulate_round(
        params,
        updates,
        drop_before_sharing=["site-b"],
        drop_after_masking=["site-e"],
        drop_before_unmasking=["site-a"],  # in the sum, but reveals nothing
    )

    assert server.shared == ["site-a", "site-c", "site-d", "site-e", "site-f", "site-g"]
    assert server.survivors == ["site-a", "site-c", "site-d", "site-f", "site-g"]
    assert_exact(total, updates, server)


def test_a_site_that_never_advertised_is_left_out() -> None:
    params = make_params()
    updates = make_updates(params)
    del updates["site-f"]

    total, server = simulate_round(params, updates, drop_before_sharing=["site-b"])

    assert server.roster == ["site-a", "site-b", "site-c", "site-d", "site-e", "site-g"]
    assert server.survivors == ["site-a", "site-c", "site-d", "site-e", "site-g"]
    assert server.dropped == [] and server.rejected == {}
    assert_exact(total, updates, server)


def test_too_many_dropouts_after_masking_abort() -> None:
    params = make_params()  # n − t + 1 = 4 dropouts leave 3 < t

    with pytest.raises(SecAggAborted, match=r"only 3 masked updates arrived, fewer than .* 4"):
        simulate_round(
            params,
            make_updates(params),
            drop_after_masking=["site-a", "site-b", "site-c", "site-d"],
        )


def test_too_few_adverts_abort() -> None:
    params = make_params()
    updates = {site: make_updates(params)[site] for site in SITES[:3]}

    with pytest.raises(SecAggAborted, match="only 3 valid key adverts, fewer than the threshold 4"):
        simulate_round(params, updates)


def test_too_few_unmask_replies_abort_naming_the_owner() -> None:
    params = make_params()

    with pytest.raises(SecAggAborted, match="only 3 valid shares of site-a's self-mask seed"):
        simulate_round(
            params,
            make_updates(params),
            drop_before_unmasking=["site-a", "site-b", "site-c", "site-d"],
        )


def test_aborted_is_a_quorum_error() -> None:
    assert issubclass(SecAggAborted, QuorumNotReached)


# --- privacy of one masked vector ----------------------------------------------------


def byte_chi_square(values: npt.NDArray[np.unsignedinteger]) -> float:
    counts = np.bincount(np.frombuffer(values.tobytes(), dtype=np.uint8), minlength=256)
    expected = counts.sum() / 256
    return float(((counts - expected) ** 2 / expected).sum())


def test_a_masked_vector_is_indistinguishable_from_uniform() -> None:
    # 25 000 uint32 = 10⁵ bytes in 256 bins (255 degrees of freedom). The bound is the
    # chi-square quantile at 1 − 10⁻⁶ (Wilson–Hilferty), so the test fails by chance once
    # in a million runs (the 99.9 % quantile, 330.5, would fail once in a thousand).
    df, z = 255, 4.753
    bound = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    params = make_params(length=25_000)
    updates = make_updates(params)
    driver = Driver(params, updates)

    driver.run()
    encoded, _ = params.fixed_point().encode(updates["site-c"])

    assert byte_chi_square(driver.masked["site-c"]) < bound
    assert byte_chi_square(encoded) > 10 * bound


def test_masks_of_one_round_do_not_unmask_another() -> None:
    first, second = make_params(nonce="n1"), make_params(nonce="n2")
    fixed = first.fixed_point()
    seed = b"s" * 32
    update = make_updates(first)["site-a"]
    masked = fixed.encode(update)[0] + expand(
        derive_key(seed, "self-mask", first.context()), first.length, fixed.dtype
    )

    right = fixed.decode(
        masked - expand(derive_key(seed, "self-mask", first.context()), first.length, fixed.dtype)
    )
    wrong = fixed.decode(
        masked - expand(derive_key(seed, "self-mask", second.context()), first.length, fixed.dtype)
    )

    assert np.max(np.abs(right - update)) <= fixed.error_bound()
    # Garbage: the leftover mask decodes to values spread over [−nR, nR], whatever x was.
    assert np.median(np.abs(wrong - update)) > R
    assert abs(np.corrcoef(wrong, update)[0, 1]) < 0.2


def test_another_rounds_coordinator_cannot_use_the_reveals() -> None:
    params = make_params()
    driver = Driver(params, make_updates(params))
    adverts: dict[str, bytes] = {}
    bundles: dict[str, bytes] = {}
    driver.mask(driver.share(driver.advertise(adverts.update), bundles.update))
    other = SecAggServer(make_params(nonce="n2"))
    other.receive_adverts(adverts)
    other.receive_shares(bundles)
    for site, masked in driver.masked.items():
        other.add_masked(site, masked)

    with pytest.raises(SecAggAborted, match="only 0 valid shares"):
        other.finish(driver.unmasks())
    assert all("does not match the commitment" in why for why in other.rejected.values())


# --- misbehaving sites ---------------------------------------------------------------


def test_a_site_revealing_a_wrong_share_is_rejected_and_the_sum_stays_exact() -> None:
    params = make_params()
    updates = make_updates(params)
    driver = Driver(params, updates)

    def lie(raw: dict[str, bytes]) -> None:
        body = json.loads(raw["site-b"])
        share = bytearray(base64.b64decode(body["self_mask_shares"]["site-a"]))
        share[-1] ^= 1
        body["self_mask_shares"]["site-a"] = base64.b64encode(share).decode()
        raw["site-b"] = json.dumps(body).encode()

    total = driver.run(unmasks=lie)

    assert "site-b" in driver.server.rejected
    assert (
        "self-mask share of site-a does not match the commitment"
        in (driver.server.rejected["site-b"])
    )
    assert "site-b" in driver.server.survivors  # its update is in the sum all the same
    assert_exact(total, updates, driver.server)


def advert_of(driver: Driver, raw: dict[str, bytes], site: str) -> dict[str, object]:
    return dict(json.loads(raw[site]))


ADVERT_FORGERIES: dict[str, tuple[Callable[[dict[str, object]], object], str]] = {
    "junk JSON": (lambda body: b"{not json", "is not valid"),
    "extra field": (lambda body: {**body, "round": 3}, "round: Extra inputs are not permitted"),
    "wrong site field": (lambda body: {**body, "site": "site-a"}, "says it is from site"),
    "bad base64": (lambda body: {**body, "enc_public": "@@@="}, "not valid base64"),
    "short key": (
        lambda body: {**body, "mask_public": base64.b64encode(b"k" * 31).decode()},
        "mask_public is 31 bytes, expected 32",
    ),
    "low-order key": (
        lambda body: {**body, "enc_public": base64.b64encode(bytes(32)).decode()},
        "low order",
    ),
    "same key twice": (lambda body: {**body, "mask_public": body["enc_public"]}, "the same key"),
    "bad commitment": (
        lambda body: {**body, "self_mask_commitment": "xyz"},
        "not a sha256 hex digest",
    ),
    "number for a key": (lambda body: {**body, "enc_public": 7}, "enc_public: Input should be"),
    "not bytes": (lambda body: "a string", "not bytes"),
}


def forging_site_c(change: Callable[[Any], Any]) -> Callable[[dict[str, Any]], None]:
    """A hook that replaces site-c's message by ``change`` of its JSON body (bytes, or a
    str standing for a caller that passes the wrong type, as they are; anything else as
    JSON)."""

    def forge(raw: dict[str, Any]) -> None:
        forged = change(json.loads(raw["site-c"]))
        raw["site-c"] = forged if isinstance(forged, bytes | str) else json.dumps(forged).encode()

    return forge


@pytest.mark.parametrize("forgery", sorted(ADVERT_FORGERIES))
def test_a_forged_advert_is_excluded_with_a_reason(forgery: str) -> None:
    change, problem = ADVERT_FORGERIES[forgery]
    params = make_params()
    updates = make_updates(params)
    driver = Driver(params, updates)

    total = driver.run(adverts=forging_site_c(change))

    assert problem in driver.server.rejected["site-c"]
    assert "site-c" not in driver.server.roster
    assert_exact(total, updates, driver.server)


def test_adverts_sharing_a_key_and_unknown_sites_are_excluded() -> None:
    params = make_params()
    updates = make_updates(params)
    driver = Driver(params, updates)

    def copy(raw: dict[str, bytes]) -> None:
        body = json.loads(raw["site-d"])
        body["enc_public"] = json.loads(raw["site-e"])["enc_public"]
        raw["site-d"] = json.dumps(body).encode()
        raw["site-x"] = raw["site-a"]

    total = driver.run(adverts=copy)

    assert "repeats a key or commitment of ['site-e']" in driver.server.rejected["site-d"]
    assert "repeats a key or commitment of ['site-d']" in driver.server.rejected["site-e"]
    assert "not one of the round's sites" in driver.server.rejected["site-x"]
    assert driver.server.roster == ["site-a", "site-b", "site-c", "site-f", "site-g"]
    assert_exact(total, updates, driver.server)


BUNDLE_FORGERIES: dict[str, tuple[Callable[[dict[str, object]], object], str]] = {
    "junk JSON": (lambda body: b"[1, 2", "is not valid"),
    "extra field": (lambda body: {**body, "commitments": {}}, "Extra inputs are not permitted"),
    "wrong site field": (lambda body: {**body, "site": "site-b"}, "says it is from site"),
    "missing recipient": (
        lambda body: {
            **body,
            "ciphertexts": {k: v for k, v in body["ciphertexts"].items() if k != "site-a"},  # type: ignore[attr-defined]
        },
        "missing ['site-a']",
    ),
    "unknown recipient": (
        lambda body: {
            **body,
            "ciphertexts": {**body["ciphertexts"], "site-z": body["ciphertexts"]["site-a"]},  # type: ignore[dict-item,index]
        },
        "not a site of the round",
    ),
    "short ciphertext": (
        lambda body: {
            **body,
            "ciphertexts": {**body["ciphertexts"], "site-a": base64.b64encode(b"c" * 20).decode()},  # type: ignore[dict-item]
        },
        "is 20 bytes, expected 224",
    ),
    "too large": (lambda body: b" " * 20_000, "more than the"),
}


@pytest.mark.parametrize("forgery", sorted(BUNDLE_FORGERIES))
def test_a_forged_share_bundle_is_excluded_with_a_reason(forgery: str) -> None:
    change, problem = BUNDLE_FORGERIES[forgery]
    params = make_params()
    updates = make_updates(params)
    driver = Driver(params, updates)

    total = driver.run(bundles=forging_site_c(change))

    assert problem in driver.server.rejected["site-c"]
    assert "site-c" not in driver.server.shared
    assert_exact(total, updates, driver.server)


UNMASK_FORGERIES: dict[str, tuple[Callable[[dict[str, object]], object], str]] = {
    "junk JSON": (lambda body: b"\xff\xfe", "is not valid"),
    "extra field": (lambda body: {**body, "note": "hi"}, "Extra inputs are not permitted"),
    "wrong site field": (lambda body: {**body, "site": "site-a"}, "says it is from site"),
    "both shares of a site": (
        lambda body: {
            **body,
            "mask_key_shares": {"site-a": body["self_mask_shares"]["site-a"]},  # type: ignore[index]
        },
        "reveals both shares of ['site-a']",
    ),
    "share left out": (
        lambda body: {
            **body,
            "self_mask_shares": {
                k: v
                for k, v in body["self_mask_shares"].items()  # type: ignore[attr-defined]
                if k != "site-a"
            },
        },
        "neither reveals nor reports unavailable the shares of ['site-a']",
    ),
    "bad base64": (
        lambda body: {**body, "self_mask_shares": {**body["self_mask_shares"], "site-a": "%%"}},  # type: ignore[dict-item]
        "not valid base64",
    ),
    "share too long": (
        lambda body: {
            **body,
            "self_mask_shares": {
                **body["self_mask_shares"],  # type: ignore[dict-item]
                "site-a": base64.b64encode(b"\x00" * 67).decode(),
            },
        },
        "is 67 bytes, expected 66",
    ),
    "share not in the field": (
        lambda body: {
            **body,
            "self_mask_shares": {
                **body["self_mask_shares"],  # type: ignore[dict-item]
                "site-a": base64.b64encode(b"\xff" * 66).decode(),
            },
        },
        "not a field element",
    ),
    "mask key of a survivor": (
        lambda body: {
            **body,
            "self_mask_shares": {
                k: v
                for k, v in body["self_mask_shares"].items()  # type: ignore[attr-defined]
                if k != "site-a"
            },
            "mask_key_shares": {"site-a": body["self_mask_shares"]["site-a"]},  # type: ignore[index]
        },
        "mask-key shares of non-dropped sites ['site-a']",
    ),
}


@pytest.mark.parametrize("forgery", sorted(UNMASK_FORGERIES))
def test_a_forged_unmask_message_is_excluded_with_a_reason(forgery: str) -> None:
    change, problem = UNMASK_FORGERIES[forgery]
    params = make_params()
    updates = make_updates(params)
    driver = Driver(params, updates)

    total = driver.run(unmasks=forging_site_c(change))

    assert problem in driver.server.rejected["site-c"]
    assert driver.server.rejected["site-c"].startswith("unmask: ")
    assert_exact(total, updates, driver.server)


def test_a_ciphertext_tampered_by_the_coordinator_fails_to_decrypt() -> None:
    params = make_params()
    updates = make_updates(params)
    driver = Driver(params, updates)
    inboxes = driver.share(driver.advertise())
    blob = bytearray(base64.b64decode(inboxes["site-c"]["site-a"]))
    blob[-1] ^= 1
    inboxes["site-c"]["site-a"] = base64.b64encode(blob).decode()

    driver.mask(inboxes)
    total = driver.server.finish(driver.unmasks())

    assert "do not decrypt" in driver.states["site-c"].bad_senders["site-a"]
    assert driver.server.complaints == {"site-a": ["site-c"]}
    assert driver.server.rejected == {}
    assert_exact(total, updates, driver.server)


def test_a_commitment_swapped_by_the_coordinator_fails_to_decrypt() -> None:
    params = make_params()
    driver = Driver(params, make_updates(params))
    inboxes = driver.share(driver.advertise())
    blob = bytearray(base64.b64decode(inboxes["site-c"]["site-a"]))
    blob[0] ^= 1  # the first commitment: associated data of the encryption

    inboxes["site-c"]["site-a"] = base64.b64encode(blob).decode()
    driver.mask(inboxes)

    assert "do not decrypt" in driver.states["site-c"].bad_senders["site-a"]


FIELDS = [
    "site",
    "enc_public",
    "mask_public",
    "self_mask_commitment",
    "ciphertexts",
    "self_mask_shares",
    "mask_key_shares",
    "unavailable",
]
VALUES = st.one_of(
    st.text(max_size=20),
    st.integers(),
    st.none(),
    st.dictionaries(st.text(max_size=8), st.text(max_size=90), max_size=3),
    st.lists(st.text(max_size=8), max_size=3),
)
JUNK = st.binary(max_size=300) | st.builds(
    lambda body: json.dumps(body).encode(), st.dictionaries(st.sampled_from(FIELDS), VALUES)
)


@settings(max_examples=60, deadline=None)
@given(raw=JUNK)
def test_junk_messages_raise_only_message_errors(raw: bytes) -> None:
    params = make_params()

    for kind in (KeyAdvert, ShareBundle, UnmaskShares):
        with pytest.raises(SecAggMessageError):
            kind.parse(raw, "site-a", params)


# --- the coordinator's misbehaviour, as a site sees it -------------------------------


def masked_driver() -> Driver:
    params = make_params()
    driver = Driver(params, make_updates(params))
    driver.mask(driver.share(driver.advertise()), arrive=SITES[:5])
    return driver


def test_a_site_never_reveals_both_shares_of_one_site() -> None:
    driver = masked_driver()
    state = driver.states["site-a"]
    shared = driver.server.shared

    with pytest.raises(SecAggRefused, match=r"\['site-f'\] are listed both as survivors and as"):
        client_unmask(driver.params, state, SITES[:6], ["site-f", "site-g"])
    reveal = client_unmask(driver.params, state, SITES[:5], ["site-f", "site-g"])

    assert not reveal.self_mask_shares.keys() & reveal.mask_key_shares.keys()
    assert sorted(reveal.self_mask_shares) == SITES[:5]
    assert sorted(reveal.mask_key_shares) == ["site-f", "site-g"]
    assert reveal.unavailable == [] and len(shared) == 7


@pytest.mark.parametrize(
    ("survivors", "dropped", "problem"),
    [
        (SITES[:3], SITES[3:], "only 3 survivors, fewer than the threshold 4"),
        (SITES[1:5], ["site-a", "site-f", "site-g"], "listed as dropped, yet asked"),
        (SITES[:5], ["site-f"], r"left out \['site-g'\]"),
        (SITES[:5], ["site-f", "site-g", "site-z"], r"unknown \['site-z'\]"),
        ([*SITES[:5], "site-a"], ["site-f", "site-g"], "listed twice"),
    ],
)
def test_a_site_refuses_unsafe_unmask_requests(
    survivors: list[str], dropped: list[str], problem: str
) -> None:
    driver = masked_driver()

    with pytest.raises(SecAggRefused, match=problem):
        client_unmask(driver.params, driver.states["site-a"], survivors, dropped)


def test_a_site_masks_twice_only_identically() -> None:
    driver = masked_driver()
    params, site = driver.params, "site-b"
    state = driver.states[site]
    update = driver.updates[site]

    _, again, _ = client_mask(params, state, update, driver.server.shared, {})

    np.testing.assert_array_equal(again, driver.masked[site])
    with pytest.raises(SecAggRefused, match="masking twice"):
        client_mask(params, state, update + 0.5, driver.server.shared, {})
    with pytest.raises(SecAggMessageError, match="not in the roster"):
        client_mask(params, state, update, [*driver.server.shared, "site-z"], {})


def test_a_site_shares_twice_only_with_the_same_roster() -> None:
    params = make_params()
    driver = Driver(params, make_updates(params))
    roster = driver.advertise()
    driver.share(roster)
    state = driver.states["site-a"]

    again = client_share(params, state, roster)[1]

    assert (
        again.model_dump_json().encode()
        == ShareBundle.model_validate_json(state.bundle or "").model_dump_json().encode()
    )
    with pytest.raises(SecAggRefused, match="already shared"):
        client_share(params, state, roster[:6])


@pytest.mark.parametrize(
    ("change", "error", "problem"),
    [
        (lambda roster: roster[1:], SecAggMessageError, "leaves out this site"),
        (lambda roster: [*roster, roster[3]], SecAggMessageError, "lists site site-d twice"),
        (
            lambda roster: [roster[1].model_copy(update={"site": "site-a"}), *roster[1:]],
            SecAggMessageError,
            "site site-b's advert repeats a key",
        ),
        (lambda roster: roster[:3], SecAggAborted, "only 3 sites advertised keys"),
    ],
)
def test_a_site_checks_the_roster(
    change: Callable[[list[KeyAdvert]], list[KeyAdvert]], error: type[Exception], problem: str
) -> None:
    params = make_params()
    driver = Driver(params, make_updates(params))
    roster = driver.advertise()

    with pytest.raises(error, match=problem):
        client_share(params, driver.states["site-a"], change(roster))


def test_the_roster_must_keep_this_sites_keys() -> None:
    params = make_params()
    driver = Driver(params, make_updates(params))
    roster = driver.advertise()
    other = client_advertise(params, "site-a")[1]

    with pytest.raises(SecAggMessageError, match="changed the keys of this site"):
        client_share(params, driver.states["site-a"], [other, *roster[1:]])


def test_clipped_coordinates_are_counted_and_nan_refused() -> None:
    params = make_params()
    updates = make_updates(params)
    updates["site-a"][:10] = 3 * R
    driver = Driver(params, updates)
    inboxes = driver.share(driver.advertise())
    state = driver.states["site-a"]

    with pytest.raises(SecAggParameterError, match="NaN or infinite"):
        client_mask(params, state, np.full(params.length, np.nan), driver.server.shared, {})
    _, _, clipped = client_mask(
        params, state, updates["site-a"], driver.server.shared, inboxes["site-a"]
    )

    assert clipped == 10


def test_steps_out_of_order_are_refused() -> None:
    params = make_params()
    state, _ = client_advertise(params, "site-a")
    server = SecAggServer(params)

    with pytest.raises(SecAggParameterError, match="cannot reveal its shares at step 'advertised'"):
        client_unmask(params, state, SITES, [])
    with pytest.raises(SecAggParameterError, match="another round or other parameters"):
        client_share(make_params(nonce="n2"), state, [])
    with pytest.raises(SecAggParameterError, match="cannot receive shares at the adverts stage"):
        server.receive_shares({})
    with pytest.raises(SecAggParameterError, match="not one of the round's sites"):
        client_advertise(params, "site-z")


def test_bad_masked_updates_are_excluded_and_count_as_dropped() -> None:
    params = make_params()
    updates = make_updates(params)
    driver = Driver(params, updates)
    driver.mask(driver.share(driver.advertise()), arrive=["site-a", "site-b", "site-c"])
    server = driver.server
    bad = {
        "site-d": driver.masked["site-d"].astype(np.uint64),
        "site-e": driver.masked["site-e"][:-1],
        "site-z": driver.masked["site-f"],
    }

    for site, masked in bad.items():
        with pytest.raises(SecAggMessageError, match=site):
            server.add_masked(site, masked)
    with pytest.raises(SecAggMessageError, match="already added"):
        server.add_masked("site-a", driver.masked["site-a"])
    server.add_masked("site-f", driver.masked["site-f"])
    server.add_masked("site-g", driver.masked["site-g"])
    total = server.finish(driver.unmasks())

    assert "uint64, expected uint32" in server.rejected["site-d"]
    assert "shape (999,)" in server.rejected["site-e"]
    assert server.dropped == ["site-d", "site-e"]
    assert_exact(total, updates, server)


def test_client_secrets_round_trip_and_hide_their_keys() -> None:
    params = make_params()
    state, _ = client_advertise(params, "site-a")

    assert ClientSecrets.from_bytes(state.to_bytes()) == state
    assert state.enc_private not in repr(state) and state.self_mask_seed not in repr(state)
    with pytest.raises(SecAggParameterError, match="saved secure-aggregation state"):
        ClientSecrets.from_bytes(b'{"site": 1}')


# --- noise for central DP ------------------------------------------------------------


def test_distributed_noise_sums_to_the_central_noise() -> None:
    std = distributed_noise_std(1.2, 0.5, 9)
    noise = np.random.default_rng(1).normal(0.0, std, size=(9, 200_000)).sum(axis=0)

    assert std == pytest.approx(1.2 * 0.5 / 3)
    assert noise.std() == pytest.approx(1.2 * 0.5, rel=0.01)
    for bad in [(-1.0, 0.5, 9), (1.0, 0.0, 9), (1.0, 0.5, 0), (math.nan, 0.5, 9)]:
        with pytest.raises(SecAggParameterError):
            distributed_noise_std(*bad)
