"""State a site keeps across rounds and restarts, on its own disk (never uploaded).

Strategies that need memory at the site keep it here, one safetensors file per
federation, run and kind (e.g. SCAFFOLD's control variate ``control``, the error-feedback
residual of compressed updates ``residual``). Writes are atomic (a temporary file, then a
rename), so a site killed mid-write keeps its previous state. A site that lost its state
(a new machine, a wiped disk) gets ``None`` and the strategy's documented fallback applies.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file

from fedround.tasks.core.serialization import Weights

_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class SiteState:
    """Named tensor state of one site for one training run."""

    def __init__(self, root: Path, federation: str, run_id: str) -> None:
        for part in (federation, run_id):
            if not _SAFE.match(part):
                raise ValueError(f"unsafe name for a site-state path: {part!r}")
        self.folder = root / federation / run_id

    def path(self, kind: str) -> Path:
        if not _SAFE.match(kind):
            raise ValueError(f"unsafe site-state kind: {kind!r}")
        return self.folder / f"{kind}.safetensors"

    def load(self, kind: str) -> Weights | None:
        """The saved tensors of ``kind``, or ``None`` when the site has none (or they are
        unreadable: a truncated file counts as lost state, never as a crash)."""
        path = self.path(kind)
        if not path.exists():
            return None
        try:
            return dict(load_file(str(path)))
        except Exception:
            return None

    def save(self, kind: str, tensors: Weights) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=self.folder, prefix=f".{kind}-", suffix=".tmp")
        os.close(handle)
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, temporary)
            os.replace(temporary, self.path(kind))
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
