"""Where the coordinator keeps its state, read from the environment with working defaults.

The embedded default needs nothing set: everything lives under ``./.fedround``
(Prefect's database, MLflow's sqlite store and artifacts, the local object store, the
demo sites and run results).
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from fedround.tasks.object_store import ObjectStoreSettings

DEFAULT_STATE_DIR = Path(".fedround")


def state_dir_from_env() -> Path:
    return Path(os.environ.get("FEDROUND_STATE_DIR", DEFAULT_STATE_DIR)).resolve()


class CoordinatorSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    state_dir: Path
    object_store: ObjectStoreSettings
    tracking_uri: str
    site_processes: int

    @property
    def runs_dir(self) -> Path:
        return self.state_dir / "runs"

    def federation_dir(self, federation: str) -> Path:
        return self.state_dir / "federations" / federation

    def holdout_file(self, federation: str) -> Path:
        return self.federation_dir(federation) / "holdout.npz"

    def site_config_file(self, federation: str, site: str) -> Path:
        return self.federation_dir(federation) / "sites" / site / "site.yaml"

    @classmethod
    def from_env(cls) -> CoordinatorSettings:
        """Read ``FEDROUND_*`` and ``MLFLOW_TRACKING_URI``; defaults give the embedded setup."""
        state = state_dir_from_env()
        if os.environ.get("FEDROUND_OBJECT_STORE", "local") == "s3":
            store = ObjectStoreSettings(
                kind="s3",
                endpoint=os.environ.get("FEDROUND_S3_ENDPOINT"),
                bucket=os.environ.get("FEDROUND_S3_BUCKET", "fedround"),
                secure=os.environ.get("FEDROUND_S3_SECURE", "false") == "true",
                region=os.environ.get("FEDROUND_S3_REGION"),
            )
        else:
            store = ObjectStoreSettings(kind="local", root=state / "objects")
        tracking = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{state / 'mlflow.db'}"
        processes = int(os.environ.get("FEDROUND_SITE_PROCESSES", min(os.cpu_count() or 1, 4)))
        return cls(
            state_dir=state, object_store=store, tracking_uri=tracking, site_processes=processes
        )
