"""The sampler of every training loader: order and per-sample augmentation seeds from a key."""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import numpy as np
from torch.utils.data import Sampler

from utils.rng import derive_seed


class KeyedSampler(Sampler):
    """Yields ``(index, seed)`` pairs for one pass over ``n`` samples.

    Before each pass the owner calls :meth:`set_key` with the pass's key, e.g.
    ``(seed, round, party, phase, epoch)``. The order (identity, or a permutation when ``shuffle``)
    and each sample's augmentation seed depend on that key only: the sampler holds no state that a
    checkpoint would have to carry, and two parties given the same key see the same batches.
    """

    def __init__(self, n: int, shuffle: bool = False):
        self.n, self.shuffle = n, shuffle
        self.key: Optional[tuple] = None
        self.pass_shuffle: Optional[bool] = None

    def set_key(self, *key, shuffle: Optional[bool] = None) -> "KeyedSampler":
        """The next pass's key; ``shuffle``: this pass's order (None: the sampler's own setting).
        A pass reads both when it starts, so passes over one loader may interleave."""
        self.key, self.pass_shuffle = key, shuffle
        return self

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        if self.key is None:
            raise RuntimeError("KeyedSampler: set_key() must be called before each pass")
        key = self.key
        order = np.arange(self.n)
        if self.shuffle if self.pass_shuffle is None else self.pass_shuffle:
            order = np.random.default_rng(derive_seed(*key, "order")).permutation(self.n)
        for i in order:
            yield int(i), derive_seed(*key, int(i)) & 0xFFFFFFFF
