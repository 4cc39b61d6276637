"""Differential privacy: accounting (:mod:`.accounting`), the ε a training plan spends and
the noise a target ε needs, by Google's ``dp_accounting`` library; client-level DP-FedAvg,
central or local (:mod:`.dp_fedavg`); the budget ledger's entries, hash chain and
composition (:mod:`.ledger`, stored by :mod:`fedround.tasks.privacy_ledger`).

Not built yet: record-level DP-SGD at the sites, adaptive clipping and secure aggregation.
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
