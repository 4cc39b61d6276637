"""Site data on disk (``train.npz``: ``features`` n×d, ``labels`` n) and its contract view."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:  # pandas is imported only where the contract view is built
    import pandas as pd

TRAIN_FILE = "train.npz"
TEST_FILE = "test.npz"


@dataclass(frozen=True)
class SiteData:
    features: npt.NDArray[np.float32]
    labels: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return len(self.labels)


def save_site_data(path: Path, features: npt.ArrayLike, labels: npt.ArrayLike) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        np.savez(handle, features=np.asarray(features), labels=np.asarray(labels))


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    """All arrays in an ``.npz`` file; pickled objects are refused."""
    with np.load(path, allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def load_site_data(path: Path) -> SiteData:
    """Training-ready arrays; call only after the data contract passed."""
    arrays = read_arrays(path)
    missing = {"features", "labels"} - set(arrays)
    if missing:
        raise ValueError(f"{path} lacks arrays {sorted(missing)}")
    return SiteData(
        arrays["features"].astype(np.float32).reshape(len(arrays["labels"]), -1),
        arrays["labels"].astype(np.int64),
    )


def profile_frame(arrays: dict[str, np.ndarray]) -> pd.DataFrame:
    """The per-example view the data contract checks: label plus feature statistics.

    Columns: ``label``, ``n_features``, ``n_missing`` (NaNs), ``feature_min`` and
    ``feature_max`` (ignoring NaNs). A missing array simply leaves its columns out, so the
    contract reports the missing column by name.
    """
    import pandas as pd

    columns: dict[str, object] = {}
    if "labels" in arrays:
        labels = arrays["labels"]
        columns["label"] = pd.Series(labels.reshape(-1)) if labels.ndim else pd.Series([labels])
    if "features" in arrays:
        features = arrays["features"].astype(np.float64)
        rows = features.reshape(features.shape[0], -1) if features.ndim > 1 else features[:, None]
        missing = np.isnan(rows)
        filled_low = np.where(missing, np.inf, rows)
        filled_high = np.where(missing, -np.inf, rows)
        columns["n_features"] = rows.shape[1]
        columns["n_missing"] = missing.sum(axis=1)
        columns["feature_min"] = np.where(missing.all(axis=1), np.nan, filled_low.min(axis=1))
        columns["feature_max"] = np.where(missing.all(axis=1), np.nan, filled_high.max(axis=1))
    return pd.DataFrame(columns)
