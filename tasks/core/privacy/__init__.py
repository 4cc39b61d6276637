"""Differential privacy: accounting (:mod:`.accounting`), the ε a training plan spends and
the noise a target ε needs, by Google's ``dp_accounting`` library.

Not built yet: the per-run privacy ledger, DP-FedAvg's noise at the coordinator and
secure aggregation.
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
