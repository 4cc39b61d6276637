"""FedBuff (asynchronous buffered aggregation) against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from fedround.tasks.core.strategies.fedavgm import FedAvgM
from fedround.tasks.core.strategies.fedbuff import BufferedAsync, staleness_weight


def _t(*values: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(values, dtype=torch.float32)}


def test_staleness_weight_is_the_papers_polynomial() -> None:
    assert staleness_weight(0) == 1.0
    assert staleness_weight(3) == pytest.approx(0.5)  # (1 + 3)^-½
    assert staleness_weight(8, exponent=1.0) == pytest.approx(1 / 9)
    assert staleness_weight(5, exponent=0.0) == 1.0
    with pytest.raises(ValueError, match="staleness must be ≥ 0"):
        staleness_weight(-1)


def test_every_k_updates_make_one_version_weighted_by_staleness() -> None:
    server = BufferedAsync(_t(0.0, 0.0), buffer_size=2, max_staleness=4)
    first = server.submit(_t(1.0, 2.0), base_version=0)
    assert first.accepted and not first.applied and first.version == 0 and server.buffered == 1
    second = server.submit(_t(3.0, 4.0), base_version=0)
    assert second.applied and second.version == 1 and server.buffered == 0
    assert server.weights["w"].tolist() == [2.0, 3.0]  # x1 = 0 + ([1, 2] + [3, 4]) / 2
    stale = server.submit(_t(4.0, 0.0), base_version=0)  # trained on x0: τ = 1
    assert stale.staleness == 1 and stale.weight == pytest.approx(1 / math.sqrt(2))
    fresh = server.submit(_t(0.0, 8.0), base_version=1)
    assert fresh.applied and fresh.version == 2
    # x2 = x1 + (4/√2 · [1, 0] + [0, 8]) / 2 = [2 + √2, 7]
    assert server.weights["w"].tolist() == pytest.approx([2 + math.sqrt(2), 7.0])
    assert server.weights["w"].dtype == torch.float32


def test_bad_submissions_are_rejected_with_a_reason_and_change_nothing() -> None:
    server = BufferedAsync(_t(0.0, 0.0), buffer_size=3, max_staleness=1)
    for _ in range(3):
        server.submit(_t(1.0, 1.0), base_version=0)
    for _ in range(3):
        server.submit(_t(1.0, 1.0), base_version=1)
    assert server.version == 2
    before = server.weights["w"].clone()
    cases = {
        "staleness 2 is above max_staleness 1": (_t(1.0, 1.0), 0),
        "version 5, which the server has not made": (_t(1.0, 1.0), 5),
        "has shape (3,), the model's is (2,)": (_t(1.0, 1.0, 1.0), 2),
        "non-finite values": (_t(float("nan"), 1.0), 2),
        "unknown tensors ['v']": ({**_t(1.0, 1.0), "v": torch.zeros(1)}, 2),
    }
    for reason, (delta, version) in cases.items():
        outcome = server.submit(delta, base_version=version)
        assert not outcome.accepted and outcome.weight == 0.0
        assert outcome.reason is not None and reason in outcome.reason, outcome.reason
    assert server.buffered == 0 and server.version == 2
    assert torch.equal(server.weights["w"], before)


def test_a_restart_with_a_partial_buffer_continues_bit_for_bit() -> None:
    torch.manual_seed(0)
    deltas = [({"w": torch.randn(5), "b": torch.randn(2)}, v) for v in (0, 0, 0, 1, 0, 1, 2)]
    start = {"w": torch.zeros(5), "b": torch.zeros(2)}

    def server() -> BufferedAsync:
        optimizer = FedAvgM(server_lr=0.5, momentum=0.9)
        return BufferedAsync(
            start, buffer_size=3, max_staleness=3, staleness_exponent=0.5, optimizer=optimizer
        )

    straight = server()
    for delta, version in deltas:
        straight.submit(delta, version)
    first = server()
    for delta, version in deltas[:5]:
        first.submit(delta, version)
    assert first.buffered == 2  # the checkpoint holds a partial buffer and the momentum
    state, weights = first.state_dict(), {n: t.clone() for n, t in first.weights.items()}
    resumed = server()
    resumed.load_state_dict(state, weights)
    for delta, version in deltas[5:]:
        resumed.submit(delta, version)
    assert resumed.version == straight.version == 2
    assert all(torch.equal(resumed.weights[n], straight.weights[n]) for n in start)


def test_with_no_staleness_discount_a_full_buffer_is_the_plain_mean() -> None:
    server = BufferedAsync(_t(1.0), buffer_size=4, max_staleness=10, staleness_exponent=0.0)
    server.submit(_t(2.0), 0)
    server.submit(_t(4.0), 0)
    server.submit(_t(6.0), 0)
    assert server.submit(_t(8.0), 0).applied
    assert server.weights["w"].tolist() == [6.0]  # 1 + (2 + 4 + 6 + 8) / 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"buffer_size": 0, "max_staleness": 2}, "buffer_size"),
        ({"buffer_size": 2, "max_staleness": 0}, "max_staleness must be ≥ 1"),
        ({"buffer_size": 2, "max_staleness": 2, "staleness_exponent": -1}, "exponent"),
    ],
)
def test_impossible_settings_are_refused(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BufferedAsync(_t(0.0), **kwargs)  # type: ignore[arg-type]


def test_a_corrupt_checkpoint_state_is_refused() -> None:
    server = BufferedAsync(_t(0.0), buffer_size=2, max_staleness=2)
    with pytest.raises(ValueError, match="1 buffered updates with no buffer"):
        server.load_state_dict({"version": 3, "buffered": 1}, _t(0.0))
    with pytest.raises(ValueError, match="unknown keys"):
        server.load_state_dict({"version": 3, "velocity": {}}, _t(0.0))


def test_median_clipping_bounds_a_boosted_delta_by_the_recent_norms() -> None:
    from fedround.tasks.core.strategies.clipping import NormClipping

    server = BufferedAsync(
        _t(0.0, 0.0),
        buffer_size=4,
        max_staleness=2,
        clipping=NormClipping("median", multiplier=2.0),
        norm_window=3,
    )
    assert server.submit(_t(3.0, 4.0), 0).clip_factor == 1.0  # norm 5
    assert server.submit(_t(0.0, 5.0), 0).clip_factor == 1.0  # norm 5
    boosted = server.submit(_t(300.0, 400.0), 0)  # norm 500; median of (5, 5, 500) = 5
    assert boosted.accepted and boosted.clip_factor == pytest.approx(10 / 500)
    applied = server.submit(_t(0.0, 0.0), 0)
    assert applied.applied
    # x1 = ([3, 4] + [0, 5] + [6, 8] + [0, 0]) / 4: the boosted delta cut to norm 10
    assert server.weights["w"].tolist() == pytest.approx([2.25, 4.25])
    # the window keeps the last 3 norms (5, 500, 0) and survives a restart
    state = server.state_dict()
    assert state["norms"] == pytest.approx([5.0, 500.0, 0.0])
    again = BufferedAsync(
        _t(0.0, 0.0),
        buffer_size=4,
        max_staleness=2,
        clipping=NormClipping("median", multiplier=2.0),
        norm_window=3,
    )
    again.load_state_dict(state, server.weights)
    # window (500, 0, 2000): median 500, bound 1000, the same in both
    for restored in (server, again):
        assert restored.submit(_t(0.0, 2000.0), 1).clip_factor == pytest.approx(0.5)
    assert again.state_dict()["norms"] == server.state_dict()["norms"]
