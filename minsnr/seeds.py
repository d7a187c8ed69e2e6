"""One rule for seeds derived from other seeds: derive_seed(seed, a, b, ...) is a 63-bit integer from
numpy's SeedSequence of the keys, so streams keyed by (seed, step, micro-step), (seed, image index) or
(seed, timestep bin) are independent of each other and of the order in which they are used."""

from __future__ import annotations

import numpy as np


def derive_seed(*keys: int) -> int:
    """A seed for torch.Generator.manual_seed (non-negative, < 2^63) from non-negative integer keys."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0] >> 1)
