"""FedProx at the coordinator: the server step of FedAvg.

Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020. FedProx changes
only the sites' local objective (a proximal term μ/2·‖w − w_global‖², added to every
gradient by :class:`fedround.tasks.core.hooks.ProximalTerm`); the server aggregates the
resulting updates exactly as FedAvg does.
"""

from __future__ import annotations

from .fedavg import FedAvg


class FedProx(FedAvg):
    """Server side of FedProx: xₜ₊₁ = xₜ + η·Δₜ (the proximal term acts at the sites,
    through the client hook). Stateless."""

    name = "fedprox"
