"""The site's side of compressed updates: encode, and keep the error-feedback residual.

With top-k and error feedback, what a round did not send (the *residual*) is kept in the
site's own state (:class:`~.site_state.SiteState`, kind ``residual``, never uploaded) and
added to the next round's update, across rounds and site restarts. The residual is saved
only once the update is uploaded (:meth:`Upload.commit`): a round that fails before, or is
retried, starts again from the residual it started with. A site that lost its residual
(a new disk) or whose model changed shape simply starts without one: the values it held
are lost once, nothing else changes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from fedround.tasks.core.compression import (
    DENSE,
    dense_nbytes,
    encode_update,
    encode_with_feedback,
    residual_fits,
)
from fedround.tasks.core.config import CompressionConfig
from fedround.tasks.core.serialization import Weights

from .site_state import SiteState

log = logging.getLogger(__name__)

RESIDUAL = "residual"


@dataclass
class Upload:
    """What a site uploads: the encoded tensors, the encoding for the manifest, the
    uncompressed size (reported beside the encoded one) and the residual to keep."""

    tensors: Weights
    encoding: str
    dense_nbytes: int
    residual: Weights | None = None
    state: SiteState | None = None

    def commit(self) -> None:
        """Keep the new residual: call once the update is uploaded."""
        if self.state is not None and self.residual is not None:
            self.state.save(RESIDUAL, self.residual)


def prepare_upload(
    delta: Weights,
    compression: CompressionConfig,
    seed: int,
    state_dir: Path,
    federation: str,
    run_id: str,
) -> Upload:
    """Encode ``delta`` as ``compression`` says (stochastic rounding seeded by ``seed``);
    with top-k and error feedback, last round's residual (kept under ``state_dir`` for
    this federation and run) is added first."""
    if compression.encoding == DENSE:
        return Upload(delta, DENSE, dense_nbytes(delta))
    ratio, bits = compression.topk_ratio, compression.quantize_bits
    if ratio is None or not compression.error_feedback:
        encoded = encode_update(delta, ratio, bits, seed)
        return Upload(encoded.tensors, encoded.encoding, encoded.dense_nbytes)
    state = SiteState(state_dir, federation, run_id)
    residual = state.load(RESIDUAL)
    if residual is not None and not residual_fits(residual, delta):
        log.warning("the saved residual does not fit this model: starting without it")
        residual = None
    encoded, left = encode_with_feedback(delta, residual, ratio, bits, seed)
    return Upload(encoded.tensors, encoded.encoding, encoded.dense_nbytes, left, state)
