"""A site's data on disk, read only at the site.

Two kinds (``data.kind`` in the federation config):

- ``arrays``: an ``.npz`` file with ``features`` (n×d) and ``labels`` (n) — the demo's
  MNIST shards. Its data contract checks a per-example profile (:func:`profile_frame`).
- ``table``: a Parquet or CSV file (or whatever the federation's ``data.loader`` reads)
  with the columns the federation declares. Its data contract checks the real columns;
  for training it is transformed by the federation's preprocessor (statistics computed
  federatedly, see :mod:`fedround.tasks.core.preprocessing`).

Where the files are is the site's business: ``site.yaml`` names its ``data_dir`` and,
optionally, ``train_file`` and ``test_file`` in it.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from fedround.tasks.core.config import DataConfig
from fedround.tasks.core.usercode import UserCodeError, call_user, load_callable

if TYPE_CHECKING:  # pandas and torch are imported only where they are used
    import pandas as pd

    from fedround.tasks.core.preprocessing import Preprocessor
    from fedround.tasks.core.usercode import SiteDataset

TRAIN_FILE = "train.npz"
TEST_FILE = "test.npz"
TABLE_SUFFIXES = {".parquet", ".pq", ".csv", ".tsv"}


class DataError(ValueError):
    """A site's data file is missing, unreadable or of the wrong shape; names the file."""


def save_site_data(path: Path, features: npt.ArrayLike, labels: npt.ArrayLike) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        np.savez(handle, features=np.asarray(features), labels=np.asarray(labels))


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    """All arrays in an ``.npz`` file; pickled objects are refused."""
    with np.load(path, allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def read_table(path: Path, loader: str | None = None) -> pd.DataFrame:
    """A site's table: Parquet or CSV by suffix, or the federation's own ``loader``."""
    import pandas as pd

    if not path.exists():
        raise DataError(f"data file {path} does not exist: check data_dir/train_file in site.yaml")
    if loader is not None:
        frame = call_user(load_callable(loader, "data loader"), f"data loader {loader}", path)
        if not isinstance(frame, pd.DataFrame):
            raise UserCodeError(
                f"data loader {loader} returned {type(frame).__name__} for {path.name}, "
                "not a pandas DataFrame"
            )
        return frame
    suffix = path.suffix.lower()
    try:
        if suffix in {".parquet", ".pq"}:
            return pd.read_parquet(path)
        if suffix in {".csv", ".tsv"}:
            return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",")
    except Exception as exc:
        raise DataError(
            f"cannot read {path.name} as {suffix[1:]}: {type(exc).__name__}: {exc}"
        ) from exc
    raise DataError(
        f"{path.name}: fedround reads {sorted(TABLE_SUFFIXES)}; for another format name a "
        "data.loader (package.module:function) in the federation config"
    )


def read_array_file(path: Path, loader: str | None = None) -> dict[str, np.ndarray]:
    """A site's arrays: an ``.npz`` file, or the federation's own ``loader``."""
    if not path.exists():
        raise DataError(f"data file {path} does not exist: check data_dir/train_file in site.yaml")
    if loader is None:
        try:
            return read_arrays(path)
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read {path.name} as .npz: {exc}") from exc
    result: Any = call_user(load_callable(loader, "data loader"), f"data loader {loader}", path)
    if not (isinstance(result, tuple) and len(result) == 2):
        raise UserCodeError(f"data loader {loader} must return (features, labels) arrays")
    return {"features": np.asarray(result[0]), "labels": np.asarray(result[1])}


def contract_frame(path: Path, data: DataConfig) -> pd.DataFrame:
    """The frame the data contract checks: the real table, or the arrays' profile."""
    if data.kind == "table":
        return read_table(path, data.loader)
    return profile_frame(read_array_file(path, data.loader))


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


@lru_cache(maxsize=16)
def _dataset(
    path: Path, mtime_ns: int, data_json: str, preprocessor_json: str | None
) -> SiteDataset:
    import torch

    from fedround.tasks.core.preprocessing import Preprocessor
    from fedround.tasks.core.usercode import SiteDataset

    data = DataConfig.model_validate_json(data_json)
    if data.kind == "table":
        if preprocessor_json is None:
            raise DataError("a table federation needs its preprocessor (set-up step missing)")
        pre = Preprocessor.model_validate_json(preprocessor_json)
        try:
            features, labels = pre.transform(read_table(path, data.loader))
        except (KeyError, ValueError) as exc:
            raise DataError(f"{path.name}: {exc}") from exc
        target = torch.from_numpy(
            labels.astype(np.int64 if pre.task == "classification" else np.float32)
        )
        return SiteDataset(
            torch.from_numpy(np.ascontiguousarray(features)),
            target,
            task=pre.task,
            num_classes=len(pre.classes) if pre.task == "classification" else None,
            feature_names=tuple(pre.feature_names),
        )
    arrays = read_array_file(path, data.loader)
    missing = {"features", "labels"} - set(arrays)
    if missing:
        raise DataError(f"{path.name} lacks arrays {sorted(missing)}")
    labels_np = arrays["labels"].astype(np.int64).reshape(-1)
    features_np = arrays["features"].astype(np.float32).reshape(len(labels_np), -1)
    return SiteDataset(
        torch.from_numpy(features_np),
        torch.from_numpy(labels_np),
        task="classification",
        num_classes=int(labels_np.max()) + 1 if len(labels_np) else None,
    )


def load_dataset(
    path: Path, data: DataConfig, preprocessor: Preprocessor | None = None
) -> SiteDataset:
    """A site's file as model-ready tensors (cached while the file and config are unchanged)."""
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:
        raise DataError(
            f"data file {path} does not exist: check data_dir/train_file in site.yaml"
        ) from None
    return _dataset(
        path,
        mtime,
        data.model_dump_json(),
        preprocessor.model_dump_json() if preprocessor is not None else None,
    )
