"""Differential privacy: accounting (:mod:`.accounting`), the ε a training plan spends and
the noise a target ε needs, by Google's ``dp_accounting`` library; client-level DP-FedAvg,
central or local (:mod:`.dp_fedavg`); the budget ledger's entries, hash chain and
composition (:mod:`.ledger`, stored by :mod:`fedround.tasks.privacy_ledger`); adaptive
clipping (:mod:`.adaptive_clipping`); the accounting of record-level DP-SGD (:mod:`.record`;
the training itself runs at the sites, :mod:`fedround.site_workers.dp_sgd`). Secure
aggregation is its own package, :mod:`fedround.tasks.core.secagg`.
"""

from __future__ import annotations

from .accounting import (
    ACCOUNTANTS,
    Accountant,
    PrivacyParameterError,
    PrivacySpend,
    accountant_named,
    calibrate,
    dp_event,
    epsilon,
    privacy_spend,
)

__all__ = [
    "ACCOUNTANTS",
    "Accountant",
    "PrivacyParameterError",
    "PrivacySpend",
    "accountant_named",
    "calibrate",
    "dp_event",
    "epsilon",
    "privacy_spend",
]
