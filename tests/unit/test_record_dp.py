"""Record-level DP-SGD (``privacy.mode: record``): Opacus at the site, each site's DP-SGD
steps in the ledger (against Opacus's own sampling and dp_accounting called directly),
the config refusals, and the budget check that needs the sites' example counts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from opacus.data_loader import DPDataLoader
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedround.site_workers.training import supervised_loop
from fedround.tasks.core.config import (
    FederationConfig,
    PrivacyConfig,
    TrainingConfig,
    parse_federation_config,
)
from fedround.tasks.core.errors import ConfigError
from fedround.tasks.core.privacy import epsilon
from fedround.tasks.core.privacy.ledger import (
    GENESIS,
    BudgetExceeded,
    LedgerEntry,
    LedgerHead,
    sha256_of,
    spent_epsilon,
    verify_chain,
)
from fedround.tasks.core.privacy.record import dp_steps
from fedround.tasks.core.usercode import SiteDataset, UserCodeError
from fedround.tasks.object_store import LocalObjectStore
from fedround.tasks.privacy_ledger import (
    check_before_run,
    check_record_plan,
    read_ledgers,
    record_round,
    round_fits,
    run_epsilon,
)

SITES = "sites: [{name: a}, {name: b}, {name: c}]\n"


def config(extra: str = "", budget: float | None = None, rounds: int = 2) -> FederationConfig:
    budget_part = f", budget: {{epsilon: {budget}}}" if budget is not None else ""
    return parse_federation_config(
        f"federation: fed\ntenant: acme\ncontract: c.json\nrounds: {rounds}\n{SITES}"
        "training: {batch_size: 50, local_epochs: 2}\n"
        f"privacy: {{mode: record, noise_multiplier: 1.1, clip_norm: 1.0{budget_part}}}\n" + extra
    )


# --- what a round spends ---------------------------------------------------------------------


@pytest.mark.parametrize(("n", "batch"), [(1, 32), (100, 32), (128, 32), (1000, 7), (5, 50)])
def test_dp_steps_match_opacus_sampling(n: int, batch: int) -> None:
    loader = DataLoader(TensorDataset(torch.zeros(n, 2)), batch_size=batch)
    private = DPDataLoader.from_data_loader(loader)
    q, steps = dp_steps(n, batch, local_epochs=3)
    assert q == pytest.approx(private.sample_rate)
    assert steps == 3 * len(private)


def test_steps_compose_as_dp_accounting_does() -> None:
    for sigma, q, steps in [(1.1, 0.1, 20), (0.8, 0.02, 150), (2.0, 1.0, 3)]:
        assert spent_epsilon([(sigma, q, steps)], 1e-5, "pld") == pytest.approx(
            epsilon(sigma, q, steps, 1e-5, "pld"), rel=1e-9
        )
        assert spent_epsilon([(sigma, q, steps)], 1e-5, "rdp") == pytest.approx(
            spent_epsilon([(sigma, q)] * steps, 1e-5, "rdp"), rel=1e-9
        )


def test_entries_without_steps_keep_their_bytes_and_chain() -> None:
    """Ledgers written before ``steps`` existed verify unchanged; a record-mode entry
    carries its steps and chains after them."""
    old = LedgerEntry(
        0, "tenant", "acme", "fed", "r", 1, "central", 1.0, 0.5, 1.0, (), "t", GENESIS
    )
    assert b"steps" not in old.to_bytes()
    new = LedgerEntry(
        1, "tenant", "acme", "fed", "r2", 1, "record", 1.0, 0.1, 1.0, (), "t",
        sha256_of(old.to_bytes()), steps=20,
    )  # fmt: skip
    assert LedgerEntry.from_bytes(new.to_bytes()) == new
    stored = [(0, old.to_bytes()), (1, new.to_bytes())]
    entries = verify_chain(stored, LedgerHead(1, sha256_of(new.to_bytes())), "test")
    assert [e.mechanism for e in entries] == [(1.0, 0.5, 1), (1.0, 0.1, 20)]


# --- the ledger -------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> LocalObjectStore:
    return LocalObjectStore(tmp_path / "objects")


def test_each_trained_site_is_charged_its_own_steps(store: LocalObjectStore) -> None:
    cfg = config()
    examples = {"a": 100, "b": 420, "c": 60}
    spent = record_round(store, cfg, "run-1", 1, ["a", "b"], examples)
    ledgers = read_ledgers(store, "acme", ["a", "b", "c"])
    a, b = ledgers.sites["a"][0], ledgers.sites["b"][0]
    assert (a.sampling_rate, a.steps) == (0.5, 4)  # k = 2 batches of 50, 2 epochs
    assert (b.sampling_rate, b.steps) == pytest.approx((1 / 9, 18))
    assert ledgers.sites["c"] == []  # not selected: its data was not touched
    tenant = ledgers.tenant[0]
    assert (tenant.mode, tenant.sites) == ("record", ("a", "b"))
    # the tenant's entry dominates both sites' rounds: the largest q, the most steps
    assert (tenant.sampling_rate, tenant.steps) == (0.5, 18)
    assert spent == pytest.approx(epsilon(1.1, 0.5, 18, 1e-5))
    assert spent >= max(epsilon(1.1, 0.5, 4, 1e-5), epsilon(1.1, 1 / 9, 18, 1e-5))
    assert run_epsilon(store, cfg, "run-1") == spent


def test_the_plan_needs_the_counts_and_refuses_an_overspend(store: LocalObjectStore) -> None:
    examples = {"a": 100, "b": 420, "c": 60}
    per_round = epsilon(1.1, 0.5, 4, 1e-5)  # site a's round; c: k = 2 too
    # before the contracts count, nothing can be planned: only the ledgers are verified
    assert check_before_run(store, config(budget=0.01), "run-1", []) == []
    with pytest.raises(BudgetExceeded, match=r"budget ε=0\.01") as caught:
        check_record_plan(store, config(budget=0.01), "run-1", examples)
    assert "tenant acme" in str(caught.value)
    checks = check_record_plan(store, config(budget=100.0), "run-1", examples)
    by_scope = {c.scope: c for c in checks}
    assert by_scope["site a"].planned == pytest.approx(
        spent_epsilon([(1.1, 0.5, 4)] * 2, 1e-5, "pld")
    )
    assert by_scope["site a"].planned > per_round
    assert by_scope["tenant acme"].planned >= by_scope["site b"].planned


def test_a_round_past_the_budget_does_not_fit(store: LocalObjectStore) -> None:
    examples = {"a": 100, "b": 420, "c": 60}
    one_round = epsilon(1.1, 0.5, 18, 1e-5)
    cfg = config(budget=one_round * 1.2)
    assert round_fits(store, cfg, "run-1", 1, ["a", "b"], examples) is None
    record_round(store, cfg, "run-1", 1, ["a", "b"], examples)
    over = round_fits(store, cfg, "run-1", 2, ["a", "b"], examples)
    assert over is not None and over.scope == "tenant acme"
    assert round_fits(store, cfg, "run-1", 1, ["a", "b"], examples) is None  # recorded


# --- the config -------------------------------------------------------------------------------


def test_record_mode_accepts_a_robust_aggregator() -> None:
    cfg = config("strategy: {aggregator: median}\n")
    assert cfg.privacy.mode == "record"


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ("mode: async\nasync: {buffer_size: 2}\n", "mode: async"),
        ("strategy: {name: fedprox, mu: 0.1}\n", "strategy.name: fedprox"),
        ("strategy: {name: scaffold}\n", "strategy.name: scaffold"),
    ],
)
def test_record_mode_refuses_what_it_cannot_bound(extra: str, named: str) -> None:
    with pytest.raises(ConfigError, match=r"privacy\.mode: record does not combine with") as caught:
        config(extra)
    assert named in str(caught.value)


def test_record_mode_refuses_a_users_train_function() -> None:
    with pytest.raises(ConfigError, match=r"remove training\.train"):
        parse_federation_config(
            f"federation: fed\ntenant: acme\ncontract: c.json\n{SITES}"
            "training: {train: mymodule:train}\n"
            "privacy: {mode: record, noise_multiplier: 1.1, clip_norm: 1.0}\n"
        )


# --- DP-SGD at the site -----------------------------------------------------------------------


def _data(n: int = 400) -> SiteDataset:
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(n, 8, generator=generator)
    labels = (features[:, 0] + features[:, 1] > 0).long()
    return SiteDataset(features, labels, num_classes=2)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))


def _accuracy(model: nn.Module, data: SiteDataset) -> float:
    with torch.no_grad():
        return float((model(data.features).argmax(1) == data.labels).float().mean())


def test_dp_sgd_trains_and_leaves_a_plain_model() -> None:
    data, model = _data(), _model()
    model.eval()  # as an evaluation leaves it: training puts it back in training mode
    names = list(model.state_dict())
    before = _accuracy(model, data)
    privacy = PrivacyConfig(mode="record", noise_multiplier=0.5, clip_norm=1.0)
    metrics = supervised_loop(
        model, data, TrainingConfig(local_epochs=3, batch_size=40, learning_rate=0.5), 1, privacy
    )
    assert _accuracy(model, data) > max(before, 0.8)
    assert 0 < metrics["train_loss"] < 1 and "train_accuracy" in metrics
    assert list(model.state_dict()) == names  # no Opacus wrapper prefix
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())  # hooks removed


def test_the_noise_is_secret_unless_a_seed_fixes_it() -> None:
    data, config_ = _data(), TrainingConfig(batch_size=40)

    def trained(privacy: PrivacyConfig) -> torch.Tensor:
        model = _model()
        supervised_loop(model, data, config_, 7, privacy)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    secret = PrivacyConfig(mode="record", noise_multiplier=1.0, clip_norm=1.0)
    seeded = PrivacyConfig(mode="record", noise_multiplier=1.0, clip_norm=1.0, noise_seed=11)
    assert not torch.equal(trained(secret), trained(secret))
    assert torch.equal(trained(seeded), trained(seeded))


def test_each_examples_gradient_is_clipped() -> None:
    """One example whose gradient is enormous: plain SGD moves the model by about as much,
    DP-SGD by at most learning_rate·C (one example, one batch, noise σ·C ≈ 0)."""
    features = torch.full((1, 8), 1e4)
    data = SiteDataset(features, torch.tensor([1]), num_classes=2)
    training = TrainingConfig(batch_size=1, learning_rate=1.0)
    privacy = PrivacyConfig(mode="record", noise_multiplier=1e-6, clip_norm=0.1, noise_seed=1)

    def moved(private: bool) -> float:
        model = _model()
        start = torch.cat([p.detach().flatten() for p in model.parameters()])
        supervised_loop(model, data, training, 1, privacy if private else None)
        end = torch.cat([p.detach().flatten() for p in model.parameters()])
        return float((end - start).norm())

    assert moved(private=False) > 100
    assert moved(private=True) <= 0.1 * 1.001


def test_a_model_opacus_cannot_train_is_refused_naming_the_layer() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 2))
    privacy = PrivacyConfig(mode="record", noise_multiplier=1.0, clip_norm=1.0)
    with pytest.raises(UserCodeError, match="BatchNorm") as caught:
        supervised_loop(model, _data(), TrainingConfig(), 1, privacy)
    assert "GroupNorm" in str(caught.value)


@pytest.mark.parametrize(
    "model",
    [
        {"factory": "mnist_cnn"},
        {"factory": "mlp", "in_features": 8, "out_features": 2},
        {"factory": "logistic_regression", "in_features": 8, "out_features": 2},
    ],
)
def test_every_built_in_model_trains_under_dp_sgd(model: dict[str, object]) -> None:
    """The coordinator checks the model before any site trains (flows/training.py): the
    built-ins pass, so record mode works with any of them."""
    from fedround.site_workers.dp_sgd import check_private_model
    from fedround.tasks.core.config import ModelConfig
    from fedround.tasks.core.models import build_model

    check_private_model(build_model(ModelConfig.model_validate(model), seed=0))
