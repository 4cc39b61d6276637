"""How the coordinator reaches its sites.

A dispatcher runs the site-side work (data contract, site round, secure-aggregation
steps, evaluation) for a named site and returns its metadata. Both runtimes speak one round
protocol through the object store (:mod:`fedround.flows.distributed`): the distributed
runtime starts each site's session in the site's own Prefect work pool, the embedded
default in a few local site hosts (:mod:`fedround.flows.local_sites`), each site reading
only its own config and shard. The training flow does not know which.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

from fedround.site_workers.settings import load_site_settings
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


class SiteFailed(SiteUnavailable):
    """The site answered that its work failed: the message is the site's own reason."""


def failure_reason(error: BaseException) -> str:
    """Why a site's work gave no result, as rounds and reports list it: ``unavailable: …``
    when the site did not answer, ``failed: …`` with its own reason when it did."""
    unavailable = isinstance(error, SiteUnavailable) and not isinstance(error, SiteFailed)
    return f"{'unavailable' if unavailable else 'failed'}: {error}"


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
) -> Iterator[SiteDispatcher]:
    """The federation's sites on this machine, current for the flows run inside the block.

    Prefect's temporary server boots in the background first; meanwhile the demo sites are
    provisioned and the local site hosts (:mod:`fedround.flows.local_sites`) start their
    imports. The block begins once the
    server answers, and the workers are stopped when it ends. ``ready`` waits for a local
    server started elsewhere (the CLI's long-lived one) instead.
    """
    from fedround.flows import environment
    from fedround.flows.local_sites import EmbeddedDispatcher
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
    store = open_store(settings.object_store)
    provision_site_keys(site_configs, store, config.federation)
    dispatcher = EmbeddedDispatcher(
        config, store, site_configs, processes or settings.site_processes
    )
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
