"""SCAFFOLD at the site: the server's control variate in, the site's own variate kept.

In a SCAFFOLD round the site fetches c (published beside the global model, checked against
the digest in the round spec), loads its own cᵢ from its state folder
(:class:`~.site_state.SiteState`, kind ``control``), trains with the
:class:`~fedround.tasks.core.hooks.ControlVariate` hook (the gradient correction c − cᵢ,
and Δcᵢ added to the update as ``control/<tensor>``), then persists cᵢ⁺ before the update
is uploaded (:meth:`SiteVariate.commit`).

What is kept: the round it was computed in, cᵢ before that round and cᵢ⁺ after it. A
later round starts from cᵢ⁺; the same round again (a retry, or a coordinator that crashed
before committing the round and runs it again) starts from cᵢ as it was before, so a
retried or resumed round is byte-identical to the first attempt.

Fallback for a site without its variate (its first round in this run, or a lost disk:
the two look alike to the site): cᵢ = 0, as the paper initialises every site. The site
says so in a log line and in its update's metrics (``scaffold_variate_reset: 1``). After
the round, cᵢ⁺ is the site's fresh estimate again (with plain SGD, option II gives the mean
corrected gradient of the round whatever cᵢ was); the server's c keeps the lost cᵢ's
share (cᵢ/N) until the site's later rounds correct it. A stored variate from a *later*
round than the one asked (the run was rolled back to an older checkpoint) or for a model
of other shapes counts as lost.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fedround.tasks.core import keys
from fedround.tasks.core.errors import FedroundError
from fedround.tasks.core.hooks import ControlVariate
from fedround.tasks.core.serialization import Weights, sha256_hex, weights_from_bytes
from fedround.tasks.core.strategies.scaffold import control_names
from fedround.tasks.object_store import ObjectStore

from .site_state import SiteState

if TYPE_CHECKING:
    from .settings import SiteSettings
    from .site_round import RoundSpec

log = logging.getLogger(__name__)

KIND = "control"
ROUND = "round"
BEFORE = "before/"
AFTER = "after/"


class ControlVariateError(FedroundError):
    """The coordinator's control variate is missing or does not match the round."""


@dataclass
class SiteVariate:
    """The site's side of one SCAFFOLD round."""

    hook: ControlVariate
    state: SiteState
    round: int
    reset: bool
    nbytes_down: int

    def commit(self) -> dict[str, float]:
        """Persist cᵢ⁺ (after the update hooks ran) and return the round's metrics."""
        updated = self.hook.updated
        if updated is None:
            raise RuntimeError("the ControlVariate's update hook has not run: nothing to keep")
        tensors: Weights = {ROUND: torch.tensor([self.round], dtype=torch.int64)}
        for name, variate in self.hook.variate.items():
            tensors[BEFORE + name] = variate
            tensors[AFTER + name] = updated[name]
        self.state.save(KIND, tensors)
        if not self.hook.steps:
            log.warning(
                "round %d: no gradient reached SCAFFOLD's correction (does the train function "
                "train the model it is given?): the site's control variate stays as it was",
                self.round,
            )
        return {
            "scaffold_variate_reset": float(self.reset),
            "scaffold_local_steps": float(self.hook.steps),
            "bytes_down_control": float(self.nbytes_down),
        }


def fetch_control(
    store: ObjectStore,
    federation: str,
    run_id: str,
    round_: int,
    sha256: str | None,
    global_weights: Weights,
) -> tuple[Weights, int]:
    """The server's c for the round, checked against the announced digest and the model."""
    if sha256 is None:
        raise ControlVariateError(
            f"round {round_} is a SCAFFOLD round but its spec announces no control variate: "
            "the coordinator must publish c beside the global model (update it)"
        )
    payload = store.get(keys.global_control_key(federation, run_id, round_))
    digest = sha256_hex(payload)
    if digest != sha256:
        raise ControlVariateError(
            f"control variate for round {round_} has sha256 {digest[:12]}…, the coordinator "
            f"announced {sha256[:12]}…: refusing to train with it"
        )
    control = weights_from_bytes(payload)
    expected = {
        n: (global_weights[n].shape, global_weights[n].dtype) for n in control_names(global_weights)
    }
    found = {n: (t.shape, t.dtype) for n, t in control.items()}
    if found != expected:
        raise ControlVariateError(
            f"control variate for round {round_} does not match the model's floating-point "
            f"tensors (differing: {sorted(set(found.items()) ^ set(expected.items()))[:3]})"
        )
    return control, len(payload)


def load_variate(state: SiteState, round_: int, server: Weights) -> Weights | None:
    """The site's cᵢ to start round ``round_`` from, or ``None`` when it has none usable."""
    stored = state.load(KIND)
    if stored is None:
        return None
    marker = stored.get(ROUND)
    names = sorted(server)
    if (
        marker is None
        or marker.numel() != 1
        or any(
            BEFORE + n not in stored
            or AFTER + n not in stored
            or stored[BEFORE + n].shape != server[n].shape
            or stored[AFTER + n].shape != server[n].shape
            for n in names
        )
    ):
        log.warning("the stored SCAFFOLD control variate does not fit this model: ignoring it")
        return None
    kept = int(marker.item())
    if kept < round_:
        return {n: stored[AFTER + n].to(server[n].dtype) for n in names}
    if kept == round_:  # this round again: start where its first attempt started
        return {n: stored[BEFORE + n].to(server[n].dtype) for n in names}
    log.warning(
        "the stored SCAFFOLD control variate is from round %d, later than round %d: the run "
        "went back to an older checkpoint; ignoring it",
        kept,
        round_,
    )
    return None


def prepare_variate(
    store: ObjectStore, settings: SiteSettings, spec: RoundSpec, global_weights: Weights
) -> SiteVariate | None:
    """For a SCAFFOLD round: c from the coordinator and cᵢ from the site's disk (or the
    fallback), as the hook that trains with them; ``None`` for any other strategy."""
    if spec.strategy.name != "scaffold":
        return None
    server, nbytes = fetch_control(
        store, spec.federation, spec.run_id, spec.round, spec.control_sha256, global_weights
    )
    state = SiteState(settings.site_state_dir, spec.federation, spec.run_id)
    variate = load_variate(state, spec.round, server)
    reset = variate is None
    if variate is None:
        log.warning(
            "site %s round %d: no SCAFFOLD control variate kept at %s (the site's first round "
            "in this run, or its state was lost): starting from c_i = 0",
            spec.site,
            spec.round,
            state.path(KIND),
        )
        variate = {name: torch.zeros_like(tensor) for name, tensor in server.items()}
    return SiteVariate(
        hook=ControlVariate(server, variate, spec.training.learning_rate),
        state=state,
        round=spec.round,
        reset=reset,
        nbytes_down=nbytes,
    )
