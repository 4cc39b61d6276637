"""The site side of the round protocol (``SessionLoop``), shared by a site's pool and the
embedded site hosts, over a real local object store.

The loop is driven by a scripted coordinator: each time the loop would wait, the script
writes the next thing the coordinator would (a round's plan and the run pointer, the run's
end). The site's work is a small recorder in place of the real training (the loop is
parameterized on it; the end-to-end tests run the real one): it passes or fails a site's
contract and round on purpose.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fedround.site_workers import session_protocol
from fedround.site_workers.session_protocol import SessionLoop
from fedround.site_workers.settings import SiteSettings
from fedround.site_workers.site_round import RoundSpec, SiteRoundResult
from fedround.tasks.core import keys
from fedround.tasks.core.config import load_federation_config
from fedround.tasks.core.contract_report import ContractReport
from fedround.tasks.object_store import LocalObjectStore, ObjectStoreSettings
from fedround.tasks.secure_aggregation import SecureStep

CONFIG = load_federation_config(Path(__file__).parents[1] / "e2e" / "distributed.yaml")
FED, RUN = CONFIG.federation, "run-1"


class RecordingWork:
    """Passes every contract and round except the ones named to fail."""

    def __init__(self, bad_contract: str = "", bad_round: str = "", raises: str = "") -> None:
        self.bad_contract, self.bad_round, self.raises = bad_contract, bad_round, raises
        self.trained: list[tuple[str, int]] = []
        self.stepped: list[tuple[str, str]] = []

    def contract(self, settings: SiteSettings, federation: str, run_id: str) -> ContractReport:
        if settings.site == self.raises:
            raise OSError("the data folder is not mounted")
        ok = settings.site != self.bad_contract
        rows = {"site-a": 10, "site-b": 30, "site-c": 20}[settings.site]
        return ContractReport(site=settings.site, suite="s", success=ok, row_count=rows, results=[])

    def train(self, settings: SiteSettings, spec: RoundSpec) -> SiteRoundResult | BaseException:
        self.trained.append((settings.site, spec.round))
        if settings.site == self.bad_round:
            return RuntimeError("train function fit:train raised: out of memory")
        return SiteRoundResult(site=settings.site, round=spec.round, ok=True)

    def secure(self, settings: SiteSettings, step: SecureStep) -> int | BaseException:
        self.stepped.append((settings.site, step.step))
        return 1


def _settings(tmp_path: Path, site: str) -> SiteSettings:
    store = ObjectStoreSettings(kind="local", root=tmp_path / "objects")
    return SiteSettings(site=site, federation=FED, data_dir=tmp_path, object_store=store)


def _spec(site: str, round_: int, nonce: str) -> dict[str, Any]:
    spec = RoundSpec(
        federation=FED,
        run_id=RUN,
        round=round_,
        site=site,
        nonce=nonce,
        global_sha256="0" * 64,
        seed=1,
        model=CONFIG.model,
        training=CONFIG.training,
    )
    return spec.model_dump(mode="json")


def _open_round(store: LocalObjectStore, round_: int, nonce: str, sites: list[str]) -> None:
    plan = {"round": round_, "nonce": nonce, "specs": {s: _spec(s, round_, nonce) for s in sites}}
    store.put(keys.round_plan_key(FED, RUN, round_), json.dumps(plan).encode())
    pointer = {"state": "running", "round": round_, "assigned": {s: [round_, nonce] for s in sites}}
    store.put(keys.run_pointer_key(FED, RUN), json.dumps(pointer).encode())


def _finish(store: LocalObjectStore) -> None:
    store.put(keys.run_pointer_key(FED, RUN), json.dumps({"state": "finished"}).encode())


def _script(*steps: Callable[[], None]) -> Callable[[float], None]:
    """A ``wait`` that plays the coordinator: one step per wait, then the run's end."""
    pending: Iterator[Callable[[], None]] = iter(steps)

    def wait(timeout: float) -> None:
        next(pending)()

    return wait


@pytest.fixture
def store(tmp_path: Path) -> LocalObjectStore:
    return LocalObjectStore(tmp_path / "objects")


def _loop(store: LocalObjectStore, work: RecordingWork, wait: Callable[[float], None]) -> Any:
    rang: list[str] = []
    loop = SessionLoop(store, FED, RUN, work, wait=wait, notify=rang.append, heartbeat_s=60)
    return loop, rang


def test_one_loop_serves_several_sites_and_reports_a_failed_round(
    tmp_path: Path, store: LocalObjectStore
) -> None:
    work = RecordingWork(bad_round="site-c")
    loop, rang = _loop(
        store,
        work,
        _script(
            lambda: _open_round(store, 1, "n1", ["site-a", "site-b", "site-c"]),
            lambda: _open_round(store, 2, "n2", ["site-a"]),
            lambda: _finish(store),
        ),
    )
    for site in ("site-a", "site-b", "site-c"):
        loop.add(_settings(tmp_path, site), 1, {"host": "test"})

    outcomes = loop.run()

    # each assignment served once, larger sites first (site-b 30 rows, site-c 20, site-a 10)
    assert work.trained == [("site-b", 1), ("site-c", 1), ("site-a", 1), ("site-a", 2)]
    assert outcomes["site-a"] == {"site": "site-a", "contract": "passed", "rounds": [1, 2]}
    assert outcomes["site-c"]["rounds"] == []
    error = json.loads(store.get(keys.round_error_key(FED, RUN, 1, "site-c")))
    assert error["nonce"] == "n1" and "train function fit:train raised" in error["error"]
    assert not store.exists(keys.round_error_key(FED, RUN, 1, "site-a"))
    # every contract report and every round's answer rang the coordinator
    assert sorted(rang) == sorted(["site-a", "site-b", "site-c"] * 2 + ["site-a"])
    for site in ("site-a", "site-b", "site-c"):
        report = json.loads(store.get(keys.contract_report_key(FED, RUN, site)))
        assert report["success"] and report["site"] == site
        beat = json.loads(store.get(keys.session_key(FED, RUN, site, 1)))
        assert beat["attempt"] == 1 and beat["host"] == "test"
    assert loop.ended == f"run {RUN} is finished"


def test_a_failed_or_unreadable_contract_ends_only_that_session(
    tmp_path: Path, store: LocalObjectStore
) -> None:
    work = RecordingWork(bad_contract="site-b", raises="site-c")
    loop, _ = _loop(
        store,
        work,
        _script(
            lambda: _open_round(store, 1, "n1", ["site-a", "site-b", "site-c"]),
            lambda: _finish(store),
        ),
    )
    for site in ("site-a", "site-b", "site-c"):
        loop.add(_settings(tmp_path, site), 1, {})

    outcomes = loop.run()

    assert work.trained == [("site-a", 1)]
    assert outcomes["site-b"]["contract"] == "failed" and outcomes["site-c"]["contract"] == "failed"
    raised = ContractReport.model_validate_json(
        store.get(keys.contract_report_key(FED, RUN, "site-c"))
    )
    assert not raised.success
    assert raised.results[0].error == "OSError: the data folder is not mounted"
    assert [s.site for s in loop.sessions.values() if s.ended] == ["site-b", "site-c"]


def test_a_newer_session_of_a_site_takes_over_and_the_loop_ends_when_none_is_left(
    tmp_path: Path, store: LocalObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(session_protocol, "SUPERSEDED_CHECK_S", 0.0)  # look at every turn
    work = RecordingWork()
    loop, _ = _loop(
        store,
        work,
        _script(
            # another process started session 2 of site-a: this one (attempt 1) stops
            lambda: store.put(keys.session_key(FED, RUN, "site-a", 2), b"{}"),
            lambda: pytest.fail("the loop should have ended: its only session was superseded"),
        ),
    )
    loop.add(_settings(tmp_path, "site-a"), 1, {})

    outcomes = loop.run()

    assert outcomes["site-a"]["rounds"] == []
    assert loop.sessions["site-a"].ended == "a newer session of the site took over"


def test_a_secure_step_in_the_pointer_is_answered_once_per_site(
    tmp_path: Path, store: LocalObjectStore
) -> None:
    def ask() -> None:
        secure = {"round": 1, "nonce": "n1", "step": "shares", "sites": ["site-a", "site-b"]}
        pointer = {"state": "running", "round": 1, "secure": secure}
        store.put(keys.run_pointer_key(FED, RUN), json.dumps(pointer).encode())

    work = RecordingWork()
    loop, rang = _loop(store, work, _script(ask, lambda: None, lambda: _finish(store)))
    for site in ("site-a", "site-b", "site-c"):
        loop.add(_settings(tmp_path, site), 1, {})

    loop.run()

    assert sorted(work.stepped) == [("site-a", "shares"), ("site-b", "shares")]
    assert rang.count("site-a") == 2 and rang.count("site-c") == 1  # contract + step


def test_a_loop_without_work_ends_after_its_idle_timeout(
    tmp_path: Path, store: LocalObjectStore
) -> None:
    loop = SessionLoop(store, FED, RUN, RecordingWork(), wait=lambda t: None, idle_timeout_s=0.0)
    loop.add(_settings(tmp_path, "site-a"), 1, {})

    loop.run()

    assert loop.ended == "no new round for 0 s"
