"""How the coordinator reaches its sites.

A dispatcher runs the site-side functions (data contract, site round) for a named site
and returns their metadata. The embedded default runs them in a pool of local worker
processes, each site reading only its own config and shard; the distributed runtime
sends them to each site's Prefect work pool. The training flow does not know which.
"""

from __future__ import annotations

import contextvars
import logging
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

from fedround.site_workers.settings import SiteSettings, load_site_settings
from fedround.site_workers.site_round import EvalSpec, RoundSpec, SiteEvalResult, SiteRoundResult
from fedround.tasks.core.config import FederationConfig
from fedround.tasks.core.contract_report import ContractReport
from fedround.tasks.core.errors import ConfigError
from fedround.tasks.secure_aggregation import SecureStep

if TYPE_CHECKING:
    from prefect.futures import PrefectFuture

log = logging.getLogger(__name__)


class SiteUnavailable(Exception):
    """The site did not answer in time, or its runtime failed (not its data or update)."""


class SiteDispatcher(Protocol):
    def open_run(self, run_id: str, sites: list[str]) -> None:
        """A training run starts (or resumes) with these sites."""

    def check_contract(
        self, site: str, federation: str, run_id: str, timeout: float
    ) -> ContractReport: ...

    def announce_round(
        self, round_: int, nonce: str, specs: list[RoundSpec], deadline: float
    ) -> list[str]:
        """A round opens; returns the sites known to be down (skipped, not waited for)."""

    def run_round(self, spec: RoundSpec, timeout: float) -> SiteRoundResult: ...

    def evaluate(self, spec: EvalSpec, timeout: float) -> SiteEvalResult: ...

    def secure_steps(self, steps: list[SecureStep], timeout: float) -> dict[str, str | None]:
        """Ask each site for its next secure-aggregation message (written to the store);
        per site ``None`` once it is written, else why it is not."""

    def close_run(self, state: str) -> None:
        """The training run ended (``finished`` or ``failed``)."""

    def close(self) -> None: ...


current_dispatcher: contextvars.ContextVar[SiteDispatcher] = contextvars.ContextVar(
    "fedround_dispatcher"
)

K = TypeVar("K")
T = TypeVar("T")


def settle(futures: Mapping[K, PrefectFuture[T]]) -> dict[K, T | BaseException]:
    """Wait for every site's task: its result, or the exception it failed with (a failed
    site is data for the caller to classify, not an exception that stops the others)."""
    outcomes: dict[K, T | BaseException] = {}
    for key, future in futures.items():
        future.wait()
        outcomes[key] = future.result(raise_on_failure=False)
    return outcomes


# --- functions executed inside the embedded worker processes --------------------------


@lru_cache(maxsize=64)
def _site_settings(config_file: str) -> SiteSettings:
    return load_site_settings(Path(config_file))


def _warm_up_training() -> int:
    """Import torch and the site round once per training worker process.

    A throwaway optimizer too: torch's first optimizer imports its compiler stack
    (seconds), which would otherwise land in the first round.
    """
    import torch

    import fedround.site_workers.site_round  # noqa: F401

    torch.set_num_threads(1)
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    return os.getpid()


def _warm_up_contracts() -> int:
    """Import Great Expectations (seconds) in the one process that checks contracts."""
    import great_expectations  # noqa: F401

    import fedround.site_workers.site_round  # noqa: F401

    return os.getpid()


def _contract_in_worker(config_file: str, federation: str, run_id: str) -> ContractReport:
    from fedround.site_workers.site_round import run_site_contract

    return run_site_contract(_site_settings(config_file), federation, run_id)


def _round_in_worker(config_file: str, spec: RoundSpec) -> SiteRoundResult:
    from fedround.site_workers.site_round import run_site_round

    return run_site_round(_site_settings(config_file), spec)


def _secure_step_in_worker(config_file: str, step: SecureStep) -> int:
    from fedround.site_workers.secure_aggregation import run_secure_step

    return run_secure_step(_site_settings(config_file), step)


def _evaluate_in_worker(config_file: str, spec: EvalSpec) -> SiteEvalResult:
    from fedround.site_workers.site_round import run_site_evaluation

    return run_site_evaluation(_site_settings(config_file), spec)


# --- the embedded dispatcher ---------------------------------------------------------


class EmbeddedDispatcher:
    """Runs site work in local worker processes (spawned, one torch thread each).

    Training and evaluation share ``processes`` workers. Data contracts run in one more
    process of their own, the only one that imports Great Expectations (seconds of start-up
    and ~150 MB); it is shut down once the first round opens.
    """

    def __init__(self, site_configs: Mapping[str, Path], processes: int) -> None:
        self.site_configs = {site: str(path) for site, path in site_configs.items()}
        self.processes = max(1, min(processes, len(site_configs)))
        spawn = multiprocessing.get_context("spawn")
        self.pool = ProcessPoolExecutor(max_workers=self.processes, mp_context=spawn)
        self.contract_pool: ProcessPoolExecutor | None = ProcessPoolExecutor(1, mp_context=spawn)

    def warm_up(self) -> None:
        """Start the workers and their imports now, while the coordinator starts up."""
        for _ in range(self.processes):
            self.pool.submit(_warm_up_training)
        if self.contract_pool is not None:
            self.contract_pool.submit(_warm_up_contracts)

    def _contracts(self) -> ProcessPoolExecutor:
        if self.contract_pool is None:  # contracts checked again after the first round
            self.contract_pool = ProcessPoolExecutor(
                1, mp_context=multiprocessing.get_context("spawn")
            )
        return self.contract_pool

    def _config(self, site: str) -> str:
        try:
            return self.site_configs[site]
        except KeyError:
            raise SiteUnavailable(
                f"site {site!r} has no config in this embedded federation"
            ) from None

    def _wait(self, future: Future[object], site: str, what: str, timeout: float) -> object:
        try:
            return future.result(timeout=timeout)
        except FutureTimeout:
            future.cancel()
            raise SiteUnavailable(
                f"site {site} missed the {timeout:.0f}s deadline for {what}"
            ) from None

    def open_run(self, run_id: str, sites: list[str]) -> None:
        """Nothing to start: the worker processes serve any site."""

    def announce_round(
        self, round_: int, nonce: str, specs: list[RoundSpec], deadline: float
    ) -> list[str]:
        if self.contract_pool is not None:  # contracts are done: free that process
            self.contract_pool.shutdown(wait=False)
            self.contract_pool = None
        return []

    def close_run(self, state: str) -> None:
        """Nothing to tell: the worker processes keep no per-run state."""

    def check_contract(
        self, site: str, federation: str, run_id: str, timeout: float
    ) -> ContractReport:
        future = self._contracts().submit(
            _contract_in_worker, self._config(site), federation, run_id
        )
        result = self._wait(future, site, "its data contract", timeout)  # type: ignore[arg-type]
        assert isinstance(result, ContractReport)
        return result

    def run_round(self, spec: RoundSpec, timeout: float) -> SiteRoundResult:
        future = self.pool.submit(_round_in_worker, self._config(spec.site), spec)
        result = self._wait(future, spec.site, f"round {spec.round}", timeout)  # type: ignore[arg-type]
        assert isinstance(result, SiteRoundResult)
        return result

    def evaluate(self, spec: EvalSpec, timeout: float) -> SiteEvalResult:
        future = self.pool.submit(_evaluate_in_worker, self._config(spec.site), spec)
        result = self._wait(future, spec.site, "its evaluation", timeout)  # type: ignore[arg-type]
        assert isinstance(result, SiteEvalResult)
        return result

    def secure_steps(self, steps: list[SecureStep], timeout: float) -> dict[str, str | None]:
        deadline = time.monotonic() + timeout
        futures = {
            step.site: self.pool.submit(_secure_step_in_worker, self._config(step.site), step)
            for step in steps
        }
        outcomes: dict[str, str | None] = {}
        for site, future in futures.items():
            try:
                future.result(timeout=max(0.0, deadline - time.monotonic()))
                outcomes[site] = None
            except FutureTimeout:
                future.cancel()
                outcomes[site] = f"missed the {timeout:.0f}s deadline"
            except Exception as exc:  # the site's failure is its dropout, not the round's
                outcomes[site] = f"{type(exc).__name__}: {exc}"
        return outcomes

    def close(self) -> None:
        """Stop the workers: they hold no state, so waiting for a clean exit buys nothing."""
        for pool in (self.pool, self.contract_pool):
            if pool is None:
                continue
            processes = list(getattr(pool, "_processes", {}).values())
            pool.shutdown(wait=False, cancel_futures=True)
            for process in processes:
                process.terminate()
            for process in processes:
                process.join(timeout=5)


def own_site_configs(config: FederationConfig, config_path: Path) -> dict[str, Path]:
    """``source: sites`` on one machine: each site entry names its own ``site.yaml``."""
    missing = [site.name for site in config.sites if not site.config]
    if missing:
        raise ConfigError(
            f"{config_path}: sites {missing} have no config: with data.source: sites, the "
            "embedded mode needs each site's own site.yaml (sites: - {name: a, config: "
            "sites/a/site.yaml}); in distributed mode each site's worker has it instead"
        )
    paths = {site.name: (config_path.parent / str(site.config)).resolve() for site in config.sites}
    absent = {name: str(path) for name, path in paths.items() if not path.exists()}
    if absent:
        raise ConfigError(f"{config_path}: site configs not found: {absent}")
    for name, path in paths.items():
        settings = load_site_settings(path)
        if (settings.federation, settings.site) != (config.federation, name):
            raise ConfigError(
                f"{path} is the config of {settings.federation}/{settings.site}, "
                f"not {config.federation}/{name}"
            )
    return paths


@contextmanager
def embedded_federation(
    config_path: Path, processes: int | None, ready: Callable[[], None] | None = None
) -> Iterator[EmbeddedDispatcher]:
    """The federation's sites on this machine, current for the flows run inside the block.

    Prefect's temporary server boots in the background first; meanwhile the demo sites are
    provisioned and the worker processes start their imports. The block begins once the
    server answers, and the workers are stopped when it ends. ``ready`` waits for a local
    server started elsewhere (the CLI's long-lived one) instead.
    """
    from fedround.flows import environment
    from fedround.site_workers.demo_sites import provision_demo_sites
    from fedround.site_workers.signing_key import provision_site_keys
    from fedround.tasks.core.config import load_federation_config
    from fedround.tasks.object_store import open_store
    from fedround.tasks.runtime import CoordinatorSettings

    booting = environment.start_prefect_early()
    config = load_federation_config(config_path)
    settings = CoordinatorSettings.from_env()
    if config.data.source == "sites":
        site_configs = own_site_configs(config, config_path)
    else:
        site_configs = provision_demo_sites(config, settings)
    # One machine: each site gets a signing key if it has none, its public key registered.
    provision_site_keys(site_configs, open_store(settings.object_store), config.federation)
    dispatcher = EmbeddedDispatcher(site_configs, processes or settings.site_processes)
    dispatcher.warm_up()
    token = current_dispatcher.set(dispatcher)
    try:
        if booting is not None:
            booting.join()
        if ready is not None:
            ready()
        yield dispatcher
    finally:
        current_dispatcher.reset(token)
        dispatcher.close()
