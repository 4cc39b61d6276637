"""Record-level DP-SGD (``privacy.mode: record``), pure parts: what one round at a site spends.

A site trains with Opacus's Poisson-sampled DP-SGD (:mod:`fedround.site_workers.dp_sgd`):
each of an epoch's k = ⌈n / batch_size⌉ steps samples every example with probability
q = 1/k (Opacus's sample rate), so a round of ``local_epochs`` epochs is
``local_epochs``·k Poisson-subsampled Gaussian steps at rate q. The privacy ledger charges
that (:mod:`fedround.tasks.privacy_ledger`); ``fedround privacy epsilon --steps`` plans it.
"""

from __future__ import annotations

import math


def dp_steps(num_examples: int, batch_size: int, local_epochs: int) -> tuple[float, int]:
    """(q, steps) of one round of DP-SGD over ``num_examples``: q = 1/k and
    ``local_epochs``·k steps, k = ⌈n / batch_size⌉ (at least 1)."""
    if batch_size < 1 or local_epochs < 1:
        raise ValueError("batch_size and local_epochs must be at least 1")
    batches = max(1, math.ceil(max(num_examples, 1) / batch_size))
    return 1.0 / batches, local_epochs * batches
