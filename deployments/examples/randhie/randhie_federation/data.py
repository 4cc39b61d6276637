"""The RAND Health Insurance Experiment, as statsmodels ships it, split the way a
consortium of insurance plans would hold it.

The table (``statsmodels.datasets.randhie``, 20,190 person-years, Deb & Trivedi 2002) has
the outcome ``mdvis`` (face-to-face doctor visits in the year) and nine covariates:
``lncoins`` = log(coinsurance + 1) and ``idp`` (individual deductible plan), which together
are the insurance plan a family was randomised to, ``lpi`` (log participation incentive),
``fmde`` (a function of the maximum expenditure offer), ``physlm`` (physical limitation),
``disea`` (chronic diseases), and self-rated health ``hlthg`` / ``hlthf`` / ``hlthp`` (good,
fair, poor; all three 0 = excellent).

Sites: ``lncoins`` × ``idp`` gives six plan arms in the data, one site each (see
:data:`PLANS`). The task: does a person see a doctor at all in the year
(``any_visit = mdvis > 0``, 69 % of person-years), scored by AUC. Classification, not a
regression of ``mdvis``: the counts are heavy-tailed (median 1, max 77), the
any-use/how-much split is the first part of the classic two-part model of this data, and
AUC does not depend on the plans' very different base rates (55–78 %).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

FEATURES = ["lncoins", "idp", "lpi", "fmde", "physlm", "disea", "hlthg", "hlthf", "hlthp"]
LABEL = "any_visit"
COLUMNS = ["mdvis", *FEATURES, LABEL]


@dataclass(frozen=True)
class Plan:
    site: str
    coinsurance: int  # percent: lncoins = log(coinsurance + 1)
    idp: int
    description: str

    @property
    def lncoins(self) -> float:
        return math.log(self.coinsurance + 1)


PLANS = [
    Plan("plan-free", 0, 0, "free care"),
    Plan("plan-25", 25, 0, "25 % coinsurance"),
    Plan("plan-50", 50, 0, "50 % coinsurance"),
    Plan("plan-95", 95, 0, "95 % coinsurance"),
    Plan("plan-idp-0", 0, 1, "individual deductible, coinsurance coded 0"),
    Plan("plan-idp-100", 100, 1, "individual deductible, coinsurance coded 100 %"),
]
SITES = [plan.site for plan in PLANS]


def load_randhie() -> pd.DataFrame:
    """The statsmodels table plus ``any_visit`` (read from the installed package)."""
    from statsmodels.datasets import randhie

    frame = randhie.load_pandas().data.copy()
    frame[LABEL] = (frame["mdvis"] > 0).astype("int64")
    return frame[COLUMNS]


def plan_of(frame: pd.DataFrame) -> pd.Series:
    """The site (plan arm) of every row; a row that matches no plan is an error."""
    names = pd.Series(pd.NA, index=frame.index, dtype="object")
    for plan in PLANS:
        match = np.isclose(frame["lncoins"], plan.lncoins, atol=1e-4) & (frame["idp"] == plan.idp)
        names[match] = plan.site
    if names.isna().any():
        odd = frame.loc[names.isna(), ["lncoins", "idp"]].drop_duplicates().head()
        raise ValueError(f"rows match no plan in PLANS: {odd.to_dict('records')}")
    return names


@dataclass(frozen=True)
class Split:
    """Every site's train and test rows, and the coordinator's own held-out rows."""

    sites: dict[str, tuple[pd.DataFrame, pd.DataFrame]]
    holdout: pd.DataFrame


def split(
    frame: pd.DataFrame, seed: int = 2024, holdout_share: float = 0.15, test_share: float = 0.2
) -> Split:
    """First a separate sample for the coordinator (``holdout_share`` of every plan), then
    each plan's remaining rows split into the site's train and test files (``test_share``).

    In a real consortium the coordinator's held-out set is its own validation data, never
    pooled from the sites; here it is a sample the sites do not hold. (The table has no
    person id, so a person's other years may fall on either side of a split.)
    """
    rng = np.random.default_rng(seed)
    plans = plan_of(frame)
    holdout_parts = []
    sites: dict[str, tuple[pd.DataFrame, pd.DataFrame]] = {}
    for plan in PLANS:
        rows = frame[plans == plan.site]
        order = rng.permutation(len(rows))
        n_holdout = round(len(rows) * holdout_share)
        holdout_parts.append(rows.iloc[order[:n_holdout]])
        kept = rows.iloc[order[n_holdout:]]
        n_test = round(len(kept) * test_share)
        sites[plan.site] = (
            kept.iloc[n_test:].reset_index(drop=True),
            kept.iloc[:n_test].reset_index(drop=True),
        )
    holdout = pd.concat(holdout_parts).sample(frac=1.0, random_state=seed)
    return Split(sites=sites, holdout=holdout.reset_index(drop=True))
